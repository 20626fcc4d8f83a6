"""MoMaTransformerLayer: Megatron's TransformerLayer that hands the modality layout to the modules that read
it (its MoMa or Soft MoE MLP; Mixture-of-Transformers projections and norms, ``moma_plugin.mot``), can
place the norms after each sublayer (Chameleon's res-post-norm) and can be a Mixture-of-Depths layer.

Mixture-of-Depths (MoMa paper section 2.3): a router ``r = sigmoid(x W)`` scores every token of the
micro-batch; the top ``k_d = ceil(tokens * mod_capacity)`` go through the layer (``causal`` routing: those
whose aux router says p > threshold). The selected tokens of each sample are packed, in order, at the
front of a shorter sequence; attention runs on that sequence with its usual causal mask, so skipped
tokens are neither queries nor keys/values, and padding at the tail is never attended to by a real
token. The MoMa MLP then routes only the selected tokens, with the modality layout narrowed to them.
A selected token leaves the layer as ``x + r * (layer(x) - x)``; every other token leaves it unchanged.

Under sequence parallelism (TP ranks holding chunks of the sequence) a MoD layer gathers the sequence,
chooses over the whole micro-batch as without it, and splits the packed sequence over the TP ranks for
attention and the MLP (``_split_sequence``); every rank then holds the same whole wrapper computation.
"""

import contextlib
import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, Union

import torch

from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
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
from .layout import LayoutUser, ModalityLayout, count_ids, is_new_forward, narrow_layout
from .megatron_compat import forward_attention, forward_mlp
from .moma_mlp import GroupRouter, MoMaMLP, sequence_parallel_group
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


def pack_by_sample(selected_K: Tensor, batch: int):
    """Where each selected token goes when every sample's selected tokens are packed, in order, at the
    front of a shorter [s', b] sequence.

    ``selected_K``: ascending flat token indices (t = position * batch + sample), at least one.
    Returns ``packed_index_K`` (flat index slot * batch + sample of token k in the packed sequence,
    slot = how many selected tokens of its sample precede it) and ``counts_B`` (selected tokens per
    sample). As the indices ascend, a running count per sample gives the slots: no sort, no host read.
    """
    sample_K = selected_K % batch
    seen_KB = (sample_K.unsqueeze(1) == torch.arange(batch, device=selected_K.device)).cumsum(0)
    slot_K = seen_KB.gather(1, sample_K.unsqueeze(1)).squeeze(1) - 1
    return slot_K * batch + sample_K, seen_KB[-1]


def _split_sequence(sublayer, x_SBH: Tensor, tp_group) -> Tensor:
    """``sublayer`` on the whole [S, b, H] sequence ``x_SBH``; with a ``tp_group`` (sequence
    parallelism) each TP rank runs it on its chunk of the sequence, padded to a multiple of tp rows
    (pad rows at the end come out of a causal sublayer without touching the real ones), and the
    chunks are gathered back. The input and output gradients are whole on every rank."""
    if tp_group is None:
        return sublayer(x_SBH)
    rows = x_SBH.shape[0]
    pad = -rows % tp_group.size()
    if pad:
        x_SBH = torch.cat([x_SBH, x_SBH.new_zeros(pad, *x_SBH.shape[1:])])
    chunk = scatter_to_sequence_parallel_region(x_SBH, group=tp_group)
    out = gather_from_sequence_parallel_region(sublayer(chunk), tensor_parallel_output_grad=False,
                                               group=tp_group)
    return out[:rows]


