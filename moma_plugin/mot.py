"""Mixture-of-Transformers (MoT, arXiv 2411.04996): per-modality attention projections and norms.

MoT unties every non-embedding parameter by modality around one global attention:
``a = GlobalAttn(x, {theta_attn^m})``, ``h_i = x_i + Norm^{m_i}_attn(a_i)``,
``out_i = h_i + Norm^{m_i}_ffn(FFN^{m_i}(h_i))``. The layer keeps Megatron's ``SelfAttention`` (one causal
attention over the whole interleaved sequence, KV cache included); this module gives it

- ``ModalityColumnLinear`` / ``ModalityRowLinear``: the Q/K/V and output projections with one weight per
  modality, stacked [M, out, in], split over TP ranks as Megatron's Column/RowParallelLinear split theirs;
- ``ModalityNorm``: LayerNorm / RMSNorm with one weight (and bias) per modality, [M, H].

The untied FFN is ``MoMaMLP`` with one unrouted expert per modality (``ExpertGroup.routed``). Each module
reads the modality layout its layer computed once per forward (``LayoutUser``): a projection runs each
modality's tokens, sorted by ``layout.order_T``, through that modality's weight (one matmul per
modality, no per-layer sort or host read); ``modality_matmul_reference`` computes every modality's
projection for every token and keeps each token's own, the slow definition the fast path must match.

Checkpoints hold one tensor per modality, ``<module>.<modality>.weight`` (``linear_qkv.image.weight``),
so TP re-layout (``training.tp_layout``) and upcycling (``moma-upcycle``, dense -> MoT) read them by name.
"""

import re
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from .experts import init_device, tp_shard
from .layout import LayoutUser, ModalityLayout, local_modality_ids


def modality_matmul(x_TI: Tensor, weight_MOI: Tensor, layout: ModalityLayout) -> Tensor:
    """Fast path: token t times its modality's weight, [T, I] -> [T, O]. The tokens are gathered in
    modality order, each modality's block multiplied by its weight, and scattered back."""
    order_T = layout.order_T
    x_sorted = x_TI.index_select(0, order_T)
    y_sorted = torch.cat([x_CI @ w_OI.t() for x_CI, w_OI in
                          zip(torch.split(x_sorted, list(layout.counts)), weight_MOI.unbind(0))])
    return torch.empty_like(y_sorted).index_copy(0, order_T, y_sorted)


def modality_matmul_reference(x_TI: Tensor, weight_MOI: Tensor, layout: ModalityLayout) -> Tensor:
    """Reference: every modality's projection of every token; each token keeps its own modality's."""
    ids_T1 = layout.modality_ids_T.unsqueeze(1)
    out = None
    for m, w_OI in enumerate(weight_MOI.unbind(0)):
        y_TO = x_TI @ w_OI.t()
        out = y_TO if out is None else torch.where(ids_T1 == m, y_TO, out)
    return out


class PerModalityState(torch.nn.Module):
    """Saves each stacked [M, ...] parameter as one tensor per modality, ``<modality>.<name>``, and
    loads either form."""

    def _init_modalities(self, config):
        self.modality_names = tuple(config.moma_modalities)

    def _stacked(self) -> Dict[str, Tensor]:
        return {name: p for name, p in self._parameters.items() if p is not None}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, param in self._stacked().items():
            stacked = param if keep_vars else param.detach()
            for modality, tensor in zip(self.modality_names, stacked.unbind(0)):
                destination[f"{prefix}{modality}.{name}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, param in self._stacked().items():
            keys = [f"{prefix}{modality}.{name}" for modality in self.modality_names]
            stacked = prefix + name in state_dict  # the stacked tensor itself
            if stacked:
                keys, shape = [prefix + name], tuple(param.shape)
            else:
                missing = [k for k in keys if k not in state_dict]
                missing_keys.extend(missing)
                if missing:
                    continue
                shape = tuple(param.shape[1:])
            bad = [k for k in keys if tuple(state_dict[k].shape) != shape]
            if bad:
                error_msgs.append(f"size mismatch for {bad[0]}: copying a param with shape "
                                  f"{tuple(state_dict[bad[0]].shape)} from checkpoint, the shape in current "
                                  f"model is {shape}.")
                continue
            with torch.no_grad():
                param.copy_(state_dict[keys[0]] if stacked else torch.stack([state_dict[k] for k in keys]))
        known = {f"{prefix}{m}.{n}" for m in self.modality_names for n in self._stacked()} | {
            prefix + n for n in self._stacked()}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known
                               and not k.endswith("_extra_state"))


