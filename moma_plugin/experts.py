"""Running the experts of a layer on the tokens they chose.

All experts of a layer (every group) are processed as one list: the A = sum_e C_e chosen tokens arrive
sorted by expert, ``tokens_per_expert`` (host ints) says how many each expert took. Three ways to run
them, which must agree:

- ``run_experts_loop``: each expert's Megatron ``MLP`` on its slice. Slow and obviously right: the reference.
- ``run_experts_grouped``: two ``torch._grouped_mm`` calls over the stacked expert weights.
- ``run_experts_padded``: the same with ``torch.bmm`` on a [E, C_max, H] padded batch, for devices,
  dtypes or shapes ``_grouped_mm`` does not take.

Every expert takes part every step, also with zero tokens, so each expert parameter always gets a
gradient (zeros if idle) and sharded data parallelism never waits on a rank whose expert was idle.
"""

from typing import Sequence

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import Tensor

# Shape letters: A chosen (token, expert) pairs, H hidden size, F the FFN width on this TP rank,
# E experts in the layer, C tokens per expert.


def run_experts_loop(x_AH: Tensor, tokens_per_expert: Sequence[int], experts: Sequence) -> Tensor:
    """Reference: expert e's MLP on its ``tokens_per_expert[e]`` rows of ``x_AH``, in order."""
    outputs = []
    for expert, x_CH in zip(experts, torch.split(x_AH, list(tokens_per_expert))):
        y_CH, bias = expert(x_CH)
        outputs.append(y_CH if bias is None else y_CH + bias)
    return torch.cat(outputs)


def stacked_weights(experts: Sequence):
    """fc1 [E, 2F, H], fc2 [E, H, F] and their biases (or None) stacked from the experts' MLPs."""
    w1 = torch.stack([e.linear_fc1.weight for e in experts])
    w2 = torch.stack([e.linear_fc2.weight for e in experts])
    b1 = b2 = None
    if experts[0].linear_fc1.bias is not None:
        b1 = torch.stack([e.linear_fc1.bias for e in experts])
    if experts[0].linear_fc2.bias is not None:
        b2 = torch.stack([e.linear_fc2.bias for e in experts])
    return w1, w2, b1, b2


def grouped_mm_supported(x_AH: Tensor, experts: Sequence) -> bool:
    """Whether ``torch._grouped_mm`` takes these experts' operands: float32/bf16 on CPU, bf16 on
    Hopper or newer GPUs, and every row stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_AH.is_cuda:
        if x_AH.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_AH.device) < (9, 0):
            return False
    elif x_AH.dtype not in (torch.float32, torch.bfloat16):
        return False
    fc1_width, hidden = experts[0].linear_fc1.weight.shape  # [2F, H]
    ffn_width = experts[0].linear_fc2.weight.shape[1]  # [H, F]
    item = x_AH.element_size()
    return all((dim * item) % 16 == 0 for dim in (hidden, fc1_width, ffn_width))


def _swiglu(h: Tensor, activation) -> Tensor:
    # Megatron's MLP order for gated linear units: the first half is the gate.
    gate, up = torch.chunk(h, 2, dim=-1)
    return activation(gate) * up


def expert_of_each_row(tokens_per_expert: Sequence[int], device) -> Tensor:
    """[A] index of the expert each of the A chosen rows belongs to (rows sorted by expert)."""
    counts = torch.tensor(list(tokens_per_expert), device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts,
                                   output_size=sum(tokens_per_expert))


def run_experts_grouped(
    x_AH: Tensor, tokens_per_expert: Sequence[int], experts: Sequence, activation
) -> Tensor:
    """Fast path: grouped matmuls over the stacked weights; matches ``run_experts_loop``."""
    w1, w2, b1, b2 = stacked_weights(experts)
    offsets = torch.tensor(tokens_per_expert, dtype=torch.int64).cumsum(0).to(
        device=x_AH.device, dtype=torch.int32
    )
    expert_A = None if b1 is None and b2 is None else expert_of_each_row(tokens_per_expert, x_AH.device)
    # Tensor parallelism: each rank holds a slice of every expert's FFN width, as Megatron's
    # ColumnParallel/RowParallel linears do; one reduction for all experts instead of one each.
    group = experts[0].tp_group  # the MLPs' own TP group (the model's pg_collection.tp)
    x_AH = copy_to_tensor_model_parallel_region(x_AH, group=group)
    h_AO = torch._grouped_mm(x_AH, w1.transpose(1, 2), offs=offsets)
    if b1 is not None:
        h_AO = h_AO + b1[expert_A]
    y_AH = torch._grouped_mm(_swiglu(h_AO, activation), w2.transpose(1, 2), offs=offsets)
    y_AH = reduce_from_tensor_model_parallel_region(y_AH, group=group)
    if b2 is not None:
        y_AH = y_AH + b2[expert_A]
    return y_AH


def run_experts_padded(
    x_AH: Tensor, tokens_per_expert: Sequence[int], experts: Sequence, activation
) -> Tensor:
    """Fast path without ``_grouped_mm``: scatter into [E, C_max, H], two ``bmm``, gather back."""
    w1, w2, b1, b2 = stacked_weights(experts)
    num_experts, capacity = len(experts), max(tokens_per_expert, default=0)
    total, hidden = x_AH.shape
    counts = torch.tensor(list(tokens_per_expert), device=x_AH.device)
    # Row of each chosen token in the padded [E * C_max] layout: expert * C_max + rank within expert.
    expert_A = expert_of_each_row(tokens_per_expert, x_AH.device)
    first_row_E = torch.cumsum(counts, 0) - counts
    slot_A = expert_A * capacity + torch.arange(total, device=x_AH.device) - first_row_E[expert_A]

    group = experts[0].tp_group
    x_AH = copy_to_tensor_model_parallel_region(x_AH, group=group)
    x_ECH = x_AH.new_zeros(num_experts * capacity, hidden).index_copy(0, slot_A, x_AH)
    x_ECH = x_ECH.view(num_experts, capacity, hidden)
    h_ECO = torch.bmm(x_ECH, w1.transpose(1, 2))
    if b1 is not None:
        h_ECO = h_ECO + b1.unsqueeze(1)
    y_ECH = torch.bmm(_swiglu(h_ECO, activation), w2.transpose(1, 2))
    y_AH = reduce_from_tensor_model_parallel_region(y_ECH.reshape(-1, hidden)[slot_A], group=group)
    if b2 is not None:
        y_AH = y_AH + b2[expert_A]
    return y_AH
