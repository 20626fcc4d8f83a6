"""SoftMoEMLP: Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951) inside modality groups, for
bidirectional (encoder) stacks.

For the tokens X [m, H] of one group in one sequence and the group's slot parameters Phi [H, n*p]
(n experts, p slots each; ``slots.<group>.weight`` holds Phi^T):
  1. logits  L = X Phi [m, n*p], float32.
  2. dispatch D = softmax of L over the m tokens (per slot); slot inputs D^T X [n*p, H].
  3. compute: expert e runs on its p slots (slots e*p .. e*p + p - 1); all groups' experts in one call.
  4. combine C = softmax of L over the n*p slots (per token); Y = C @ (slot outputs) [m, H].
Every token goes into every slot of its group with some weight: no token is dropped, and a token's
output depends on every token of its sequence (hence ``moma_bidirectional``). A group's tokens are
those of its modalities; the others are masked out of its softmaxes and get nothing from it.

Shape letters (moma_plugin/__init__.py): S positions, B samples, H hidden, P slots of a group (n*p),
E experts of the layer, R expert rows (b*p per expert).
"""

from typing import List, Optional, Tuple

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from .config import ExpertGroup, MoMaConfig
from .experts import StackedExperts, run_experts
from .layout import LayoutUser, ModalityLayout
from .moma_mlp import GroupRouter, MoMaMLPSubmodules, over_whole_sequence


def group_mask_SB(layout: ModalityLayout, group: ExpertGroup, s: int, b: int) -> Tensor:
    """[s, b] bool: the tokens of ``group``'s modalities. Rows past the layout's tokens (the padding of
    a sequence-parallel gather) belong to no group."""
    ids_T = layout.modality_ids_T
    mask_T = torch.zeros_like(ids_T, dtype=torch.bool)
    for modality in group.modalities:  # comparisons with host ints: no copy to the device
        mask_T |= ids_T == modality
    pad = s * b - mask_T.numel()
    if pad:
        mask_T = torch.cat([mask_T, mask_T.new_zeros(pad)])
    return mask_T.view(s, b)


