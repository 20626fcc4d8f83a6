"""Reading the routing statistics the MoMa layers record during a step."""

from typing import Dict, List

import torch

from .layer import MoMaTransformerLayer
from .moma_mlp import MoMaMLP


def moma_layers(model: torch.nn.Module) -> List[MoMaMLP]:
    return [m for m in model.modules() if isinstance(m, MoMaMLP)]


def mod_layers(model: torch.nn.Module) -> List[MoMaTransformerLayer]:
    return [m for m in model.modules() if isinstance(m, MoMaTransformerLayer) and m.is_mod]


def collect_routing_metrics(model: torch.nn.Module, reset: bool = True) -> Dict[str, float]:
    """Flat, dashboard-friendly metrics summed since the last reset, e.g.
    ``moma/layer3/image/tokens_per_expert_min``, ``moma/layer3/text/picked_by_0_frac`` and, for
    Mixture-of-Depths layers, ``mod/layer0/image/processed_frac`` (share of the modality's tokens the
    layer processed).

    Layers are counted from 0, as in parameter names (``decoder.layers.3...`` is ``layer3``) and
    ``--mod-start-layer``: Megatron's global ``layer_number`` minus one. One host read per layer.
    """
    metrics: Dict[str, float] = {}
    for index, mlp in enumerate(moma_layers(model)):
        layer = mlp.layer_number - 1 if getattr(mlp, "layer_number", None) else index
        modalities = mlp.config.moma_modalities
        loads = mlp.tokens_per_expert_ME.sum(0).tolist()
        histogram = mlp.selection_histogram_M3.tolist()
        start = 0
        for group in mlp.groups:
            group_loads = loads[start : start + group.num_experts]
            start += group.num_experts
            prefix = f"moma/layer{layer}/{group.name}"
            metrics[f"{prefix}/tokens_per_expert_min"] = float(min(group_loads))
            metrics[f"{prefix}/tokens_per_expert_max"] = float(max(group_loads))
        for modality, (none, one, several) in zip(modalities, histogram):
            total = max(none + one + several, 1)
            prefix = f"moma/layer{layer}/{modality}"
            metrics[f"{prefix}/tokens"] = float(none + one + several)
            metrics[f"{prefix}/picked_by_0_frac"] = none / total
            metrics[f"{prefix}/picked_by_1_frac"] = one / total
            metrics[f"{prefix}/picked_by_2plus_frac"] = several / total
        if reset:
            mlp.reset_metrics()
    for layer in mod_layers(model):
        for name, (processed, seen) in zip(layer.config.moma_modalities, layer.mod_tokens_M2.tolist()):
            if seen:
                metrics[f"mod/layer{layer.layer_number - 1}/{name}/processed_frac"] = processed / seen
        if reset:
            layer.reset_metrics()
    return metrics
