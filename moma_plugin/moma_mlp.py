"""MoMaMLP: modality-aware expert-choice MoE that replaces the dense MLP of a transformer layer.

Forward, in named stages:
  1. route:   each group's router scores the tokens of its modality (sigmoid, float32); each expert
              takes its top k_e = ceil(b^M * capacity_factor / |E^M|) tokens (expert choice).
  2. dispatch: gather the chosen tokens, sorted by expert (all groups in one list); under expert
              parallelism they travel to the ranks holding their experts (``expert_parallel``).
  3. compute: run the experts (expert by expert, grouped matmul, or padded bmm; ``auto`` picks).
  4. combine: weight each output by its sigmoid score and add it back at its token's position.
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from .aux_router import AuxRouter, AuxRouterOwner, PendingAuxLoss, logit
from .config import ExpertGroup, MoMaConfig, expert_capacity
from .experts import StackedExperts, expert_of_each_row, run_experts
from .layout import LayoutUser, ModalityLayout, is_new_forward
from .routing import balanced_choice, expert_choice, linear_fp32, sigmoid_scores, threshold_choice


@dataclass
class MoMaMLPSubmodules:
    """``experts``: the module holding the layer's experts (``StackedExperts``: stacked SwiGLU weights)."""

    experts: Union[type, ModuleSpec] = StackedExperts


class GroupRouter(torch.nn.Module):
    """The learned router W_g^M of one expert group: logits = x W, kept replicated on TP ranks."""

    def __init__(self, config: MoMaConfig, num_experts: int):
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(num_experts, config.hidden_size, dtype=config.params_dtype)
        )
        config.init_method(self.weight)
        self.compute_in_fp32 = config.moma_router_fp32
        # Every TP rank routes every token of the micro-batch, also under sequence parallelism
        # (MoMaMLP gathers the sequence first), so the gradient is whole on each rank: not flagged
        # ``sequence_parallel`` (a flagged gradient is summed over the TP group).

    def forward(self, x_TH: Tensor) -> Tensor:
        if self.compute_in_fp32:
            return linear_fp32(x_TH, self.weight)
        return torch.nn.functional.linear(x_TH, self.weight)


def sequence_parallel_group(config, tp_group):
    """``tp_group`` when a layer's input is this TP rank's chunk of the sequence (sequence
    parallelism with TP > 1), else None."""
    if config.sequence_parallel and tp_group is not None and tp_group.size() > 1:
        return tp_group
    return None


def over_whole_sequence(mlp, hidden_states: Tensor) -> Tensor:
    """``mlp._forward_tokens`` on the whole sequence: under sequence parallelism the TP ranks' chunks
    are gathered first (padded to a multiple of tp) and each rank keeps its chunk of the output."""
    tp_group = sequence_parallel_group(mlp.config, mlp.tp_group)
    if tp_group is None:
        return mlp._forward_tokens(hidden_states)
    # Backward: the gradient of the gathered input is whole on every rank: each keeps its chunk.
    full = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                group=tp_group)
    out = mlp._forward_tokens(full, multiple_of=tp_group.size())
    return scatter_to_sequence_parallel_region(out, group=tp_group)


@dataclass
class RoutingPlan:
    """Which token each expert slot holds, over all groups, sorted by expert."""

    token_index_A: Tensor  # [A] token positions in the flattened [T] micro-batch
    gate_A: Tensor  # [A] float32 sigmoid scores of the chosen (token, expert) pairs
    tokens_per_expert: List[int]  # host ints, one per expert of the layer (groups in order)


