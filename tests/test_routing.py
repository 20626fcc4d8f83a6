import torch

from moma_plugin.layout import build_modality_layout, modality_ids_from_tokens
from moma_plugin.routing import (
    balanced_choice,
    expert_choice,
    expert_choice_reference,
    sigmoid_scores,
)

import pytest


@pytest.mark.parametrize("seed", range(5))
def test_expert_choice_matches_sort_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(37, 4, generator=g)
    capacity = 10
    index, gate = expert_choice(scores, capacity)
    ref_index, ref_gate = expert_choice_reference(scores, capacity)
    assert index.shape == (4, capacity)
    for e in range(4):  # same set of tokens per expert (topk order is unspecified)
        assert set(index[e].tolist()) == set(ref_index[e].tolist())
        assert torch.equal(gate[e].sort().values, ref_gate[e].sort().values)
        assert torch.equal(gate[e], scores[index[e], e])


def test_sigmoid_scores_are_per_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=g)
    full = sigmoid_scores(logits)
    alone = torch.cat([sigmoid_scores(logits[i : i + 1]) for i in range(8)])
    # Unlike softmax over tokens, no token sees another (up to the last bit: the CPU's vectorised
    # sigmoid and its tail loop may round differently).
    torch.testing.assert_close(full, alone, rtol=1e-6, atol=0)
    assert full.dtype == torch.float32
    assert sigmoid_scores(logits.bfloat16()).dtype == torch.float32


def test_gumbel_noise_changes_scores_but_keeps_range():
    torch.manual_seed(0)
    logits = torch.zeros(1000, 2)
    noisy = sigmoid_scores(logits, gumbel_noise=True)
    assert not torch.allclose(noisy, torch.full_like(noisy, 0.5))
    assert 0.45 < noisy.mean().item() < 0.55  # logistic noise is symmetric around 0


def test_balanced_choice_even_load():
    scores = torch.rand(16, 4)
    index, gate = balanced_choice(scores, 4)
    assert sorted(index.reshape(-1).tolist()) == list(range(16))  # every token exactly once
    assert torch.equal(gate, scores[index, torch.arange(4).unsqueeze(1)])


def test_layout_counts_and_indices():
    ids_SB = torch.tensor([[0, 1], [1, 1], [0, 2]])
    layout = build_modality_layout(ids_SB, 3)
    assert layout.counts == (2, 3, 1)
    assert layout.token_indices([1]).tolist() == [1, 2, 3]
    assert layout.token_indices([0, 2]).tolist() == [0, 4, 5]
    assert layout.token_indices([0, 1, 2]).numel() == 6


def test_layout_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"outside \[0, 2\).*\[-1, 5\]"):
        build_modality_layout(torch.tensor([0, 1, 5, -1]), 2)


def test_modality_ids_from_vocab_ranges():
    tokens = torch.tensor([[3, 100, 150, 199, 200]])
    ids = modality_ids_from_tokens(tokens, {"image": (100, 200)}, ("text", "image"))
    assert ids.tolist() == [[0, 1, 1, 1, 0]]
