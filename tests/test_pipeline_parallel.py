"""Pipeline parallelism: a MoMaGPTModel split into two stages (PP=2, two gloo processes) and run by
Megatron-Core's own schedules (1F1B, and interleaved with two model chunks per rank) gives the losses and gradients of the whole model (PP=1) built from
the same weights, with 4t4i experts and Mixture-of-Depths layers on both stages and the aux routers
trained jointly, with and without full activation recompute. The first stage alone gets the tokens and
the last alone the labels; every stage gets the micro-batch's modality ids (a stage without tokens
could not derive them).

The ranks' forward step is moma_plugin.pipeline.forward_step. Stand-ins for the schedule's CUDA-bound calls, inside the ranks only (STAND_INS lists them); everything
else is Megatron-Core's code."""

import os
import re

import pytest
import torch

import moma_plugin as mp
from moma_plugin import pipeline

from .conftest import free_port, run_ranks

NUM_MICROBATCHES, BATCH, SEQ, VOCAB = 4, 2, 16, 64
CONFIG = dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True,
              add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, moma_experts="2t2i",
              moma_vocab_ranges={"image": (32, 64)}, mod_interval=2, mod_start_layer=1, mod_capacity=0.5)
STAND_INS = {
    "torch.cuda.current_device": "returns 'cpu': the p2p exchange allocates its shape buffers there",
    "torch.cuda.synchronize": "does nothing (no CUDA streams on the CPU)",
    "torch.zeros(device='cuda')": "allocates on the CPU: the schedule's token counter",
}


def _stand_ins():
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    zeros = torch.zeros

    def cpu_zeros(*args, device=None, **kwargs):
        return zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)

    torch.zeros = cpu_zeros


def micro_batches():
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.1).float()
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
                        "modality_ids": (tokens[:, :-1] >= 32).long()})
    return batches


def stage_key(key: str, first_layer: int):
    """The whole model's name of a model chunk's parameter (its layers are numbered from 0 in the
    chunk; ``first_layer`` is the whole model's number of its first one)."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    if not match:
        return key
    return f"decoder.layers.{int(match.group(1)) + first_layer}.{match.group(2)}"


def _rank(rank, world, port, workdir, recompute, virtual):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _stand_ins()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    vp = virtual or None  # model chunks per rank (the interleaved schedule)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world,
                                             virtual_pipeline_model_parallel_size=vp)
    overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute else {}
    # batch_p2p_comm=False: under gloo on CPU the interleaved schedule's batched isend/irecv handed some
    # micro-batches stale activations (losses 3e-4 off, also for a dense model); separate sends are exact.
    config = mp.MoMaConfig(**CONFIG, **overrides, pipeline_model_parallel_size=world, pipeline_dtype=torch.float32,
                           virtual_pipeline_model_parallel_size=vp, batch_p2p_comm=False)
    whole = torch.load(f"{workdir}/whole.pt")
    chunks, first_layers = [], []
    layers_per_chunk = CONFIG["num_layers"] // (world * (vp or 1))
    for stage in range(vp or 1):  # chunk v of rank r: layers of stage v * world + r
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage if vp else None)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage if vp else None)
        chunk = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False), vocab_size=VOCAB,
                                max_sequence_length=SEQ, pre_process=first, post_process=last,
                                share_embeddings_and_output_weights=False, vp_stage=stage if vp else None)
        first_layers.append((stage * world + rank) * layers_per_chunk)
        chunk.load_state_dict({key: whole["state"][stage_key(key, first_layers[-1])] for key in chunk.state_dict()})
        mp.set_aux_router_training(chunk, True)
        chunk.train()
        chunks.append(chunk)

    def loss_func(output, batch, aux):
        loss = (output.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        total = loss + aux if aux is not None else loss
        return total, {"lm loss": loss.detach().clone()}  # the schedule divides total in place

    def forward_step(data_iterator, model):  # tokens reach the first stage only, labels the last
        return pipeline.forward_step(next(data_iterator), model, NUM_MICROBATCHES, loss_func)

    data = [iter(micro_batches()) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data if vp else data[0], model=chunks,
        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
    grads, metrics = {}, {}
    for chunk, first_layer in zip(chunks, first_layers):
        grads.update({stage_key(name, first_layer): p.grad.clone() for name, p in chunk.named_parameters()
                      if p.grad is not None})
        metrics.update(mp.collect_routing_metrics(chunk))
    torch.save({"losses": [float(item["lm loss"]) for item in losses], "grads": grads, "metrics": metrics},
               f"{workdir}/stage{rank}.pt")
    torch.distributed.destroy_process_group()


def whole_model_step(workdir, recompute):
    """The PP=1 reference: the same micro-batches, loss averaged over them as the schedule does."""
    overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute else {}
    torch.manual_seed(0)
    config = mp.MoMaConfig(**CONFIG, **overrides)
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False), vocab_size=VOCAB,
                            max_sequence_length=SEQ, share_embeddings_and_output_weights=False)
    mp.set_aux_router_training(model, True)
    model.train()
    state = {key: value.clone() if torch.is_tensor(value) else value for key, value in model.state_dict().items()}
    losses = []
    for batch in micro_batches():
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       modality_ids=batch["modality_ids"])
        loss = (output.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        aux = mp.pop_aux_loss(model)
        ((loss + aux) / NUM_MICROBATCHES).backward()
        losses.append(float(loss.detach()))
    torch.save({"state": state}, f"{workdir}/whole.pt")
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute, virtual", [(False, 0), (True, 0), (False, 2)],
                         ids=["1f1b", "1f1b-full-recompute", "interleaved"])
def test_two_pipeline_stages_equal_the_whole_model(megatron_single_process, tmp_path, recompute, virtual):
    """1F1B: layers 0-1 on rank 0, 2-3 on rank 1. Interleaved: two model chunks per rank, layers 0 and 2
    on rank 0, 1 and 3 on rank 1."""
    losses, grads = whole_model_step(tmp_path, recompute)
    run_ranks(_rank, (2, free_port(), str(tmp_path), recompute, virtual), what="the two pipeline stages")
    first, last = (torch.load(tmp_path / f"stage{rank}.pt") for rank in range(2))
    assert first["losses"] == [] and last["losses"] == pytest.approx(losses, rel=1e-5)
    staged = {**first["grads"], **last["grads"]}
    assert staged.keys() == grads.keys()
    rank_layers = [{0, 2}, {1, 3}] if virtual else [{0, 1}, {2, 3}]
    for result, layers in zip((first, last), rank_layers):  # MoD layers (1 and 3) wherever they are
        mod = {int(name.split(".")[2]) for name in result["grads"] if ".mod_router." in name}
        assert mod == {layer for layer in layers if layer % 2 == 1}
        assert any("aux_router" in name for name in result["grads"])  # aux routers learn on every stage
    for name, grad in grads.items():
        torch.testing.assert_close(staged[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Each stage records the routing of its own layers (numbered as in the whole model).
    for result, expected in zip((first, last), rank_layers):
        assert {int(key.split("/")[1][5:]) for key in result["metrics"] if key.startswith("moma/layer")} == expected
