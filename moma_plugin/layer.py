"""MoMaTransformerLayer: Megatron's TransformerLayer that hands the modality layout to its MoMa MLP and
can place the norms after each sublayer (Chameleon's res-post-norm)."""

import contextlib
from dataclasses import dataclass, replace
from typing import Optional, Union

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from .config import MoMaConfig
from .layout import ModalityLayout
from .moma_mlp import MoMaMLP


@dataclass
class MoMaTransformerLayerSubmodules(TransformerLayerSubmodules):
    """Adds the norms applied to each sublayer's output before the residual add (post-norm)."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


def _norm_before_residual(bias_dropout_add, norm):
    """Wraps Megatron's bias-dropout-add so that it computes residual + dropout(norm(x + bias))."""

    def factory(training, fused):
        add = bias_dropout_add(training, fused)

        def apply(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return add((norm(x), None), residual, prob)

        return apply

    return factory


class MoMaTransformerLayer(TransformerLayer):
    """A transformer layer whose forward also takes ``modality_layout`` (a ``ModalityLayout``).

    Built from a spec like any Megatron layer. With ``submodules=None`` it builds its own from the
    config (``get_moma_layer_submodules``), which is how the module-level ``moma_plugin.moma_layer_spec``
    serves Megatron-LM's ``--spec moma_plugin moma_layer_spec``.
    """

    def __init__(
        self,
        config: MoMaConfig,
        submodules: Optional[TransformerLayerSubmodules] = None,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection=None,
        vp_stage: Optional[int] = None,
    ):
        if not isinstance(config, MoMaConfig):
            raise TypeError(
                f"MoMaTransformerLayer needs a moma_plugin.MoMaConfig, got {type(config).__name__}. "
                "Build the config with MoMaConfig(...) or moma_plugin.moma_config_from_args(args)."
            )
        if submodules is None:
            from .specs import get_moma_layer_submodules

            submodules = get_moma_layer_submodules(config)
        mlp_spec = submodules.mlp
        builds_moma_mlp = isinstance(mlp_spec, ModuleSpec) and issubclass(mlp_spec.module, MoMaMLP)
        if builds_moma_mlp:
            # Built below with the TP group: Megatron's layer only knows how to pass it to its own MLPs.
            submodules = replace(submodules, mlp=IdentityOp)
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        if builds_moma_mlp:
            self.mlp = build_module(mlp_spec, config=self.config, tp_group=self.pg_collection.tp)
            self.mlp.set_layer_number(self.layer_number)
            # Selective MLP recompute would rerun the MLP in backward, outside the routing scope
            # that forward opens; full-layer recompute (recompute_granularity='full') covers it.
            self.recompute_mlp = False
        if isinstance(submodules, MoMaTransformerLayerSubmodules):
            self._build_post_norms(submodules)

    def _build_post_norms(self, submodules: MoMaTransformerLayerSubmodules):
        for name, bda in (("post_self_attn_layernorm", "self_attn_bda"),
                          ("post_mlp_layernorm", "mlp_bda")):
            spec = getattr(submodules, name)
            if spec is IdentityOp:
                continue
            norm = build_module(spec, config=self.config, hidden_size=self.config.hidden_size,
                                eps=self.config.layernorm_epsilon)
            setattr(self, name, norm)
            setattr(self, bda, _norm_before_residual(getattr(self, bda), norm))

    @property
    def has_moma_mlp(self) -> bool:
        return isinstance(self.mlp, MoMaMLP)

    def forward(self, *args, modality_layout: Optional[ModalityLayout] = None, **kwargs):
        scope = (self.mlp.routing_layout(modality_layout) if self.has_moma_mlp
                 else contextlib.nullcontext())
        with scope:
            return super().forward(*args, **kwargs)
