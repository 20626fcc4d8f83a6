"""FLOPs from the config against the matmuls a forward pass actually executes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moma_plugin.flops import forward_flops_per_token, training_flops_per_token

from .helpers import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")
aten = torch.ops.aten


# FlopCounterMode passes the shapes of the operands to these formulas.
def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    b, heads, s, d = query
    return 2 * 2 * b * heads * s * key[2] * d  # q k^T and (softmax) v


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs):
    return 2 * a[0] * a[1] * b[-1]


COUNTERS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
            aten._grouped_mm: _grouped_mm_flops}


def executed_flops(model, tokens, modality_ids):
    batch, seq = tokens.shape
    positions = torch.arange(seq).expand(batch, seq)
    with FlopCounterMode(display=False, custom_mapping=COUNTERS) as counter:
        model(tokens, positions, None, modality_ids=modality_ids)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "experts, modalities, text_tokens",
    [("dense", ("text", "image"), 32), ("2t2i", ("text", "image"), 32), ("8x", ("text", "image"), 32),
     ("7t1i", ("text", "image"), 56), ("4t4i", ("text", "image"), 40),
     ("2t2i1s", ("text", "image", "speech"), 32)],
)
@pytest.mark.parametrize("execution", ["loop", "grouped"])
def test_config_flops_equal_counted_matmuls(experts, modalities, text_tokens, execution):
    config = tiny_config(moma_experts=experts, moma_modalities=modalities,
                         moma_expert_execution=execution)
    _check_counted(config, 2, text_tokens)


def _check_counted(config, batch, text_tokens, seq=32, vocab=64):
    """The config's FLOPs per token times the tokens equal the matmuls a forward executes, on a
    micro-batch with ``text_tokens`` text tokens (modality counts divisible by every group's expert
    count, so capacity is exact), 8 speech tokens with three modalities, the rest image."""
    model = tiny_model(config, vocab_size=vocab, seq_length=seq)
    ids = torch.ones(batch * seq, dtype=torch.long)
    ids[:text_tokens] = 0
    if config.num_modalities == 3:
        ids[-8:] = 2
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    shares = torch.bincount(ids, minlength=config.num_modalities).double() / ids.numel()
    tokens = torch.randint(0, vocab, (batch, seq))
    expected = forward_flops_per_token(config, seq, vocab, shares.tolist())["total"] * batch * seq
    assert executed_flops(model, tokens, ids.view(batch, seq)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("experts, modalities, text_tokens, extra", [
    ("1t1i", ("text", "image"), 32, dict(mot="all")),
    ("4t1i", ("text", "image"), 40, dict(mot="all")),
    ("1t1i1s", ("text", "image", "speech"), 32, dict(mot="ffn,attention", mod_interval=2)),
    ("2t2i", ("text", "image"), 24, dict(moma_soft_moe_slots=2, moma_bidirectional=True)),
])
def test_mot_and_soft_moe_flops_equal_counted_matmuls(experts, modalities, text_tokens, extra):
    """(One sample with MoD layers: the packed sequence is then exactly k_d tokens long.)"""
    batch = 1 if extra.get("mod_interval") else 2
    config = tiny_config(moma_experts=experts, moma_modalities=modalities, moma_expert_execution="loop",
                         num_layers=4, **extra)
    _check_counted(config, batch, text_tokens * batch // 2)


def test_mot_costs_what_dense_costs():
    dense = forward_flops_per_token(tiny_config(moma_experts="dense"), 4096, 65536)
    for experts, mot in (("1t1i", "all"), ("1t1i", "ffn"), ("dense", "attention,norms")):
        assert forward_flops_per_token(tiny_config(moma_experts=experts, mot=mot), 4096, 65536) == dense


def test_flops_matched_moma_equals_dense_ffn():
    dense = forward_flops_per_token(tiny_config(moma_experts="dense"), 4096, 65536)
    moma = forward_flops_per_token(tiny_config(moma_experts="4t4i"), 4096, 65536)
    assert moma["ffn"] == dense["ffn"]  # capacity 1/|E| per expert: one expert pass per token
    assert moma["total"] - dense["total"] == moma["router"] > 0
    double = forward_flops_per_token(tiny_config(moma_experts="4t4i", moma_capacity_factor=2.0),
                                     4096, 65536)
    assert double["ffn"] == 2 * dense["ffn"]
    assert training_flops_per_token(tiny_config(moma_experts="4t4i"), 4096, 65536) == 3 * moma["total"]


def test_bad_shares_are_a_clear_error():
    with pytest.raises(ValueError, match="one share per modality"):
        forward_flops_per_token(tiny_config(), 128, 64, [1.0])


@pytest.mark.parametrize("experts", ["dense", "1t1i"])
@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_mod_flops_equal_counted_matmuls(experts, capacity):
    """One sample, so the packed sequence of a MoD layer is exactly k_d tokens long; one expert per
    group, so its capacity is exact whatever the selection's modality mix."""
    seq, vocab = 32, 64
    config = tiny_config(num_layers=4, moma_experts=experts, mod_interval=2, mod_capacity=capacity,
                         moma_expert_execution="loop")
    model = tiny_model(config, vocab_size=vocab, seq_length=seq)
    ids = (torch.arange(seq) % 2).view(1, seq)
    tokens = torch.randint(0, vocab, (1, seq))
    expected = forward_flops_per_token(config, seq, vocab, [0.5, 0.5])["total"] * seq
    assert executed_flops(model, tokens, ids) == pytest.approx(expected, rel=1e-9)
    dense_layers = forward_flops_per_token(tiny_config(num_layers=4, moma_experts=experts), seq, vocab)
    assert expected / seq < dense_layers["total"]  # MoD layers really are cheaper


def test_aux_router_flops_only_when_trained_alongside():
    config = tiny_config(num_layers=4, mod_interval=2)
    without = forward_flops_per_token(config, 32, 64)
    with_aux = forward_flops_per_token(config, 32, 64, aux_routers=True)
    h = config.hidden_size
    assert without["aux_routers"] == 0
    # Full layers: 2 groups' routers, weighted by share; MoD layers: a quarter of that plus their own.
    per_group_layer = 2 * h * (h // 2) + 2 * (h // 2) * 2
    expected = (2 + 2 * 0.25) * per_group_layer + 2 * (2 * h * (h // 2) + 2 * (h // 2))
    assert with_aux["aux_routers"] == pytest.approx(expected)
    assert with_aux["total"] - without["total"] == pytest.approx(expected)
