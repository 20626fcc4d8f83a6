"""Expert-choice routing inside one expert group: pure tensor math, no Megatron, no process groups.

Shapes: T tokens of the group, E experts of the group, C tokens per expert (the capacity k_e).
"""

from typing import Tuple

import torch
from torch import Tensor


def linear_fp32(x: Tensor, weight: Tensor) -> Tensor:
    """``x W^T`` in float32, also under bf16 autocast (routers and their scores stay fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float())


def sigmoid_scores(logits_TE: Tensor, gumbel_noise: bool = False) -> Tensor:
    """Router scores g(x) = sigmoid(x W) in float32; each token's score ignores every other token.

    With ``gumbel_noise`` the logits get G' - G'' (two independent Gumbel samples), i.e. the
    Gumbel-sigmoid used for upcycling. G' - G'' is logistic, sampled here as log(u) - log(1 - u).
    """
    logits_TE = logits_TE.float()
    if gumbel_noise:
        u = torch.rand_like(logits_TE).clamp_(1e-6, 1 - 1e-6)
        logits_TE = logits_TE + (torch.log(u) - torch.log1p(-u))
    return torch.sigmoid(logits_TE)


def expert_choice(scores_TE: Tensor, capacity: int) -> Tuple[Tensor, Tensor]:
    """Each expert takes the ``capacity`` tokens it scores highest (Zhou et al. 2022).

    A token may be taken by 0, 1 or several experts. Returns ``token_index_EC`` (indices into the
    group's T tokens) and ``gate_EC`` (the chosen scores, differentiable).
    """
    gate_CE, token_index_CE = scores_TE.topk(capacity, dim=0, sorted=False)
    return token_index_CE.t(), gate_CE.t()


def balanced_choice(scores_TE: Tensor, capacity: int) -> Tuple[Tensor, Tensor]:
    """Debug routing with a perfectly even load: expert e takes tokens e, e+E, e+2E, ... (mod T).

    The gates are still the router's scores, so the router stays on the gradient path.
    """
    num_tokens, num_experts = scores_TE.shape
    if capacity == 0 or num_tokens == 0:
        empty = scores_TE.new_zeros((num_experts, 0))
        return empty.long(), empty
    experts_E1 = torch.arange(num_experts, device=scores_TE.device).unsqueeze(1)
    slots_1C = torch.arange(capacity, device=scores_TE.device).unsqueeze(0)
    token_index_EC = (experts_E1 + num_experts * slots_1C) % num_tokens
    return token_index_EC, scores_TE[token_index_EC, experts_E1]


def expert_choice_reference(scores_TE: Tensor, capacity: int) -> Tuple[Tensor, Tensor]:
    """Slow expert choice, one expert at a time by a full sort: the definition, for tests."""
    indices, gates = [], []
    for expert in range(scores_TE.shape[1]):
        order = torch.argsort(scores_TE[:, expert], descending=True, stable=True)[:capacity]
        indices.append(order)
        gates.append(scores_TE[order, expert])
    return torch.stack(indices), torch.stack(gates)


def threshold_choice(chosen_TE: Tensor, scores_TE: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Causal routing: expert e takes exactly the tokens whose ``chosen_TE[:, e]`` is True (the aux
    router said yes), so what a token gets depends on that token alone.

    Returns ``token_index_A`` and ``gate_A`` sorted by expert (tokens ascending within an expert), and
    ``tokens_per_expert_E`` (a device tensor; the caller reads it once for all groups).
    """
    expert_A, token_A = chosen_TE.t().nonzero(as_tuple=True)
    return token_A, scores_TE[token_A, expert_A], chosen_TE.sum(0)


def threshold_choice_reference(chosen_TE: Tensor, scores_TE: Tensor):
    """Slow causal routing, token by token in Python: the definition, for tests."""
    tokens, gates, counts = [], [], []
    for expert in range(chosen_TE.shape[1]):
        picked = [t for t in range(chosen_TE.shape[0]) if bool(chosen_TE[t, expert])]
        tokens.extend(picked)
        gates.extend(float(scores_TE[t, expert]) for t in picked)
        counts.append(len(picked))
    return tokens, gates, counts
