"""MoMaTransformerLayer: Megatron's TransformerLayer that hands the modality layout to its MoMa MLP, can
place the norms after each sublayer (Chameleon's res-post-norm) and can be a Mixture-of-Depths layer.

Mixture-of-Depths (MoMa paper section 2.3): a router ``r = sigmoid(x W)`` scores every token of the
micro-batch; the top ``k_d = ceil(tokens * mod_capacity)`` go through the layer (``causal`` routing: those
whose aux router says p > threshold). The selected tokens of each sample are packed, in order, at the
front of a shorter sequence; attention runs on that sequence with its usual causal mask, so skipped
tokens are neither queries nor keys/values, and padding at the tail is never attended to by a real
token. The MoMa MLP then routes only the selected tokens, with the modality layout narrowed to them.
A selected token leaves the layer as ``x + r * (layer(x) - x)``; every other token leaves it unchanged.
"""

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from torch import Tensor

from .attention import KVCache, SDPACoreAttention
from .aux_router import AuxRouter, AuxRouterOwner, PendingAuxLoss, logit
from .config import MoMaConfig
from .layout import ModalityLayout, narrow_layout
from .moma_mlp import GroupRouter, MoMaMLP
from .routing import sigmoid_scores


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


class MoMaTransformerLayer(TransformerLayer, AuxRouterOwner):
    """A transformer layer whose forward also takes ``modality_layout`` (a ``ModalityLayout``).

    Built from a spec like any Megatron layer. With ``submodules=None`` it builds its own from the
    config (``get_moma_layer_submodules``), which is how the module-level ``moma_plugin.moma_layer_spec``
    serves Megatron-LM's ``--spec moma_plugin moma_layer_spec``.

    When ``config.is_mod_layer(layer_number - 1)`` it is a Mixture-of-Depths layer with parameters
    ``mod_router.weight`` and ``mod_aux_router.fc{1,2}``, and counts in ``mod_tokens_M2`` the tokens
    of each modality it processed (column 0) out of all it saw (column 1).
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
        self._init_aux_state(config.moma_aux_threshold)
        self.is_mod = config.is_mod_layer(self.layer_number - 1)
        if self.is_mod:
            self.mod_router = GroupRouter(config, 1)
            self.mod_aux_router = AuxRouter(config, 1)
            self.register_buffer("mod_tokens_M2", torch.zeros(config.num_modalities, 2,
                                                              dtype=torch.long), persistent=False)
            self._mod_recorded_forward_id = None

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

    def aux_routers(self):
        return [("mod", self.mod_aux_router)] if self.is_mod else []

    def forward(self, *args, modality_layout: Optional[ModalityLayout] = None, **kwargs):
        if self.is_mod:
            return self._forward_mod(*args, modality_layout=modality_layout, **kwargs)
        scope = (self.mlp.routing_layout(modality_layout) if self.has_moma_mlp
                 else contextlib.nullcontext())
        with scope:
            return super().forward(*args, **kwargs)

    # -- Mixture-of-Depths ------------------------------------------------------------------------
    def _forward_mod(self, hidden_states: Tensor, attention_mask=None, context=None,
                     rotary_pos_emb=None, modality_layout: Optional[ModalityLayout] = None,
                     packed_seq_params=None, inference_context=None, **unused):
        if packed_seq_params is not None or inference_context is not None:
            raise NotImplementedError(
                "Mixture-of-Depths layers do not take packed_seq_params or Megatron's inference "
                "context; generate with moma_plugin.generation (it keeps its own MoD-aware KV cache)."
            )
        if isinstance(rotary_pos_emb, tuple):
            raise NotImplementedError("MoD layers take one rotary table, not separate q/k tables.")
        seq, batch, hidden = hidden_states.shape
        x_TH = hidden_states.reshape(-1, hidden)
        scores_T = sigmoid_scores(self.mod_router(x_TH)).squeeze(1)
        forward_id = modality_layout.forward_id if modality_layout is not None else None
        if self.routing_mode == "causal":
            selected_K = self._aux_selected(x_TH)
        else:
            k = min(x_TH.shape[0], math.ceil(x_TH.shape[0] * self.config.mod_capacity))
            selected_K = scores_T.topk(k, sorted=False).indices.sort().values
            if self._should_train_aux(forward_id):
                targets_T1 = torch.zeros_like(scores_T, dtype=torch.bool)
                targets_T1[selected_K] = True
                self._aux_losses.append(PendingAuxLoss(
                    self.mod_aux_router, x_TH.detach(), targets_T1.unsqueeze(1),
                    self._modality_ids(modality_layout, x_TH), self.aux_threshold))
        positions_T = torch.arange(seq, device=x_TH.device).repeat_interleave(batch)
        output = self._forward_selected(hidden_states, selected_K, scores_T[selected_K],
                                        modality_layout, positions_T, rotary_pos_emb)
        self._record_mod_metrics(modality_layout, selected_K, x_TH, forward_id)
        return output, context

    def _aux_selected(self, x_TH: Tensor, valid_T: Optional[Tensor] = None) -> Tensor:
        """Causal MoD routing: the tokens whose aux router says p > threshold (ascending)."""
        chosen_T = self.mod_aux_router(x_TH).squeeze(1) > logit(self.aux_threshold)
        if valid_T is not None:
            chosen_T &= valid_T
        return chosen_T.nonzero().squeeze(1)

    @staticmethod
    def _modality_ids(layout: Optional[ModalityLayout], x_TH: Tensor) -> Tensor:
        if layout is not None:
            return layout.modality_ids_T
        return torch.zeros(x_TH.shape[0], dtype=torch.long, device=x_TH.device)

    def _forward_selected(self, hidden_states: Tensor, selected_K: Tensor, gate_K: Optional[Tensor],
                          layout: Optional[ModalityLayout], positions_T: Tensor,
                          rotary_pos_emb: Optional[Tensor], kv_cache: Optional[KVCache] = None):
        """Runs the layer on the tokens ``selected_K`` (ascending flat indices into [s*b]) only.

        Each sample's selected tokens are packed at the front of a [s', b] sequence (s' = the most any
        sample has), keeping their order. ``positions_T`` are the tokens' positions in their sequences
        (for rotary embeddings: ``rotary_pos_emb`` is a table indexed by position). With ``gate_K`` a
        selected token leaves as x + gate * (layer(x) - x), without it as layer(x). Others: unchanged.
        """
        seq, batch, hidden = hidden_states.shape
        x_TH = hidden_states.reshape(-1, hidden)
        num_selected = selected_K.numel()
        if num_selected == 0:
            return hidden_states
        sample_K = selected_K % batch
        counts_B = torch.bincount(sample_K, minlength=batch)
        by_sample = torch.argsort(sample_K, stable=True)
        starts_B = torch.cumsum(counts_B, 0) - counts_B
        slot_K = torch.empty_like(selected_K)
        slot_K[by_sample] = (torch.arange(num_selected, device=x_TH.device)
                             - starts_B[sample_K[by_sample]])
        packed_len = int(counts_B.max())
        packed_index_K = slot_K * batch + sample_K
        x_KH = x_TH[selected_K]
        packed = x_TH.new_zeros(packed_len * batch, hidden).index_copy(0, packed_index_K, x_KH)
        rotary = None
        if rotary_pos_emb is not None:
            packed_positions = torch.zeros(packed_len * batch, dtype=torch.long, device=x_TH.device)
            packed_positions.index_copy_(0, packed_index_K, positions_T[selected_K])
            rotary = rotary_pos_emb[packed_positions].reshape(
                packed_len, batch, *rotary_pos_emb.shape[2:])
        with self._kv_cache_scope(kv_cache, counts_B):
            attended, _ = self._forward_attention(packed.view(packed_len, batch, hidden),
                                                  rotary_pos_emb=rotary)
        y_K1H = attended.reshape(-1, hidden)[packed_index_K].unsqueeze(1)
        if self.has_moma_mlp:
            with self.mlp.routing_layout(narrow_layout(layout, selected_K)):
                out_K1H = self._forward_mlp(y_K1H)
        else:
            out_K1H = self._forward_mlp(y_K1H)
        out_KH = out_K1H.reshape(num_selected, hidden)
        if gate_K is not None:
            out_KH = x_KH + gate_K.unsqueeze(1).to(out_KH.dtype) * (out_KH - x_KH)
        return x_TH.index_copy(0, selected_K, out_KH).view(seq, batch, hidden)

    @contextlib.contextmanager
    def _kv_cache_scope(self, cache: Optional[KVCache], counts_B: Tensor):
        if cache is None:
            yield
            return
        core = self.self_attention.core_attention
        if not isinstance(core, SDPACoreAttention):
            raise NotImplementedError(
                f"KV-cache decoding needs the local attention spec (SDPACoreAttention), not "
                f"{type(core).__name__}; build the model with get_moma_layer_spec(config, use_te=False)."
            )
        core.kv_cache, cache.new_counts = cache, counts_B
        try:
            yield
        finally:
            core.kv_cache = None

    @torch.no_grad()
    def _record_mod_metrics(self, layout, selected_K, x_TH, forward_id):
        if forward_id is not None and forward_id == self._mod_recorded_forward_id:
            return
        self._mod_recorded_forward_id = forward_id
        modality_T = self._modality_ids(layout, x_TH)
        num_modalities = self.mod_tokens_M2.shape[0]
        self.mod_tokens_M2[:, 0] += torch.bincount(modality_T[selected_K], minlength=num_modalities)
        self.mod_tokens_M2[:, 1] += torch.bincount(modality_T, minlength=num_modalities)

    def reset_metrics(self):
        if self.is_mod:
            self.mod_tokens_M2.zero_()

    # -- incremental decoding ---------------------------------------------------------------------
    def decode(self, hidden_states: Tensor, valid_T: Tensor, positions_T: Tensor,
               layout: Optional[ModalityLayout], kv_cache: KVCache,
               rotary_pos_emb: Optional[Tensor] = None) -> Tensor:
        """One decoding step on new tokens [n, b, H] (``valid_T`` marks real tokens, flat [n*b]):
        the layer's processed tokens are appended to ``kv_cache``, attention reads the cache. Needs
        the causal routing mode (a MoD layer keeps a token iff its aux router says so)."""
        if self.routing_mode != "causal":
            raise RuntimeError("decoding needs causal routing: set_routing_mode(model, 'causal').")
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.is_mod:
            selected_K = self._aux_selected(x_TH, valid_T)
            gate_K = sigmoid_scores(self.mod_router(x_TH[selected_K])).squeeze(1)
        else:
            selected_K, gate_K = valid_T.nonzero().squeeze(1), None
        return self._forward_selected(hidden_states, selected_K, gate_K, layout, positions_T,
                                      rotary_pos_emb, kv_cache)