# The checkpoint tensors each MoT part unties, as (module, tensor) groups; ``_extra_state``: a Megatron
# linear's FP8 state, which has no untied counterpart.
UNTIED_TENSORS = {
    "attention": re.compile(r"(.*\.self_attention\.linear_(?:qkv|proj))\.(weight|bias|_extra_state)"),
    "norms": re.compile(r"(.*\.(?:input|pre_mlp|post_self_attn|post_mlp)_layernorm)\.(weight|bias)"),
}


def untied_tensor(key: str, parts: Sequence[str] = tuple(UNTIED_TENSORS)) -> Optional[Tuple[str, str, str]]:
    """(part, module, tensor name) when checkpoint key ``key`` is a tensor one of ``parts`` unties."""
    for part in parts:
        match = UNTIED_TENSORS[part].fullmatch(key) if part in UNTIED_TENSORS else None
        if match:
            return part, match.group(1), match.group(2)
    return None


def per_modality_state(state: Dict[str, Any], modalities: Sequence[str]) -> Dict[str, Any]:
    """``state`` with each stacked MoT tensor (``...linear_qkv.weight`` [M, out, in], as an FSDP2
    checkpoint's DCP directory holds the parameters) split into a checkpoint's per-modality names
    (``...linear_qkv.<modality>.weight``); tied tensors (one dimension fewer) are left as they are."""
    out = {}
    for key, value in state.items():
        found = untied_tensor(key)
        if found is not None and torch.is_tensor(value):
            part, module, name = found
            tied_dims = 2 if (part, name) == ("attention", "weight") else 1
            if value.dim() == tied_dims + 1 and value.shape[0] == len(modalities):
                out.update({f"{module}.{m}.{name}": t for m, t in zip(modalities, value.unbind(0))})
                continue
        out[key] = value
    return out


def _master_weights(config, init_method, out_features: int, in_features: int, dim: int, tp_group) -> Tensor:
    """One [out, in] master weight per modality, initialised on CPU like Megatron's CPU initialisation,
    each cut to this TP rank's part along ``dim``: [M, out/tp, in] or [M, out, in/tp]."""
    world = tp_group.size() if tp_group is not None else 1
    rank = tp_group.rank() if tp_group is not None else 0
    shards = []
    for _ in config.moma_modalities:
        master = torch.empty(out_features, in_features)
        init_method(master)
        shards.append(tp_shard(master, dim, 1, rank, world))
    return torch.nn.Parameter(torch.stack(shards).to(device=init_device(config), dtype=config.params_dtype))


class _ModalityLinear(MegatronModule, LayoutUser, PerModalityState):
    """Shared by the column- and row-parallel projections: weight [M, out, in] (this rank's part)."""

    parallel_dim: int  # the weight's dim split over TP ranks: 1 (column) or 2 (row)

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = True,
                 skip_bias_add: bool = False, tp_group=None, **unused):
        super().__init__(config=config)
        if unused.get("gather_output") or unused.get("input_is_parallel") is False:
            raise NotImplementedError(
                f"{type(self).__name__} is the attention's untied projection: it does not gather its output "
                f"(column) and takes a TP-parallel input (row); got {unused}.")
        self._init_modalities(config)
        self.tp_group = tp_group
        self.world = tp_group.size() if tp_group is not None else 1
        self.sequence_parallel = bool(config.sequence_parallel) and self.world > 1
        self.weight = _master_weights(config, init_method, output_size, input_size,
                                      self.parallel_dim - 1, tp_group)
        set_tensor_model_parallel_attributes(self.weight, True, self.parallel_dim, 1)
        self.bias = None
        if bias:
            width = self.weight.shape[1]
            self.bias = torch.nn.Parameter(self.weight.new_zeros(len(self.modality_names), width))
            if self.parallel_dim == 1:
                set_tensor_model_parallel_attributes(self.bias, True, 1, 1)
            else:  # replicated, as RowParallelLinear's; under SP each rank adds it to its chunk
                self.bias.sequence_parallel = self.sequence_parallel

    def _project(self, x_SBI: Tensor) -> Tensor:
        x_TI = x_SBI.reshape(-1, x_SBI.shape[-1])
        layout = self.require_layout(x_TI.shape[0])
        y_TO = modality_matmul(x_TI, self.weight, layout)
        return y_TO.view(*x_SBI.shape[:-1], -1)

    def _add_bias(self, y_SBO: Tensor, ids_T: Tensor) -> Tensor:
        if self.bias is None:
            return y_SBO
        return y_SBO + self.bias.index_select(0, ids_T).view_as(y_SBO)

    def extra_repr(self) -> str:
        return f"modalities={self.modality_names}, weight {tuple(self.weight.shape)}"


