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
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    # Transformer Engine fuses the pre-norm into the next linear; the MoMa router must see the
    # normalised input itself, so the MoMa MLP keeps a separate norm.
    fuse_attention_norm = backend.fuse_layernorm_and_linear() and not config.moma_post_norm
    linear_qkv = (backend.column_parallel_layer_norm_linear() if fuse_attention_norm
                  else backend.column_parallel_linear())
    if config.is_dense:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()))
    else:
        # The experts' stacked weights run through moma_plugin.experts on either backend.
        mlp = ModuleSpec(module=MoMaMLP, submodules=MoMaMLPSubmodules(experts=StackedExperts))
    post = config.moma_post_norm
    return MoMaTransformerLayerSubmodules(
        input_layernorm=IdentityOp if (post or fuse_attention_norm) else norm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=linear_qkv,
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
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
# with vars() and does not call it). Submodules are chosen from the config when each layer is built.
moma_layer_spec = ModuleSpec(module=MoMaTransformerLayer)
