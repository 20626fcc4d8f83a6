"""Tensor parallelism: a MoMaGPTModel split over two gloo processes (TP=2) gives the logits, loss and
gradients of the TP=1 model built from the same weights.

The TP=1 references are computed in the pytest process; one spawn of two ranks then runs every variant
(expert executions 'loop', 'chunked', 'grouped', 'padded', with and without biases) on weights sharded
from the TP=1 state dict the way Megatron shards a master weight. Ranks write their results to files
that the tests compare; an exception in a rank fails the fixture (spawn re-raises it), a hang fails it
after ``JOIN_TIMEOUT_S``.
"""

import contextlib
import os
import re
from collections import Counter
from unittest import mock

import pytest
import torch

import moma_plugin as mp
from moma_plugin import layer as layer_module
from moma_plugin import experts as experts_module
from moma_plugin.experts import tp_shard

from .conftest import free_port, run_ranks
from .helpers import random_batch, sequence_parallel_stand_ins, tiny_config, tiny_model

TP = 2
JOIN_TIMEOUT_S = 90
BATCH, SEQ, VOCAB = 2, 16, 64

# name -> (config overrides, expert path that must run). Sizes keep every fp32 row stride of the
# per-rank expert weights a multiple of 16 bytes (H=32, 2F=64, F=32 at TP=2), so 'grouped' really
# runs torch._grouped_mm on CPU.
_BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)
VARIANTS = {
    "loop": (dict(_BASE, moma_experts="2t2i", moma_expert_execution="loop"), "loop"),
    "grouped": (dict(_BASE, moma_experts="2t2i", moma_expert_execution="grouped"), "grouped"),
    "padded": (dict(_BASE, moma_experts="2t2i", moma_expert_execution="padded"), "padded"),
    "chunked": (dict(_BASE, moma_experts="2t2i", moma_expert_execution="chunked"), "chunked"),
    "chunked-bias-3x": (dict(_BASE, moma_experts="3x", add_bias_linear=True,
                             moma_expert_execution="chunked"), "chunked"),
    "loop-bias-3x": (dict(_BASE, moma_experts="3x", add_bias_linear=True,
                          moma_expert_execution="loop"), "loop"),
    "grouped-bias-3x": (dict(_BASE, moma_experts="3x", add_bias_linear=True,
                             moma_expert_execution="grouped"), "grouped"),
    "padded-bias-3x": (dict(_BASE, moma_experts="3x", add_bias_linear=True,
                            moma_expert_execution="padded"), "padded"),
    # Sequence parallelism: each TP rank holds a chunk of the sequence between the sublayers; the
    # reference is the same model at TP=1 without it. 'mod': layer 1 is a Mixture-of-Depths layer
    # choosing 13 of 32 tokens (an odd count: its MLP input is padded to a multiple of TP), with
    # post-norms and biases (row-parallel biases are sequence-parallel parameters too).
    "sp-chunked": (dict(_BASE, moma_experts="2t2i", moma_expert_execution="chunked",
                        sequence_parallel=True), "chunked"),
    "sp-mod": (dict(_BASE, moma_experts="2t2i", moma_expert_execution="loop", sequence_parallel=True,
                    mod_interval=2, mod_start_layer=1, mod_capacity=0.4, moma_post_norm=True,
                    add_bias_linear=True), "loop"),
    # Mixture-of-Transformers: projections and norms per modality (stacked [M, ...] weights), an
    # untied image FFN beside a 2-expert text MoE; under SP with a MoD layer, post-norms and biases.
    "mot": (dict(_BASE, moma_experts="2t1i", mot="all", add_bias_linear=True,
                 moma_expert_execution="loop"), "loop"),
    "sp-mot-mod": (dict(_BASE, moma_experts="2t1i", mot="all", moma_expert_execution="loop",
                        sequence_parallel=True, mod_interval=2, mod_start_layer=1, mod_capacity=0.4,
                        moma_post_norm=True, add_bias_linear=True), "loop"),
    # Soft MoE in a bidirectional stack: replicated slot parameters, experts split as MoMa's.
    "soft-moe": (dict(_BASE, moma_experts="2t2i", moma_soft_moe_slots=2, moma_bidirectional=True,
                      moma_expert_execution="chunked"), "chunked"),
    "sp-soft-moe": (dict(_BASE, moma_experts="2x", moma_soft_moe_slots=3, moma_bidirectional=True,
                         moma_expert_execution="loop", sequence_parallel=True, add_bias_linear=True), "loop"),
}


