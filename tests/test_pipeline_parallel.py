"""Pipeline parallelism: a MoMaGPTModel split into two stages (PP=2, two gloo processes) and run by
Megatron-Core's own schedules (1F1B, and interleaved with two model chunks per rank) gives the losses and gradients of the whole model (PP=1) built from
the same weights, with 4t4i experts and Mixture-of-Depths layers on both stages and the aux routers
trained jointly, with and without full activation recompute. The first stage alone gets the tokens and
the last alone the labels; every stage gets the micro-batch's modality ids (a stage without tokens
could not derive them).

The ranks' forward step is moma_plugin.pipeline.forward_step. Stand-ins for the schedule's CUDA-bound calls, inside the ranks only (STAND_INS lists them); everything
else is Megatron-Core's code."""

import json
import os

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


def schedule_stand_ins():
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


def _rank(rank, world, port, workdir, recompute, virtual):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    schedule_stand_ins()
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
        chunk.load_state_dict({key: whole["state"][pipeline.whole_model_name(key, first_layers[-1])] for key in chunk.state_dict()})
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
        grads.update({pipeline.whole_model_name(name, first_layer): p.grad.clone() for name, p in chunk.named_parameters()
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


# -- moma-pretrain --pipeline-model-parallel-size ------------------------------------------------------
# A 4-layer 2t2i model with MoD layers, tied embeddings and aux routers trained jointly, on the bundled
# data; bf16 autocast in one case.
PRETRAIN = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--moma-experts", "2t2i", "--mod-interval", "2",
            "--mod-start-layer", "1", "--aux-router-joint", "--train-iters", "4", "--log-interval", "1",
            "--eval-interval", "100", "--eval-iters", "2", "--clip-grad", "0.05", "--no-progress-bar"]
PRETRAIN_STAND_INS = dict(STAND_INS, **{
    "Tensor.cuda": "returns the tensor: the last stage's copy of tied embeddings is moved to the GPU "
                   "before the first and last stages all-reduce it"})


def _pretrain_rank(rank, world, port, workdir, argv):
    """One process of a moma-pretrain job, as torchrun starts it, with the CUDA stand-ins. Every run
    starts from the same weights: the single-stage run saves its initial ones, a pipeline stage loads
    its layers of them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    schedule_stand_ins()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    from megatron.core import parallel_state

    from moma_plugin.training import loop

    build_model = loop.build_model

    def same_initial_weights(args, layout, parallel):
        model, config = build_model(args, layout, parallel)
        path = f"{workdir}/initial-tp{parallel.tp_rank}.pt"
        if parallel.pp == 1:
            if not os.path.exists(path):
                torch.save(model.state_dict(), path)
            return model, config
        whole = torch.load(path)
        first = parallel_state.get_pipeline_model_parallel_rank() * (args.num_layers // parallel.pp)
        names = {key: pipeline.whole_model_name(key, first) for key in model.state_dict()}
        if "output_layer.weight" in names and "output_layer.weight" not in whole:  # tied embeddings
            names["output_layer.weight"] = "embedding.word_embeddings.weight"
        model.load_state_dict({key: whole[name] for key, name in names.items()})
        return model, config

    loop.build_model = same_initial_weights
    result = loop.pretrain(argv)
    if rank == 0:
        with open(f"{workdir}/{result.run_dir.name}.json", "w") as f:
            json.dump({"losses": result.train_losses, "eval": result.eval, "status": result.status}, f)


def pretrain_run(tmp_path, name, processes, *flags):
    run_dir = tmp_path / name
    argv = [*PRETRAIN, "--run-dir", str(run_dir), *flags]
    run_ranks(_pretrain_rank, (processes, free_port(), str(tmp_path), argv), nprocs=processes, timeout_s=300,
              what=f"moma-pretrain {' '.join(flags)}")
    with open(tmp_path / f"{name}.json") as f:
        result = json.load(f)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, [m for m in metrics if m["kind"] == "train"]


@pytest.mark.parametrize("flags", [(), ("--bf16",), ("--mot", "all", "--moma-experts", "2t1i")],
                         ids=["fp32", "bf16", "mot"])
def test_moma_pretrain_with_two_pipeline_stages_equals_one(tmp_path, flags):
    """Losses, gradient norms (clipped), routing and aux-router metrics of every layer, and the
    held-out losses of a PP=2 run equal those of the same run on one stage, from the same weights;
    its checkpoint is one file per stage, resumes exactly, and merges into the single-stage one."""
    whole, whole_metrics = pretrain_run(tmp_path, "whole", 1, *flags)
    staged, staged_metrics = pretrain_run(tmp_path, "staged", 2, "--pipeline-model-parallel-size", "2", *flags)
    tolerance = dict(rel=1e-3 if "--bf16" in flags else 1e-5)  # bf16: rounding differs where stages meet
    assert staged["status"] == "completed" and list(staged["losses"]) == ["1", "2", "3", "4"]
    assert staged["losses"] == pytest.approx(whole["losses"], **tolerance)
    assert staged["eval"] == pytest.approx(whole["eval"], **tolerance)
    for one, two in zip(whole_metrics, staged_metrics):
        keys = [key for key in one if key.startswith(("moma/layer", "mod/layer", "aux/", "loss")) or key == "grad_norm"]
        assert {int(key.split("/")[1][5:]) for key in keys if key.startswith("moma/layer")} == {0, 1, 2, 3}
        assert [key for key in keys if one[key] is None] == [key for key in keys if two[key] is None]  # NaN
        keys = [key for key in keys if one[key] is not None]
        assert {key: two[key] for key in keys} == pytest.approx({key: one[key] for key in keys}, **tolerance)
    if "--bf16" in flags:
        return
    checkpoints = tmp_path / "staged" / "checkpoints"
    assert sorted(p.name for p in (checkpoints / "iter_0000004").glob("mp_rank_*")) == ["mp_rank_00_000",
                                                                                          "mp_rank_00_001"]
    # Stopped at iteration 2 and resumed: the same losses as the uninterrupted run.
    stopped, _ = pretrain_run(tmp_path, "resumed", 2, "--pipeline-model-parallel-size", "2", "--exit-interval", "2",
                              *flags)
    resumed, _ = pretrain_run(tmp_path, "resumed", 2, "--pipeline-model-parallel-size", "2", *flags)
    assert stopped["status"] == "exit-interval" and list(resumed["losses"]) == ["3", "4"]
    assert resumed["losses"] == pytest.approx({k: v for k, v in staged["losses"].items() if k in "34"}, rel=1e-6)
    # The stages merged into one file hold the single-stage run's weights.
    from moma_plugin.training import checkpointing, convert
    from moma_plugin.training.from_checkpoint import checkpoint_args

    with pytest.raises(SystemExit, match="(?s)holds 2 pipeline stages.*moma-convert-checkpoint"):
        checkpoint_args(str(checkpoints))
    convert.convert(checkpoints, tmp_path / "merged")
    merged = checkpointing.load_checkpoint(tmp_path / "merged", 0)
    reference = checkpointing.load_checkpoint(tmp_path / "whole" / "checkpoints", 0)
    assert merged["args"]["pipeline_model_parallel_size"] == 1 and merged["optimizer"]["state"] is None
    assert merged["model"].keys() == reference["model"].keys()
    for name, value in reference["model"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(merged["model"][name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert checkpoint_args(str(tmp_path / "merged"))[1]["pipeline_model_parallel_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--global-batch-size", "16"), ("--tensor-model-parallel-size", "2")],
                         ids=["dp2", "tp2"])
def test_pipeline_stages_with_data_or_tensor_parallelism(tmp_path, flags):
    """PP=2 x DP=2 (gradients averaged over data-parallel ranks after the schedule, tied embeddings
    summed over the first and last stages) and PP=2 x TP=2 (four processes) equal DP=2 and TP=2 alone."""
    whole, whole_metrics = pretrain_run(tmp_path, "whole", 2, *flags)
    staged, staged_metrics = pretrain_run(tmp_path, "staged", 4, "--pipeline-model-parallel-size", "2", *flags)
    assert staged["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert staged["eval"] == pytest.approx(whole["eval"], rel=1e-5)
    assert [m["grad_norm"] for m in staged_metrics] == pytest.approx([m["grad_norm"] for m in whole_metrics], rel=1e-5)


def test_pipeline_refusals(megatron_single_process, tmp_path, capsys):
    """What moma-pretrain cannot run with pipeline stages is refused before anything is built, each
    with what to do instead; on a machine without CUDA, so is pipeline parallelism itself."""
    from moma_plugin.training import loop

    def fails(argv, message):
        with pytest.raises(SystemExit) as error:
            loop.pretrain([*PRETRAIN, "--run-dir", str(tmp_path / "r"), "--pipeline-model-parallel-size", *argv])
        said = str(error.value) + capsys.readouterr().err  # usage errors: argparse's message on stderr
        assert message in said, said

    fails(["3"], "--num-layers 4 is not a multiple of it")
    fails(["2", "--use-torch-fsdp2"], "runs under the default ddp engine only, not --use-torch-fsdp2")
    fails(["2", "--expert-model-parallel-size", "2"], "with --expert-model-parallel-size 2 is not supported yet")
    fails(["0"], "must be at least 1, got 0")
    if not torch.cuda.is_available():
        fails(["2"], "--pipeline-model-parallel-size needs CUDA: Megatron-Core's pipeline schedules allocate")