class SoftMoEMLP(MegatronModule, LayoutUser):
    """Replaces the dense MLP: each modality group a Soft MoE of SwiGLU experts over its tokens of
    each sequence (see the module docstring). ``config.moma_soft_moe_slots`` slots per expert.

    Parameters: ``slots.<group>.weight`` [n*p, H] (Phi^T) and the experts of all groups stacked in
    ``experts.fc{1,2}_weight``, numbered group by group, as MoMaMLP's (same checkpoint names)."""

    def __init__(self, config: MoMaConfig, submodules: MoMaMLPSubmodules,
                 tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config=config)
        self.groups: List[ExpertGroup] = list(config.moma_expert_groups)
        self.slots_per_expert = config.moma_soft_moe_slots
        if self.slots_per_expert <= 0:
            raise ValueError(f"SoftMoEMLP needs moma_soft_moe_slots > 0, got {self.slots_per_expert}.")
        self.slots = torch.nn.ModuleDict({
            g.name: GroupRouter(config, g.num_experts * self.slots_per_expert) for g in self.groups})
        experts = submodules.experts if submodules is not None else StackedExperts
        if not isinstance(experts, ModuleSpec):
            experts = ModuleSpec(module=experts)
        self.experts = build_module(experts, config=config, groups=self.groups, tp_group=tp_group)
        self.tp_group = tp_group
        self.layer_number: Optional[int] = None

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def forward(self, hidden_states: Tensor, padding_mask: Optional[Tensor] = None, **kwargs):
        """hidden_states [s, b, H] -> (output [s, b, H], None). Under sequence parallelism the chunks
        are gathered (a slot mixes the whole sequence), the layer runs as at TP without SP, and each
        rank keeps its output chunk, as in ``MoMaMLP.forward``."""
        return over_whole_sequence(self, hidden_states), None

    def slot_logits(self, x_SBH: Tensor, group: ExpertGroup) -> Tensor:
        """[s, b, n*p] logits X Phi of every token for every slot of ``group`` (float32 with
        ``moma_router_fp32``)."""
        return self.slots[group.name](x_SBH)

    def dispatch_and_combine(self, x_SBH: Tensor, group: ExpertGroup) -> Tuple[Tensor, Tensor]:
        """(dispatch [b, s, P], combine [b, s, P]) float32 weights of ``group`` under the current
        layout: dispatch sums to 1 over each sample's group tokens (0 without any), combine to 1 over
        the slots for each group token; both are 0 at the other tokens."""
        s, b, _ = x_SBH.shape
        mask_BS1 = group_mask_SB(self.require_layout(), group, s, b).t().unsqueeze(-1)
        logits_BSP = self.slot_logits(x_SBH, group).float().transpose(0, 1)
        # The float32 minimum, not -inf: a sample without tokens of the group gets a uniform softmax
        # (then zeroed by the mask), never 0/0.
        masked_BSP = logits_BSP.masked_fill(~mask_BS1, torch.finfo(torch.float32).min)
        dispatch_BSP = torch.softmax(masked_BSP, dim=1) * mask_BS1
        combine_BSP = torch.softmax(logits_BSP, dim=2) * mask_BS1
        return dispatch_BSP, combine_BSP

    def _forward_tokens(self, hidden_states: Tensor, multiple_of: int = 1) -> Tensor:
        s, b, hidden = hidden_states.shape
        self.require_layout(s * b, multiple_of)  # checked here; dispatch_and_combine reads it
        p = self.slots_per_expert
        x_SBH = hidden_states.float()
        weights, rows = [], []
        for group in self.groups:
            dispatch_BSP, combine_BSP = self.dispatch_and_combine(hidden_states, group)
            slots_BPH = torch.einsum("bsp,sbh->bph", dispatch_BSP, x_SBH)
            # Expert e's rows: its p slots of sample 0, then of sample 1, ... ([n, b, p] order).
            rows.append(slots_BPH.view(b, group.num_experts, p, hidden).transpose(0, 1).reshape(-1, hidden))
            weights.append(combine_BSP)
        num_experts = sum(g.num_experts for g in self.groups)
        y_RH = run_experts(self.config.moma_expert_execution, torch.cat(rows).to(hidden_states.dtype),
                           [b * p] * num_experts, self.experts)
        out_SBH = x_SBH.new_zeros(s, b, hidden)
        for group, combine_BSP, y_GH in zip(self.groups, weights,
                                            y_RH.split([g.num_experts * b * p for g in self.groups])):
            y_BPH = y_GH.view(group.num_experts, b, p, hidden).transpose(0, 1).reshape(b, -1, hidden)
            out_SBH = out_SBH + torch.einsum("bsp,bph->sbh", combine_BSP, y_BPH.float())
        return out_SBH.to(hidden_states.dtype)


def soft_moe_reference(mlp: SoftMoEMLP, hidden_SBH: Tensor, layout: ModalityLayout) -> Tensor:
    """[s, b, H] ``mlp``'s output computed sample by sample and group by group, from the definition:
    the group's tokens of the sample selected, the two softmaxes written out, the experts run by the
    reference loop. Slow; for tests."""
    s, b, hidden = hidden_SBH.shape
    p = mlp.slots_per_expert
    out_SBH = torch.zeros(s, b, hidden, dtype=torch.float32, device=hidden_SBH.device)
    first = 0
    for group in mlp.groups:
        n = group.num_experts
        mask_SB = group_mask_SB(layout, group, s, b)
        logits_SBP = mlp.slot_logits(hidden_SBH, group).float()
        for sample in range(b):
            chosen = mask_SB[:, sample]
            if not bool(chosen.any()):
                continue
            x_MH = hidden_SBH[chosen, sample]  # [m, H], the group's m tokens of the sample
            logits_MP = logits_SBP[chosen, sample]
            dispatch_MP = torch.softmax(logits_MP, dim=0)  # over tokens, per slot
            combine_MP = torch.softmax(logits_MP, dim=1)  # over slots, per token
            slots_PH = (dispatch_MP.t() @ x_MH.float()).to(hidden_SBH.dtype)
            counts = [0] * mlp.experts.num_experts
            counts[first:first + n] = [p] * n
            y_PH = run_experts("loop", slots_PH, counts, mlp.experts)
            out_SBH[chosen, sample] = combine_MP @ y_PH.float()
        first += n
    return out_SBH.to(hidden_SBH.dtype)
