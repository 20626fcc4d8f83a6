"""moma_plugin: modality-aware sparse architectures (MoMa) for Megatron-Core pretraining jobs.

Tensor names end in their shape's letters, one legend for the package:
  S sequence positions, B samples of a micro-batch, T tokens of the micro-batch (t = position * B +
  sample), H hidden size, F the FFN width on this TP rank, O the fc1 width (2F: SwiGLU's gate and up),
  M modalities, E experts (of a layer, or of one group where the function works on one group), G the
  tokens of one expert group, C tokens of one expert (its capacity), A chosen (token, expert) pairs of
  a layer, K tokens a Mixture-of-Depths layer selected, P slots of the packed MoD sequence, V vocabulary.
  Two modules use letters of their own: ``mot`` I and O for a projection's input and output features,
  ``soft_moe`` P for a group's Soft MoE slots and R for the experts' rows.
"""

import warnings

# megatron-core announces at import that the optional Apex / Transformer Engine kernels are absent and
# that its own default CUDA-graph scope is deprecated; neither concerns the user of this plugin.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", module=r"megatron")
warnings.filterwarnings("ignore", message="full scope is deprecated", module=r"megatron")

from .args import add_moma_args, moma_config_from_args
from .attention import KVCache, SDPACoreAttention
from .aux_router import (
    AuxRouter,
    collect_aux_metrics,
    has_trained_aux_routers,
    mark_aux_routers_trained,
    pop_aux_loss,
    set_aux_router_training,
    set_routing_mode,
)
from .block import MoMaTransformerBlock
from .config import ExpertGroup, MoMaConfig, expert_capacity, parse_expert_groups
from .layer import MoMaTransformerLayer, MoMaTransformerLayerSubmodules
from .layout import ModalityLayout, build_modality_layout, modality_ids_from_tokens, narrow_layout
from . import megatron_compat
from .metrics import collect_routing_metrics
from .model import MoMaGPTModel
from .moma_mlp import MoMaMLP, MoMaMLPSubmodules
from .soft_moe import SoftMoEMLP
from .specs import (
    get_moma_decoder_block_spec,
    get_moma_layer_spec,
    get_mot_layer_spec,
    get_soft_moe_mlp_spec,
    moma_layer_spec,
    mot_layer_spec,
    transformer_engine_available,
)

__version__ = "0.1.0"

# A warning where the installed megatron-core is not a line CI tests (megatron_compat.TESTED_LINES).
megatron_compat.warn_if_untested()

__all__ = [
    "AuxRouter", "KVCache", "collect_aux_metrics", "has_trained_aux_routers", "mark_aux_routers_trained",
    "narrow_layout", "pop_aux_loss", "set_aux_router_training", "set_routing_mode",
    "ExpertGroup", "ModalityLayout", "MoMaConfig", "MoMaGPTModel", "MoMaMLP", "MoMaMLPSubmodules",
    "MoMaTransformerBlock", "MoMaTransformerLayer", "MoMaTransformerLayerSubmodules",
    "SDPACoreAttention", "SoftMoEMLP", "add_moma_args", "build_modality_layout", "collect_routing_metrics",
    "expert_capacity", "get_moma_decoder_block_spec", "get_moma_layer_spec", "get_mot_layer_spec",
    "get_soft_moe_mlp_spec", "mot_layer_spec",
    "modality_ids_from_tokens", "moma_config_from_args", "moma_layer_spec", "parse_expert_groups",
    "transformer_engine_available",
]
