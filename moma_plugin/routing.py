"""Expert-choice routing inside one expert group: pure tensor math, no Megatron, no process groups.

Shapes: T tokens of the group, E experts of the group, C tokens per expert (the capacity k_e).
"""

from typing import Tuple

import torch
from torch import Tensor


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