def _packed_layout(layout: ModalityLayout, modality_K: Tensor, packed_index_K: Tensor, rows: int,
                   selected_per_modality) -> ModalityLayout:
    """The layout of a packed MoD sequence of ``rows`` tokens: the selected tokens (modalities
    ``modality_K``) at ``packed_index_K``, padding (counted as modality 0, never attended to by a real
    token) elsewhere. Its counts come from the host read the layer already made: no sync."""
    modality_P = modality_K.new_zeros(rows).index_copy(0, packed_index_K, modality_K)
    counts = list(selected_per_modality)
    counts[0] += rows - modality_K.numel()
    return ModalityLayout(modality_P, torch.sort(modality_P, stable=True).indices, tuple(counts),
                          forward_id=layout.forward_id)


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
        builds_layout_mlp = isinstance(mlp_spec, ModuleSpec) and issubclass(mlp_spec.module, LayoutUser)
        if builds_layout_mlp:
            # A MoMa or Soft MoE MLP, built below with the TP group: Megatron's layer only knows how to
            # pass it to its own MLPs.
            submodules = replace(submodules, mlp=IdentityOp)
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        if builds_layout_mlp:
            self.mlp = build_module(mlp_spec, config=self.config, tp_group=self.pg_collection.tp)
            if hasattr(self.mlp, "set_layer_number"):
                self.mlp.set_layer_number(self.layer_number)
        if isinstance(submodules, MoMaTransformerLayerSubmodules):
            self._build_post_norms(submodules)
        # The modules that read the modality layout, on each side of the layer (a MoD layer hands the
        # attention side its packed sequence's layout and the MLP side the selected tokens').
        self._attention_side = self._layout_users("input_layernorm", "self_attention",
                                                  "post_self_attn_layernorm")
        self._mlp_side = self._layout_users("pre_mlp_layernorm", "mlp", "post_mlp_layernorm")
        # Selective recompute of the MLP or of a norm would rerun it in backward, outside the layout
        # scope that forward opens; full-layer recompute (recompute_granularity='full') covers them.
        if self._mlp_side:
            self.recompute_mlp = self.recompute_pre_mlp_layernorm = False
        if self._attention_side:
            self.recompute_input_layernorm = False
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

    def _layout_users(self, *names):
        """The modules under the named submodules that read the layout (MoMa and Soft MoE MLPs, MoT
        projections and norms)."""
        return [module for name in names if isinstance(getattr(self, name, None), torch.nn.Module)
                for module in getattr(self, name).modules() if isinstance(module, LayoutUser)]

    @contextlib.contextmanager
    def _layout_scope(self, users, layout: Optional[ModalityLayout]):
        """Hands ``layout`` to ``users`` for one call, with this TP rank's chunk under SP."""
        tp_group = self._sequence_parallel_group()
        chunk = (tp_group.rank(), tp_group.size()) if tp_group is not None else None
        with contextlib.ExitStack() as stack:
            for user in users:
                stack.enter_context(user.use_layout(layout, chunk))
            yield

    @property
    def has_moma_mlp(self) -> bool:
        return isinstance(self.mlp, MoMaMLP)

    def aux_routers(self):
        return [("mod", self.mod_aux_router)] if self.is_mod else []

    def forward(self, *args, modality_layout: Optional[ModalityLayout] = None, **kwargs):
        if self.is_mod:
            return self._forward_mod(*args, modality_layout=modality_layout, **kwargs)
        with self._layout_scope(self._attention_side + self._mlp_side, modality_layout):
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
        tp_group = self._sequence_parallel_group()
        if tp_group is not None:
            # Route over the whole micro-batch, as without SP: every TP rank runs the MoD wrapper on
            # the gathered sequence (identically), so its gradient is whole: each keeps its chunk.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=tp_group)
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        forward_id = modality_layout.forward_id if modality_layout is not None else None
        if self.routing_mode == "causal":
            selected_K = self._aux_selected(x_TH)
        else:
            selected_K = self._top_scored(x_TH)
            if self._should_train_aux(forward_id):
                targets_T = torch.zeros(x_TH.shape[0], dtype=torch.bool, device=x_TH.device)
                targets_T.index_fill_(0, selected_K, True)
                self._aux_losses.append(PendingAuxLoss(
                    self.mod_aux_router, x_TH.detach(), targets_T.unsqueeze(1),
                    self._modality_ids(modality_layout, x_TH), self.aux_threshold))
        output = self._forward_selected(hidden_states, selected_K, modality_layout, None, rotary_pos_emb,
                                        record_metrics=True, forward_id=forward_id)
        if tp_group is not None:
            output = scatter_to_sequence_parallel_region(output, group=tp_group)
        return output, context

    def _sequence_parallel_group(self):
        return sequence_parallel_group(self.config, self.pg_collection.tp)

    @torch.no_grad()
    def _top_scored(self, x_TH: Tensor) -> Tensor:
        """Expert-choice MoD routing: the k_d tokens of highest router score, ascending. Without
        gradients: ``_forward_selected`` computes the gates again on the chosen tokens alone, so the
        router's backward covers k_d tokens, not all of them."""
        k = min(x_TH.shape[0], math.ceil(x_TH.shape[0] * self.config.mod_capacity))
        scores_T = sigmoid_scores(self.mod_router(x_TH)).squeeze(1)
        # Ascending by a sort of the k indices, not by a mask's nonzero (which syncs on CUDA).
        return scores_T.topk(k, sorted=False).indices.sort().values

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

    def _forward_selected(self, hidden_states: Tensor, selected_K: Tensor,
                          layout: Optional[ModalityLayout], positions_T: Optional[Tensor],
                          rotary_pos_emb: Optional[Tensor], kv_cache: Optional[KVCache] = None,
                          record_metrics: bool = False, forward_id: Optional[int] = None):
        """Runs the layer on the tokens ``selected_K`` (ascending flat indices into [s*b]) only.

        Each sample's selected tokens are packed at the front of a [s', b] sequence (s' = the most any
        sample has), keeping their order. ``positions_T`` are the tokens' positions in their sequences
        (for rotary embeddings: ``rotary_pos_emb`` is a table indexed by position); None: token t is
        at position t // b. In a MoD layer a selected token leaves as x + r * (layer(x) - x), r its
        router score; otherwise as layer(x). Others: unchanged. ``record_metrics``: count the tokens
        in ``mod_tokens_M2`` (once per ``forward_id``). One host read: the packed length together with
        the selected tokens per modality (the narrowed layout's counts).
        """
        seq, batch, hidden = hidden_states.shape
        x_TH = hidden_states.reshape(-1, hidden)
        modality_T = self._modality_ids(layout, x_TH)
        selected_M = count_ids(modality_T.index_select(0, selected_K), self.config.num_modalities)
        if record_metrics:
            self._record_mod_metrics(modality_T, selected_M, forward_id)
        num_selected = selected_K.numel()
        if num_selected == 0:
            return hidden_states
        packed_index_K, counts_B = pack_by_sample(selected_K, batch)
        packed_len, *selected_per_modality = torch.cat([counts_B.max().reshape(1), selected_M]).tolist()
        # Under SP the sublayers take the packed sequence split over TP ranks: a multiple of tp long.
        tp_group = self._sequence_parallel_group()
        if tp_group is not None:
            packed_len = -(-packed_len // tp_group.size()) * tp_group.size()
        x_KH = x_TH.index_select(0, selected_K)
        packed_PH = x_KH.new_zeros(packed_len * batch, hidden).index_copy_(0, packed_index_K, x_KH)
        rotary = None
        if rotary_pos_emb is not None:
            positions_K = (selected_K // batch if positions_T is None
                           else positions_T.index_select(0, selected_K))
            packed_positions_P = positions_K.new_zeros(packed_len * batch).index_copy_(
                0, packed_index_K, positions_K)
            rotary = rotary_pos_emb.index_select(0, packed_positions_P).reshape(
                packed_len, batch, *rotary_pos_emb.shape[2:])
        packed_layout = None
        if self._attention_side and layout is not None:
            packed_layout = _packed_layout(layout, modality_T.index_select(0, selected_K), packed_index_K,
                                           packed_len * batch, selected_per_modality)
        with self._kv_cache_scope(kv_cache, counts_B), \
                self._layout_scope(self._attention_side, packed_layout):
            attended = _split_sequence(
                lambda x: forward_attention(self, x, rotary_pos_emb=rotary),
                packed_PH.view(packed_len, batch, hidden), tp_group)
        y_K1H = attended.reshape(-1, hidden).index_select(0, packed_index_K).unsqueeze(1)
        narrowed = None
        if self._mlp_side and layout is not None:
            narrowed = narrow_layout(layout, selected_K, selected_per_modality)
        with self._layout_scope(self._mlp_side, narrowed):
            out_K1H = _split_sequence(partial(forward_mlp, self), y_K1H, tp_group)
        out_KH = out_K1H.reshape(num_selected, hidden)
        if not self.is_mod:
            return x_TH.index_copy(0, selected_K, out_KH).view(seq, batch, hidden)
        gate_K1 = sigmoid_scores(self.mod_router(x_KH))
        # x + r * (out - x) on the selected rows. index_add, unlike index_copy, passes the output's
        # gradient to x_TH as it is (index_copy's backward clones it and zeroes the selected rows).
        delta_KH = gate_K1.to(out_KH.dtype) * (out_KH - x_KH)
        return x_TH.index_add(0, selected_K, delta_KH).view(seq, batch, hidden)

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
    def _record_mod_metrics(self, modality_T: Tensor, processed_M: Tensor, forward_id: Optional[int]):
        """Adds the processed tokens per modality (``processed_M``) and all tokens per modality to
        ``mod_tokens_M2``, once per forward id (not again when activation recompute reruns it)."""
        if not is_new_forward(forward_id, self._mod_recorded_forward_id):
            return
        self._mod_recorded_forward_id = forward_id
        self.mod_tokens_M2[:, 0] += processed_M
        self.mod_tokens_M2[:, 1] += count_ids(modality_T, self.mod_tokens_M2.shape[0])

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
        if self._sequence_parallel_group() is not None:
            raise NotImplementedError(
                "KV-cache decoding does not run under sequence parallelism; build the model with "
                "sequence_parallel=False (the weights are the same; moma-generate does so).")
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.is_mod:
            selected_K = self._aux_selected(x_TH, valid_T)
        else:
            selected_K = valid_T.nonzero().squeeze(1)
        return self._forward_selected(hidden_states, selected_K, layout, positions_T, rotary_pos_emb,
                                      kv_cache)