def without_sequence_parallel(overrides):
    return {k: v for k, v in overrides.items() if k != "sequence_parallel"}

# Run at TP=1 on each rank's own process group while the global TP size is 2.
OWN_GROUP_VARIANTS = ("loop", "chunked", "grouped", "padded")

# Parameters Megatron splits across TP ranks (with their partition dim and stride); all others are
# replicated, the MoMa routers among them.
EXPECTED_SPLITS = [
    (r"embedding\.word_embeddings\.weight", 0, 1),
    (r"output_layer\.weight", 0, 1),
    (r".*\.self_attention\.linear_qkv\.(weight|bias)", 0, 1),
    (r".*\.self_attention\.linear_proj\.weight", 1, 1),
    (r".*\.mlp\.experts\.fc1_(weight|bias)", 1, 2),  # [E, 2F, H]: SwiGLU [gate; up] per expert
    (r".*\.mlp\.experts\.fc2_weight", 2, 1),  # [E, H, F]
]
# The same split in checkpoint (per-expert) names: [2F, H] and [H, F] per expert.
CHECKPOINT_SPLITS = EXPECTED_SPLITS[:4] + [
    (r".*\.mlp\.experts\.\w+\.\d+\.linear_fc1\.(weight|bias)", 0, 2),
    (r".*\.mlp\.experts\.\w+\.\d+\.linear_fc2\.weight", 1, 1),
    # MoT: one tensor per modality, split as the tied projection is.
    (r".*\.self_attention\.linear_qkv\.[a-z]+\.(weight|bias)", 0, 1),
    (r".*\.self_attention\.linear_proj\.[a-z]+\.weight", 1, 1),
]


# MoT's stacked per-modality projections: [M, out, in], split along out (QKV) or in (output projection).
MOT_SPLITS = [
    (r".*\.self_attention\.linear_qkv\.(weight|bias)", 1, 1),
    (r".*\.self_attention\.linear_proj\.weight", 2, 1),
]


def expected_splits(variant: str):
    return MOT_SPLITS + EXPECTED_SPLITS if "mot" in variant else EXPECTED_SPLITS


def split_of(name: str, splits=EXPECTED_SPLITS):
    """(partition dim, stride) of the tensor ``name`` by the tables above; None when replicated."""
    found = [(d, s) for pattern, d, s in splits if re.fullmatch(pattern, name)]
    return found[0] if found else None


def shard_checkpoint_tensor(full: torch.Tensor, name: str, rank: int, world: int) -> torch.Tensor:
    """``shard`` for a state-dict entry (experts under their per-expert names)."""
    split = split_of(name, CHECKPOINT_SPLITS)
    if split is None:
        return full
    param = torch.nn.Parameter(full.new_empty(0))
    param.tensor_model_parallel, (param.partition_dim, param.partition_stride) = True, split
    return shard(full, param, rank, world)


