"""SDPACoreAttention against an explicit softmax(q k^T / sqrt(d) + mask) v reference."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

import moma_plugin as mp

from .helpers import tiny_config


def reference_attention(q, k, v, masked_out=None):
    """q [s, b, n, d], k/v [s, b, g, d]; masked_out [b or 1, 1, s, s] True = excluded."""
    s, b, n, d = q.shape
    k = k.repeat_interleave(n // k.shape[2], dim=2)
    v = v.repeat_interleave(n // v.shape[2], dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(d)
    if masked_out is not None:
        scores = scores.masked_fill(masked_out, float("-inf"))
    out = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v)
    return out.reshape(s, b, n * d)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_causal_attention_matches_reference(kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(10, 3, 4, 8, generator=g)
    k, v = (torch.randn(10, 3, kv_heads, 8, generator=g) for _ in range(2))
    attention = mp.SDPACoreAttention(tiny_config(), 1, AttnMaskType.causal)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1).view(1, 1, 10, 10)
    torch.testing.assert_close(attention(q, k, v, None), reference_attention(q, k, v, causal))


def test_padding_mask_follows_megatron_convention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, 2, 2, 8, generator=g) for _ in range(3))
    masked_out = torch.rand(2, 1, 6, 6, generator=g) > 0.6
    masked_out[..., 0] = False  # every query keeps at least one key
    attention = mp.SDPACoreAttention(tiny_config(), 1, AttnMaskType.padding)
    torch.testing.assert_close(attention(q, k, v, masked_out),
                               reference_attention(q, k, v, masked_out))


def test_hidden_size_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_size % heads"):
        tiny_config(hidden_size=30, num_attention_heads=4)
