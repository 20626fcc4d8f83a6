"""Layer and block specs for MoMa models, local (pure Megatron-Core + torch SDPA) or Transformer Engine.

``get_moma_layer_spec(config)`` is what a model builder passes to ``GPTModel``/``MoMaGPTModel``;
``moma_plugin.moma_layer_spec`` is the same as a module-level object for Megatron-LM's ``--spec``.
"""

import importlib.util
from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from .attention import SDPACoreAttention
from .config import MoMaConfig
from .experts import StackedExperts
from .layer import MoMaTransformerLayer, MoMaTransformerLayerSubmodules
from .moma_mlp import MoMaMLP, MoMaMLPSubmodules
from .mot import ModalityColumnLinear, ModalityNorm, ModalityRowLinear
from .soft_moe import SoftMoEMLP

TE_INSTALL_HINT = (
    "Transformer Engine is not installed. Install it with `pip install moma_plugin[te]` on a CUDA "
    "machine, or use the local spec: get_moma_layer_spec(config, use_te=False)."
)


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):  # installed but its CUDA libraries do not load
        return False
    return True


class SequenceParallelTorchNorm:
    """torch's LayerNorm or RMSNorm for the local spec, also under sequence parallelism, which Megatron's
    ``WrappedTorchNorm`` refuses: each TP rank normalises its own chunk of the sequence, and the weights
    carry ``sequence_parallel=True`` so the engines sum their gradients over the TP group (as Megatron
    does for its fused norms)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        unsupported = [flag for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm",
                                         "memory_efficient_layer_norm") if getattr(config, flag, False)]
        if config.normalization not in kinds or unsupported:
            raise NotImplementedError(
                f"the local spec's norm under sequence parallelism takes LayerNorm or RMSNorm "
                f"(normalization={config.normalization!r}) without {unsupported or 'other options'}; "
                "turn those off or use Transformer Engine's spec.")
        norm = kinds[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


class _LocalBackend(LocalSpecProvider):
    """Megatron's local modules, with core attention that runs without CUDA and torch's norms also
    under sequence parallelism."""

    def core_attention(self):
        return SDPACoreAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        norm = super().layer_norm(rms_norm=rms_norm, for_qk=for_qk)
        return SequenceParallelTorchNorm if norm is WrappedTorchNorm else norm


def _backend(use_te: Optional[bool]):
    if use_te is None:
        use_te = transformer_engine_available()
    if not use_te:
        return _LocalBackend()
    if not transformer_engine_available():
        raise ImportError(TE_INSTALL_HINT)
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def get_moma_layer_submodules(config: MoMaConfig, use_te: Optional[bool] = None):
    """The submodules of one MoMa transformer layer (see ``get_moma_layer_spec``)."""
    backend = _backend(use_te)
    untied = set(config.mot)
    norm = (ModalityNorm if "norms" in untied
            else backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False))
    # Transformer Engine fuses the pre-norm into the next linear; the MoMa router must see the
    # normalised input itself, so the MoMa MLP keeps a separate norm. Untied (MoT) parts are not fused.
    fuse_attention_norm = (backend.fuse_layernorm_and_linear() and not config.moma_post_norm
                           and not untied & {"norms", "attention"})
    linear_qkv = (ModalityColumnLinear if "attention" in untied
                  else backend.column_parallel_layer_norm_linear() if fuse_attention_norm
                  else backend.column_parallel_linear())
    linear_proj = ModalityRowLinear if "attention" in untied else backend.row_parallel_linear()
    if config.is_dense:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()))
    elif config.moma_soft_moe_slots:
        mlp = get_soft_moe_mlp_spec(config)
    else:
        # The experts' stacked weights run through moma_plugin.experts on either backend.
        mlp = ModuleSpec(module=MoMaMLP, submodules=MoMaMLPSubmodules(experts=StackedExperts))
    post = config.moma_post_norm
    mask = AttnMaskType.no_mask if config.moma_bidirectional else AttnMaskType.causal
    return MoMaTransformerLayerSubmodules(
        input_layernorm=IdentityOp if (post or fuse_attention_norm) else norm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": mask},
            submodules=SelfAttentionSubmodules(
                linear_qkv=linear_qkv,
                core_attention=backend.core_attention(),
                linear_proj=linear_proj,
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=IdentityOp if post else norm,
        mlp=mlp,
        mlp_bda=get_bias_dropout_add,
        post_self_attn_layernorm=norm if post else IdentityOp,
        post_mlp_layernorm=norm if post else IdentityOp,
    )


def get_moma_layer_spec(config: MoMaConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """Spec of one MoMa transformer layer.

    Args:
        config: the model's MoMaConfig (expert groups, post-norm, normalization).
        use_te: True for Transformer Engine modules (FP8/BF16 kernels), False for the local modules,
            None to use Transformer Engine when it imports. True without it raises ImportError.
    """
    return ModuleSpec(
        module=MoMaTransformerLayer, submodules=get_moma_layer_submodules(config, use_te)
    )


def get_mot_layer_spec(config: MoMaConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """Spec of one Mixture-of-Transformers layer: the parts ``config.mot`` names ('ffn', 'attention',
    'norms') untied per modality around one global attention (docs/MOT.md). The same layer class as
    ``get_moma_layer_spec``; a config without ``mot`` is refused here, since it would build a MoMa layer."""
    if not config.mot:
        raise ValueError("get_mot_layer_spec needs config.mot: the parts to untie per modality, e.g. "
                         "MoMaConfig(mot='all', moma_experts='1t1i', ...) or mot='ffn,attention'.")
    return get_moma_layer_spec(config, use_te)


def get_soft_moe_mlp_spec(config: MoMaConfig) -> ModuleSpec:
    """Spec of a Soft MoE MLP (``moma_plugin.soft_moe``) over ``config``'s expert groups, for a
    bidirectional stack (``config.moma_bidirectional``; the config refuses Soft MoE without it)."""
    if not config.moma_soft_moe_slots:
        raise ValueError("get_soft_moe_mlp_spec needs config.moma_soft_moe_slots > 0 (slots per expert).")
    return ModuleSpec(module=SoftMoEMLP, submodules=MoMaMLPSubmodules(experts=StackedExperts))


def get_moma_decoder_block_spec(
    config: MoMaConfig, use_te: Optional[bool] = None, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """Per-layer specs of this pipeline stage plus the final norm, for ``MoMaGPTModel``."""
    layer_spec = get_moma_layer_spec(config, use_te)
    backend = _backend(use_te)
    final_norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)


# For Megatron-LM's `--spec moma_plugin moma_layer_spec`: a module-level object (Megatron-LM looks it up
# with vars() and does not call it). Submodules are chosen from the config when each layer is built, so
# `--spec moma_plugin mot_layer_spec` is the same layer: `--mot` decides what is untied.
moma_layer_spec = ModuleSpec(module=MoMaTransformerLayer)
mot_layer_spec = ModuleSpec(module=MoMaTransformerLayer)
