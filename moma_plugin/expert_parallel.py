"""Expert parallelism (EP) for MoMa layers: the experts of every modality group split across the
expert-parallel ranks (Megatron-Core's ``expert_model_parallel`` group), each chosen token sent to
the rank that holds its expert and its output sent back.

Placement (``local_experts``): each group's experts are cut into EP equal contiguous blocks and rank r
holds block r of every group. 4t4i at EP 2: rank 0 holds text 0-1 and image 0-1, rank 1 text 2-3 and
image 2-3, so every rank holds experts of every modality and its load follows the text:image ratio
the balanced sampler gives each rank. Experts keep their global names (``experts.image.3...``)
whatever the EP size, so a checkpoint moves between EP sizes (``StackedExperts`` loads the experts it
holds; the engines gather the others' for the rank file).

Dispatch (``ExpertParallel.run``): each rank routes its own micro-batch (expert choice inside each
group over its own tokens, the routers replicated), which leaves its chosen rows sorted by global
expert with a count per expert. One all-gather of those counts tells every rank what it sends and
receives; the rows travel to their expert's owner (``all_to_all_single``, variable splits, autograd
through it), are regrouped by local expert, run through the local experts (the same runners as
without EP) and come back the same way. Every expert runs every step, with zero rows if need be, so
every rank takes part in the same collectives whatever its tokens.

Gradients: an expert's gradient on its owner sums the contributions of every EP rank's tokens; the
engine then reduces it over the expert-data-parallel group only (``engines/ddp.py``). Shapes: A
chosen (token, expert) rows of this rank, R rows received, H hidden.
"""

from typing import Callable, List, Sequence

import torch
from torch import Tensor


def local_experts(group_sizes: Sequence[int], ep: int, rank: int) -> List[int]:
    """Global indices (groups in order, experts within them) of the experts EP rank ``rank`` holds."""
    held, first = [], 0
    for size in group_sizes:
        block = size // ep
        held.extend(range(first + rank * block, first + (rank + 1) * block))
        first += size
    return held


def check_expert_parallel(groups, ep: int):
    """A ValueError when some group's experts cannot be split evenly over ``ep`` ranks."""
    bad = [f"{g.name} ({g.num_experts})" for g in groups if g.num_experts % ep]
    if bad:
        fitting = [n for n in range(1, min(g.num_experts for g in groups) + 1)
                   if all(g.num_experts % n == 0 for g in groups)]
        raise ValueError(
            f"{ep} expert-parallel ranks cannot split the experts of group(s) {', '.join(bad)} evenly "
            "(each EP rank holds the same number of experts of every group); pick an EP size that "
            f"divides every group's expert count: {', '.join(map(str, fitting))}")


class _AllToAll(torch.autograd.Function):
    """``torch.distributed.all_to_all_single`` with variable splits; its backward sends the
    gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        torch.distributed.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_splits, send_splits = ctx.splits
        out = grad.new_empty((sum(send_splits), *grad.shape[1:]))
        torch.distributed.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits,
                                            group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, recv_splits: List[int], send_splits: List[int], group) -> Tensor:
    """Rows ``send_splits[q]`` of ``x`` to rank q, ``recv_splits[q]`` rows from it (autograd-aware)."""
    return _AllToAll.apply(x, list(recv_splits), list(send_splits), group)


def _inverse(index: Tensor) -> Tensor:
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index), device=index.device)
    return inverse


def _ranges(starts: Sequence[int], counts: Sequence[int], order: Sequence[int], device) -> Tensor:
    """The rows [starts[i], starts[i] + counts[i]) for i in ``order``, concatenated."""
    pieces = [torch.arange(starts[i], starts[i] + counts[i], device=device) for i in order if counts[i]]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def _prefix(counts: Sequence[int]) -> List[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


class ExpertParallel:
    """The exchange of one layer's chosen rows over the EP group (see the module docstring)."""

    def __init__(self, group_sizes: Sequence[int], group):
        self.group = group
        self.size, self.rank = group.size(), group.rank()
        self.owned = [local_experts(group_sizes, self.size, q) for q in range(self.size)]

    def run(self, x_AH: Tensor, tokens_per_expert: Sequence[int],
            compute: Callable[[Tensor, List[int]], Tensor]) -> Tensor:
        """``x_AH``: this rank's chosen rows, sorted by global expert (``tokens_per_expert`` rows
        each); ``compute(rows, counts)`` runs the local experts. Returns their outputs, [A, H], in
        the order of ``x_AH``."""
        P, me = self.size, self.rank
        counts = torch.tensor(list(tokens_per_expert), dtype=torch.long, device=x_AH.device)
        everyone = [torch.empty_like(counts) for _ in range(P)]
        torch.distributed.all_gather(everyone, counts, group=self.group)
        counts_PE = [c.tolist() for c in everyone]
        mine = counts_PE[me]
        send_index = _ranges(_prefix(mine), mine, [e for q in range(P) for e in self.owned[q]],
                             x_AH.device)
        send_splits = [sum(mine[e] for e in self.owned[q]) for q in range(P)]
        recv_splits = [sum(counts_PE[q][e] for e in self.owned[me]) for q in range(P)]
        x_sent = x_AH[send_index]
        x_recv = all_to_all(x_sent, recv_splits, send_splits, self.group)
        # Received: from each source rank q, its rows for my experts, expert by expert. Regrouped
        # expert by expert (source ranks in order within each), as the runners take them.
        held = self.owned[me]
        block = [[counts_PE[q][e] for e in held] for q in range(P)]  # [P, local experts]
        starts = [_prefix(row) for row in block]
        first = _prefix(recv_splits)
        flat_starts = [first[q] + starts[q][j] for j in range(len(held)) for q in range(P)]
        flat_counts = [block[q][j] for j in range(len(held)) for q in range(P)]
        local_index = _ranges(flat_starts, flat_counts, range(len(flat_counts)), x_AH.device)
        local_counts = [sum(block[q][j] for q in range(P)) for j in range(len(held))]
        y_local = compute(x_recv[local_index], local_counts)
        y_recv = y_local[_inverse(local_index)]
        y_sent = all_to_all(y_recv, send_splits, recv_splits, self.group)
        return y_sent[_inverse(send_index)]


# -- the state of expert parameters across EP ranks --------------------------------------------------
def is_expert_parallel(param) -> bool:
    """True for a stacked expert parameter whose experts are split over EP ranks."""
    return getattr(param, "expert_rows", None) is not None


def local_rows(full: Tensor, param) -> Tensor:
    """This EP rank's rows (its experts) of a tensor holding every expert of ``param``'s layer."""
    if not is_expert_parallel(param) or full.dim() == 0 or full.shape[0] == param.shape[0]:
        return full
    return full[torch.tensor(param.expert_rows, device=full.device)]


def gather_rows(local: Tensor, param, group) -> Tensor:
    """Every expert's rows of ``param``-shaped ``local`` (this EP rank's experts): a collective over
    the EP ``group``; the result holds the experts in global order."""
    if not is_expert_parallel(param) or local.dim() == 0:
        return local
    parts = [torch.empty_like(local) for _ in range(group.size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    rows = [r for q in range(group.size()) for r in param.all_expert_rows[q]]
    full = local.new_empty((param.num_global_experts, *local.shape[1:]))
    full[torch.tensor(rows, device=local.device)] = torch.cat(parts)
    return full