class ModalityColumnLinear(_ModalityLinear):
    """Megatron's ColumnParallelLinear (no gathered output) with a weight per modality: the fused QKV
    projection. Under sequence parallelism the input chunks are gathered first, as Megatron does."""

    parallel_dim = 1

    def forward(self, x_SBI: Tensor):
        if self.sequence_parallel:
            x_SBI = gather_from_sequence_parallel_region(x_SBI, tensor_parallel_output_grad=True,
                                                         group=self.tp_group)
        else:
            x_SBI = copy_to_tensor_model_parallel_region(x_SBI, group=self.tp_group)
        y_SBO = self._project(x_SBI)
        return self._add_bias(y_SBO, self.layout.modality_ids_T), None


class ModalityRowLinear(_ModalityLinear):
    """Megatron's RowParallelLinear (input already parallel) with a weight per modality: the attention
    output projection. The bias is added after the reduction and returned as None even where Megatron
    asks for it apart (``skip_bias_add``: it differs per token; bias-dropout-add then adds None). Under
    sequence parallelism the output is reduce-scattered to this rank's chunk."""

    parallel_dim = 2

    def forward(self, x_SBI: Tensor):
        y_SBO = self._project(x_SBI)
        if self.sequence_parallel:
            y_SBO = reduce_scatter_to_sequence_parallel_region(y_SBO, group=self.tp_group)
            ids_T = local_modality_ids(self.layout, y_SBO.shape[0] * y_SBO.shape[1],
                                       (self.tp_group.rank(), self.world))
        else:
            y_SBO = reduce_from_tensor_model_parallel_region(y_SBO, group=self.tp_group)
            ids_T = self.layout.modality_ids_T
        return self._add_bias(y_SBO, ids_T), None


class ModalityNorm(MegatronModule, LayoutUser, PerModalityState):
    """LayerNorm or RMSNorm whose weight (and LayerNorm's bias) is per modality: [M, H]. Normalises
    without affine, then scales (and shifts) each token by its modality's row. Under sequence
    parallelism it holds this rank's chunk (``sequence_chunk``) and its parameters are flagged
    ``sequence_parallel`` (gradients summed over the TP group)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config=config)
        if config.normalization not in ("LayerNorm", "RMSNorm") or config.layernorm_zero_centered_gamma:
            raise NotImplementedError(
                f"Mixture-of-Transformers norms take LayerNorm or RMSNorm without zero-centred gamma "
                f"(normalization={config.normalization!r}); change those or untie no norms (drop 'norms' "
                "from mot).")
        self._init_modalities(config)
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        shape = (len(self.modality_names), hidden_size)
        self.weight = torch.nn.Parameter(torch.ones(shape, device=init_device(config), dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(shape, device=init_device(config), dtype=config.params_dtype))
        for param in self._stacked().values():
            param.sequence_parallel = bool(config.sequence_parallel)

    def normalise(self, x: Tensor) -> Tensor:
        if self.rms:
            return F.rms_norm(x, x.shape[-1:], eps=self.eps)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x_SBH: Tensor) -> Tensor:
        layout = self.require_layout()
        ids_T = local_modality_ids(layout, x_SBH.shape[0] * x_SBH.shape[1], self.sequence_chunk)
        y_SBH = self.normalise(x_SBH) * self.weight.index_select(0, ids_T).view_as(x_SBH)
        if self.bias is not None:
            y_SBH = y_SBH + self.bias.index_select(0, ids_T).view_as(x_SBH)
        return y_SBH

    def reference(self, x_SBH: Tensor, ids_T: Optional[Tensor] = None) -> Tensor:
        """Slow definition: each modality's own LayerNorm/RMSNorm on all tokens, each token keeping its own."""
        ids_SB1 = (self.layout.modality_ids_T if ids_T is None else ids_T).view(*x_SBH.shape[:2], 1)
        out = None
        for m in range(len(self.modality_names)):
            bias = None if self.bias is None else self.bias[m]
            y = (F.rms_norm(x_SBH, x_SBH.shape[-1:], self.weight[m], self.eps) if self.rms else
                 F.layer_norm(x_SBH, x_SBH.shape[-1:], self.weight[m], bias, self.eps))
            out = y if out is None else torch.where(ids_SB1 == m, y, out)
        return out