def shard(full: torch.Tensor, param: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a TP=1 tensor, as megatron.core.tensor_parallel.layers.
    _initialize_affine_weight_cpu splits a master weight: torch.split into pieces of
    per_partition_size // stride along partition_dim, rank r taking pieces r, r + world, ...
    (the SwiGLU fc1 has stride 2: each rank holds its slice of the gate and its slice of the up
    projection). Parameters without ``tensor_model_parallel`` are replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    per_partition = full.shape[dim] // world
    assert per_partition * world == full.shape[dim] and per_partition % stride == 0
    pieces = torch.split(full, per_partition // stride, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


@contextlib.contextmanager
def expert_paths():
    """Counts which expert implementation ``experts.run_experts`` calls."""
    calls = Counter()

    def counting(name):
        original = getattr(experts_module, name)

        def wrapper(*args, **kwargs):
            calls[name.replace("run_experts_", "")] += 1
            return original(*args, **kwargs)

        return mock.patch.object(experts_module, name, wrapper)

    with contextlib.ExitStack() as stack:
        for name in ("run_experts_loop", "run_experts_chunked", "run_experts_grouped",
                     "run_experts_padded"):
            stack.enter_context(counting(name))
        yield calls


def run_variant(model, batch, loss_weights, path, tp_group=None):
    """Logits (local vocab shard), per-token loss, gradients, and the expert paths that ran. With a
    ``tp_group``, the gradients of sequence-parallel parameters are summed over it, as the engines
    do after the backward."""
    from moma_plugin.training.engines.base import reduce_sequence_parallel_gradients

    tokens, position_ids, modality_ids = batch
    with expert_paths() as calls:
        logits = model(tokens, position_ids, None, modality_ids=modality_ids).detach()
        loss = model(tokens, position_ids, None, labels=tokens, modality_ids=modality_ids)
        (loss * loss_weights).sum().backward()
    if tp_group is not None:
        reduce_sequence_parallel_gradients(model, tp_group)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits, loss.detach(), grads, dict(calls)


def run_logits_only(model, batch, path):
    """Logits and the gradients of a fixed random projection of them. Used where Megatron's own
    loss cannot run: its non-fused vocab-parallel cross entropy always reduces over the global TP
    group, whatever the model's ``pg_collection`` says."""
    tokens, position_ids, modality_ids = batch
    with expert_paths() as calls:
        logits = model(tokens, position_ids, None, modality_ids=modality_ids)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
        (logits * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, dict(calls)


def _rank_main(rank: int, port: int, payload_path: str, result_dir: str):
    torch.set_num_threads(1)  # two ranks on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=TP)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    assert parallel_state.get_tensor_model_parallel_rank() == rank
    payload = torch.load(payload_path, weights_only=False)
    batch, loss_weights = payload["batch"], payload["loss_weights"]
    for variant, (overrides, path) in VARIANTS.items():
        sp = overrides.get("sequence_parallel")
        # MoD layers: the longest sample's count of chosen tokens, and under SP the (rows, batch)
        # of the sequence each sublayer got.
        packed_lengths, split_lengths = [], []
        original_pack, original_split = layer_module.pack_by_sample, layer_module._split_sequence

        def recording_pack(selected_K, batch):
            packed_index_K, counts_B = original_pack(selected_K, batch)
            packed_lengths.append(int(counts_B.max()))
            return packed_index_K, counts_B

        def recording_split(sublayer, x_SBH, tp_group):
            split_lengths.append(tuple(x_SBH.shape[:2]))
            return original_split(sublayer, x_SBH, tp_group)

        with sequence_parallel_stand_ins() if sp else contextlib.nullcontext(), \
                mock.patch.object(layer_module, "pack_by_sample", recording_pack), \
                mock.patch.object(layer_module, "_split_sequence", recording_split):
            model = tiny_model(tiny_config(tensor_model_parallel_size=TP, **overrides),
                               vocab_size=VOCAB, seq_length=SEQ, seed=1000 + rank)
            params = dict(model.named_parameters())
            model.load_state_dict(
                {name: shard_checkpoint_tensor(full, name, rank, TP)
                 for name, full in payload["states"][variant].items()},
                strict=True,
            )
            logits, loss, grads, calls = run_variant(
                model, batch, loss_weights, path, tp_group=parallel_state.get_tensor_model_parallel_group())
        decode_refusal = None
        if sp:  # KV-cache decoding says it does not run under SP (moma-generate turns SP off)
            layer = model.decoder.layers[0]
            layer.routing_mode = "causal"  # (its aux routers are untrained: set on the layer alone)
            try:
                layer.decode(None, None, None, None, None)
            except NotImplementedError as e:
                decode_refusal = str(e)
        pieces = [torch.empty_like(logits) for _ in range(TP)]
        torch.distributed.all_gather(pieces, logits.contiguous())  # vocab shards, in rank order
        torch.save(
            {
                "logits": torch.cat(pieces, dim=-1),
                "local_vocab": logits.shape[-1],
                "loss": loss,
                "grads": grads,
                "splits": {n: (p.partition_dim, p.partition_stride) for n, p in params.items()
                           if getattr(p, "tensor_model_parallel", False)},
                "calls": calls,
                "packed_lengths": packed_lengths,
                "split_lengths": split_lengths,
                "decode_refusal": decode_refusal,
            },
            os.path.join(result_dir, f"{variant}-rank{rank}.pt"),
        )
    # A model handed its own process groups (here: TP=1 on each rank while the global TP size is 2)
    # must reduce over its own TP group, not the global one, on every expert path.
    from megatron.core.process_groups_config import ProcessGroupCollection

    solo_groups = [torch.distributed.new_group([r]) for r in range(TP)]  # collective: every rank
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    pg_collection.tp = solo_groups[rank]
    for variant in OWN_GROUP_VARIANTS:
        overrides, path = VARIANTS[variant]
        config = tiny_config(**overrides)
        model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False),
                                vocab_size=VOCAB, max_sequence_length=SEQ,
                                pg_collection=pg_collection)
        model.load_state_dict(payload["states"][variant], strict=True)
        logits, grads, calls = run_logits_only(model, batch, path)
        torch.save({"logits": logits, "grads": grads, "calls": calls},
                   os.path.join(result_dir, f"own-group-{variant}-rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(megatron_single_process, tmp_path_factory):
    """{variant: (TP=1 reference, [rank 0 result, rank 1 result])}."""
    workdir = tmp_path_factory.mktemp("tensor_parallel")
    batch = random_batch(BATCH, SEQ, VOCAB)
    loss_weights = torch.rand(BATCH, SEQ, generator=torch.Generator().manual_seed(5))
    references, states = {}, {}
    for variant, (overrides, path) in VARIANTS.items():
        model = tiny_model(tiny_config(**without_sequence_parallel(overrides)), vocab_size=VOCAB,
                           seq_length=SEQ, seed=0)
        states[variant] = model.state_dict()
        logits, loss, grads, calls = run_variant(model, batch, loss_weights, path)
        references[variant] = dict(logits=logits, loss=loss, grads=grads, calls=calls,
                                   params=dict(model.named_parameters()))
    for variant in OWN_GROUP_VARIANTS:
        model = tiny_model(tiny_config(**VARIANTS[variant][0]), vocab_size=VOCAB, seq_length=SEQ)
        model.load_state_dict(states[variant])
        logits, grads, calls = run_logits_only(model, batch, VARIANTS[variant][1])
        references[f"own-group-{variant}"] = dict(logits=logits, grads=grads, calls=calls)
    payload_path = workdir / "payload.pt"
    torch.save({"states": states, "batch": batch, "loss_weights": loss_weights}, payload_path)

    run_ranks(_rank_main, (free_port(), str(payload_path), str(workdir)), nprocs=TP,
              timeout_s=JOIN_TIMEOUT_S, what=f"TP={TP} ranks")
    results = {
        variant: (references[variant],
                  [torch.load(workdir / f"{variant}-rank{rank}.pt", weights_only=False)
                   for rank in range(TP)])
        for variant in VARIANTS
    }
    for variant in OWN_GROUP_VARIANTS:
        results[f"own-group-{variant}"] = (
            references[f"own-group-{variant}"],
            [torch.load(workdir / f"own-group-{variant}-rank{rank}.pt", weights_only=False)
             for rank in range(TP)])
    return results


def test_shard_matches_megatron_master_weight_split():
    """The helpers reproduce Megatron's own split of a master weight (stride 1 and 2)."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    master = torch.arange(8 * 6, dtype=torch.float32).view(8, 6)
    for dim, stride in ((0, 1), (0, 2), (1, 1)):
        for rank in range(TP):
            size = master.shape[dim] // TP
            weight = torch.nn.Parameter(torch.empty(size if dim == 0 else 8, 6 if dim == 0 else size))
            _initialize_affine_weight_cpu(weight, 8, 6, size, dim, lambda w: w.copy_(master),
                                          stride=stride, rank=rank, world_size=TP)
            assert (weight.partition_dim, weight.partition_stride) == (dim, stride)
            torch.testing.assert_close(shard(master, weight, rank, TP), weight.data, rtol=0, atol=0)
            # and so does the split StackedExperts initialises each expert's slice with
            torch.testing.assert_close(tp_shard(master, dim, stride, rank, TP), weight.data,
                                       rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_matches_tp1(tp_results, variant):
    reference, ranks = tp_results[variant]
    _, path = VARIANTS[variant]
    num_layers = _BASE["num_layers"]
    assert reference["calls"] == {path: 2 * num_layers}, reference["calls"]  # two forwards
    params = reference["params"]
    for rank, result in enumerate(ranks):
        where = f"{variant}, rank {rank}"
        # The expert implementation under test really ran on this rank (no silent fallback).
        assert result["calls"] == {path: 2 * num_layers}, (where, result["calls"])
        # The model really is split: experts, attention and vocab over TP ranks, routers replicated.
        for name in params:
            assert result["splits"].get(name) == split_of(name, expected_splits(variant)), (where, name)
        assert result["local_vocab"] == VOCAB // TP

        torch.testing.assert_close(result["logits"], reference["logits"], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{where}: logits\n{m}")
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{where}: loss\n{m}")

        assert result["grads"].keys() == {n for n, p in params.items() if "aux_router" not in n}
        assert any(".mlp.router." in n or ".mlp.slots." in n for n in params)
        assert any(re.fullmatch(r".*\.experts\.fc2_weight", n) for n in params)
        for name, grad in result["grads"].items():
            # Replicated parameters (routers, norms, ...) get the full TP=1 gradient on every rank;
            # split ones get this rank's slice of it. Gradients here are ~1e-3: the absolute
            # tolerance scales with each tensor (observed TP=1 vs TP=2 differences are < 1e-6 of it).
            expected = shard(reference["grads"][name], params[name], rank, TP)
            scale = expected.abs().max().item()
            assert scale > 0 and grad.abs().max() > 0, (where, name)
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=2e-5 * scale,
                                       msg=lambda m, name=name: f"{where}: grad of {name}\n{m}")


def test_sequence_parallel_mod_layer_pads_attention_and_mlp_inputs(tp_results):
    """The 'sp-mod' variant exercises both paddings to a multiple of TP: the packed sequence of
    attention ([s', b], s' the longest sample's count of chosen tokens: odd here) and the chosen
    tokens of the MLP ([k, 1], k odd)."""
    _, ranks = tp_results["sp-mod"]
    for result in ranks:
        packed, lengths = result["packed_lengths"], result["split_lengths"]
        attention = [s for s, b in lengths if b == BATCH]
        assert any(p % TP for p in packed), packed
        assert attention == [-(-p // TP) * TP for p in packed], (packed, attention)
        assert any(b == 1 and s % TP for s, b in lengths), lengths


@pytest.mark.parametrize("variant", ["sp-chunked", "sp-mod"])
def test_kv_cache_decoding_under_sequence_parallelism_is_refused(tp_results, variant):
    for result in tp_results[variant][1]:
        assert result["decode_refusal"].startswith(
            "KV-cache decoding does not run under sequence parallelism; build the model with "
            "sequence_parallel=False"), result["decode_refusal"]


@pytest.mark.parametrize("variant", OWN_GROUP_VARIANTS)
def test_model_reduces_over_its_own_tp_group(tp_results, variant):
    """A model built with ``pg_collection`` (TP=1 per rank) while Megatron's global TP size is 2
    equals the single-process TP=1 model: no expert path reduces over the global TP group.
    (Reducing over the global group doubles the expert outputs here.)"""
    reference, ranks = tp_results[f"own-group-{variant}"]
    _, path = VARIANTS[variant]
    for rank, result in enumerate(ranks):
        assert result["calls"] == {path: _BASE["num_layers"]}, (rank, result["calls"])
        torch.testing.assert_close(result["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, reference["grads"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"rank {rank}: grad of {name}\n{m}")