class MoMaMLP(MegatronModule, AuxRouterOwner, LayoutUser):
    """Replaces the dense MLP: modality groups of SwiGLU experts with expert-choice routing.

    A group that is not ``routed`` (Mixture-of-Transformers: a modality's one untied FFN) has no
    router: its expert takes every token of its modality with weight 1.

    Parameters: ``router.<group>.weight``, ``aux_router.<group>.fc{1,2}``, and the experts of all groups
    stacked in ``experts.fc{1,2}_weight`` (``experts.fc{1,2}_bias`` with biases). Checkpoints hold one
    tensor per expert, ``experts.<group>.<index>.linear_fc{1,2}.weight``, where <group> is a modality
    name (or "shared" for an ``Nx`` layout) and <index> the expert's index in its group.

    Routing modes (``moma_plugin.set_routing_mode``): ``train`` is expert choice over the micro-batch;
    ``causal`` sends a token to expert j iff its aux router says p_j > threshold.

    Metrics buffers (not saved in checkpoints; reset with ``reset_metrics``):
      ``tokens_per_expert_ME`` [modalities, experts]: tokens of each modality each expert took;
      ``selection_histogram_M3`` [modalities, 3]: tokens taken by 0, 1, 2+ experts.
    """

    def __init__(
        self,
        config: MoMaConfig,
        submodules: MoMaMLPSubmodules,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__(config=config)
        self.groups: List[ExpertGroup] = list(config.moma_expert_groups)
        routed = [g for g in self.groups if g.routed]
        self.router = torch.nn.ModuleDict({g.name: GroupRouter(config, g.num_experts) for g in routed})
        self.aux_router = torch.nn.ModuleDict({g.name: AuxRouter(config, g.num_experts) for g in routed})
        self._init_aux_state(config.moma_aux_threshold)
        experts = submodules.experts if submodules is not None else StackedExperts
        if not isinstance(experts, ModuleSpec):
            experts = ModuleSpec(module=experts)
        self.experts = build_module(experts, config=config, groups=self.groups, tp_group=tp_group)
        self.tp_group = tp_group
        num_experts = sum(g.num_experts for g in self.groups)
        self.register_buffer(
            "tokens_per_expert_ME", torch.zeros(config.num_modalities, num_experts, dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "selection_histogram_M3", torch.zeros(config.num_modalities, 3, dtype=torch.long),
            persistent=False,
        )
        self.layer_number: Optional[int] = None
        self._recorded_forward_id: Optional[int] = None

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def aux_routers(self):
        return [("experts", self.aux_router[g.name]) for g in self.groups if g.routed]

    def forward(self, hidden_states: Tensor, padding_mask: Optional[Tensor] = None, **kwargs):
        """hidden_states [s, b, H] -> (output [s, b, H], None).

        Under sequence parallelism the input is this TP rank's chunk [s/tp, b, H]: the chunks are
        gathered, so routing sees every token as without it, the layer runs as at TP without SP (the
        experts' FFN width split, their outputs all-reduced), and each rank keeps its output chunk.
        The gathered sequence holds the layout's tokens padded to a multiple of tp (a
        Mixture-of-Depths layer pads its selected tokens so): the padding rows are not routed and
        come out as zeros."""
        return over_whole_sequence(self, hidden_states), None

    def _forward_tokens(self, hidden_states: Tensor, multiple_of: int = 1) -> Tensor:
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        layout = self.require_layout(x_TH.shape[0], multiple_of)
        if self.routing_mode == "causal":
            plan = self.route_causal(x_TH, layout)
        else:
            plan = self.route(x_TH, layout)
        x_AH = x_TH[plan.token_index_A]
        ep = getattr(self.experts, "ep", None)  # expert parallelism: rows to their experts' ranks
        y_AH = self.compute(x_AH, plan.tokens_per_expert) if ep is None else \
            ep.run(x_AH, plan.tokens_per_expert, self.compute)
        y_AH = y_AH * plan.gate_A.unsqueeze(1).to(y_AH.dtype)
        out_TH = torch.zeros_like(x_TH).index_add(0, plan.token_index_A, y_AH)
        self._record_metrics(layout, plan)
        return out_TH.view_as(hidden_states)

    def route(self, x_TH: Tensor, layout: ModalityLayout) -> RoutingPlan:
        """Stage 1: expert choice inside every group over the group's tokens."""
        choose = balanced_choice if self.config.moma_force_balanced_routing else expert_choice
        noise = self.config.moma_router_gumbel_noise and self.training
        train_aux = self._should_train_aux(layout.forward_id)
        logits_TE = self.router_logits(x_TH)
        token_indices, gates, tokens_per_expert, first = [], [], [], 0
        for group in self.groups:
            group_tokens_G = layout.token_indices(group.modalities)
            if not group.routed:
                self._take_all(group_tokens_G, layout.token_count(group.modalities),
                               token_indices, gates, tokens_per_expert)
                continue
            capacity = expert_capacity(
                layout.token_count(group.modalities), group.num_experts,
                self.config.moma_capacity_factor,
            )
            logits_GE = logits_TE[group_tokens_G, first:first + group.num_experts]
            first += group.num_experts
            local_index_EC, gate_EC = choose(sigmoid_scores(logits_GE, noise), capacity)
            token_indices.append(group_tokens_G[local_index_EC].reshape(-1))
            gates.append(gate_EC.reshape(-1))
            tokens_per_expert.extend([capacity] * group.num_experts)
            if train_aux:  # also with no tokens of the group: every rank runs every aux router
                targets_GE = torch.zeros_like(logits_GE, dtype=torch.bool)
                experts_EC = torch.arange(group.num_experts, device=x_TH.device).unsqueeze(1)
                targets_GE[local_index_EC, experts_EC.expand_as(local_index_EC)] = True
                self._aux_losses.append(PendingAuxLoss(
                    self.aux_router[group.name], x_TH.detach()[group_tokens_G], targets_GE,
                    layout.modality_ids_T[group_tokens_G], self.aux_threshold))
        return RoutingPlan(torch.cat(token_indices), torch.cat(gates), tokens_per_expert)

    @staticmethod
    def _take_all(group_tokens_G: Tensor, count: int, token_indices, gates, tokens_per_expert):
        """An unrouted group's one expert takes all its tokens with gate 1."""
        token_indices.append(group_tokens_G)
        gates.append(torch.ones(count, dtype=torch.float32, device=group_tokens_G.device))
        tokens_per_expert.append(count)

    def router_logits(self, x_TH: Tensor) -> Tensor:
        """[T, E] logits of every routed group's router for every token, in one matmul (a group then
        reads its own tokens' rows and its experts' columns)."""
        if not self.router:
            return x_TH.new_zeros(x_TH.shape[0], 0, dtype=torch.float32)
        weight_EH = torch.cat([self.router[g.name].weight for g in self.groups if g.routed])
        if self.config.moma_router_fp32:
            return linear_fp32(x_TH, weight_EH)
        return torch.nn.functional.linear(x_TH, weight_EH)

    def route_causal(self, x_TH: Tensor, layout: ModalityLayout) -> RoutingPlan:
        """Stage 1 at inference: token t goes to expert j iff aux_router(x_t)_j > threshold; the main
        router's sigmoid score is the weight. One host read for the loads of all groups."""
        cutoff = logit(self.aux_threshold)
        token_indices, gates, loads = [], [], []
        for group in self.groups:
            group_tokens_G = layout.token_indices(group.modalities)
            if not group.routed:
                count = layout.token_count(group.modalities)
                self._take_all(group_tokens_G, count, token_indices, gates, [])
                loads.append(torch.tensor([count], device=x_TH.device))
                continue
            x_GH = x_TH[group_tokens_G]
            scores_GE = sigmoid_scores(self.router[group.name](x_GH))
            chosen_GE = self.aux_router[group.name](x_GH) > cutoff
            local_index_A, gate_A, load_E = threshold_choice(chosen_GE, scores_GE)
            token_indices.append(group_tokens_G[local_index_A])
            gates.append(gate_A)
            loads.append(load_E)
        return RoutingPlan(torch.cat(token_indices), torch.cat(gates), torch.cat(loads).tolist())

    def compute(self, x_AH: Tensor, tokens_per_expert: List[int]) -> Tensor:
        """Stage 3: every expert on its tokens; [A, H] in, [A, H] out, same order."""
        return run_experts(self.config.moma_expert_execution, x_AH, tokens_per_expert, self.experts)

    @torch.no_grad()
    def _record_metrics(self, layout: ModalityLayout, plan: RoutingPlan):
        # Activation recomputation runs this forward twice with the same layout: count it once.
        if not is_new_forward(layout.forward_id, self._recorded_forward_id):
            return
        self._recorded_forward_id = layout.forward_id
        num_modalities, num_experts = self.tokens_per_expert_ME.shape
        expert_A = expert_of_each_row(plan.tokens_per_expert, plan.token_index_A.device)
        modality_A = layout.modality_ids_T[plan.token_index_A]
        self.tokens_per_expert_ME += torch.bincount(
            modality_A * num_experts + expert_A, minlength=num_modalities * num_experts
        ).view(num_modalities, num_experts)
        picks_T = torch.bincount(plan.token_index_A, minlength=layout.num_tokens).clamp_(max=2)
        self.selection_histogram_M3 += torch.bincount(
            layout.modality_ids_T * 3 + picks_T, minlength=num_modalities * 3
        ).view(num_modalities, 3)

    def reset_metrics(self):
        self.tokens_per_expert_ME.zero_()
        self.selection_histogram_M3.zero_()
