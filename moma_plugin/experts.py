"""The experts of a MoMa layer: their stacked weights, and the ways to run them on the tokens they chose.

``StackedExperts`` holds the SwiGLU experts of every group of a layer as four parameters, so that no step
copies weights: ``fc1_weight`` [E, 2F, H] (each expert's gate rows, then its up rows), ``fc2_weight``
[E, H, F], and with ``add_bias_linear`` ``fc1_bias`` [E, 2F] and ``fc2_bias`` [E, H]. Experts are numbered
group by group (text 0..3, then image 0..3 for ``4t4i``). Tensor parallelism splits the FFN width F, as
Megatron's Column/RowParallelLinear pair does; expert parallelism splits E (each EP rank holds a
block of every group: ``expert_parallel``); an upcycled layer copies one expert into all E.
Checkpoints keep one tensor per expert under the names Megatron's ``MLP`` experts had
(``<group>.<index>.linear_fc1.weight``), so checkpoints written before the weights were stacked load.

The A = sum_e C_e chosen tokens arrive sorted by expert; ``tokens_per_expert`` (host ints) says how many
each expert took. Four executions, which must agree:

- ``run_experts_loop``: each expert's two matmuls on its slice, over views of the stacked weights, under
  autograd: the reference.
- ``run_experts_chunked``: the same loop with a hand-written backward that writes each expert's weight
  gradient into its slice of the stacked gradient: the fastest on CPU.
- ``run_experts_grouped``: two ``torch._grouped_mm`` calls over all experts (one kernel each on GPUs).
- ``run_experts_padded``: the same with ``torch.bmm`` on a [E, C_max, H] padded batch, for devices,
  dtypes or shapes ``_grouped_mm`` does not take.

``choose_execution`` is the rule behind ``moma_expert_execution="auto"`` (see its docstring).
Every expert takes part every step, also with zero tokens, so each expert parameter always gets a
gradient (zeros if idle) and sharded data parallelism never waits on a rank whose expert was idle.
"""

from typing import Any, Dict, List, Optional, Sequence

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import Tensor

from .expert_parallel import ExpertParallel, local_rows

# Shape letters (the package's legend is in moma_plugin/__init__.py): A chosen (token, expert) pairs,
# H hidden size, F the FFN width on this TP rank, E experts of the layer, C tokens of one expert.

EXECUTIONS = ("auto", "loop", "chunked", "grouped", "padded")
CHUNKED_MIN_TOKENS_PER_EXPERT = 64

# Per-expert checkpoint names of each stacked parameter (Megatron MLP's names).
_EXPERT_KEYS = {"fc1_weight": "linear_fc1.weight", "fc1_bias": "linear_fc1.bias",
                "fc2_weight": "linear_fc2.weight", "fc2_bias": "linear_fc2.bias"}


def tp_shard(full: Tensor, dim: int, stride: int, rank: int, world: int) -> Tensor:
    """This rank's part of a full tensor, as Megatron splits a master weight: pieces of
    size/(world*stride) along ``dim``, rank r taking pieces r, r + world, ... (SwiGLU's fc1 has stride
    2: each rank holds its slice of the gate and its slice of the up projection)."""
    pieces = torch.split(full, full.shape[dim] // (world * stride), dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def init_device(config) -> str:
    """Where a module's parameters are made: the CPU under ``use_cpu_initialization`` or without CUDA."""
    return "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else "cuda"


class StackedExperts(torch.nn.Module):
    """The SwiGLU experts of all groups of one MoMa layer, stored stacked (see the module docstring)."""

    def __init__(self, config, groups: Sequence, tp_group=None):
        super().__init__()
        # Every expert of the layer, and (under expert parallelism) those this EP rank holds: its
        # block of every group (moma_plugin.expert_parallel).
        self.all_expert_names: List[str] = [f"{g.name}.{i}" for g in groups for i in range(g.num_experts)]
        self.ep, held = None, list(range(len(self.all_expert_names)))
        ep = getattr(config, "expert_model_parallel_size", 1)
        if ep > 1:
            from megatron.core import parallel_state

            sizes = [g.num_experts for g in groups]
            self.ep = ExpertParallel(sizes, parallel_state.get_expert_model_parallel_group())
            held = self.ep.owned[self.ep.rank]
        self.expert_names: List[str] = [self.all_expert_names[i] for i in held]
        self.tp_group = tp_group
        world = tp_group.size() if tp_group is not None else 1
        rank = tp_group.rank() if tp_group is not None else 0
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.activation = config.activation_func
        device = init_device(config)
        # Each expert as Megatron's CPU initialisation does it: the full master weight initialised
        # (fc1 then fc2, expert by expert), then this rank's slice kept.
        # Under EP every expert is drawn and those of other ranks dropped: the same weights at any
        # EP size.
        fc1, fc2 = [], []
        for index in range(len(self.all_expert_names)):
            master1, master2 = torch.empty(2 * ffn, hidden), torch.empty(hidden, ffn)
            config.init_method(master1)
            config.output_layer_init_method(master2)
            if index in held:
                fc1.append(tp_shard(master1, 0, 2, rank, world))
                fc2.append(tp_shard(master2, 1, 1, rank, world))
        # (Built under ``torch.device("meta")``, e.g. to count parameters, the tensors stay there.)
        make = lambda t: torch.nn.Parameter(  # noqa: E731
            t.to(device=t.device if t.is_meta else device, dtype=config.params_dtype))
        self.fc1_weight = make(torch.stack(fc1))  # [E, 2F, H]
        self.fc2_weight = make(torch.stack(fc2))  # [E, H, F]
        set_tensor_model_parallel_attributes(self.fc1_weight, True, 1, 2)
        set_tensor_model_parallel_attributes(self.fc2_weight, True, 2, 1)
        self.fc1_bias = self.fc2_bias = None
        if config.add_bias_linear:
            self.fc1_bias = make(torch.zeros(len(fc1), 2 * ffn // world))  # [E, 2F]
            self.fc2_bias = make(torch.zeros(len(fc1), hidden))  # [E, H], replicated like RowParallel's
            set_tensor_model_parallel_attributes(self.fc1_bias, True, 1, 2)
        if self.ep is not None:
            for param in self.stacked_parameters().values():
                param.expert_rows, param.all_expert_rows = held, self.ep.owned
                param.num_global_experts = len(self.all_expert_names)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def run(self, runner, x_AH: Tensor, tokens_per_expert: Sequence[int]) -> Tensor:
        """``runner(x_AH, tokens_per_expert, self)``: every use of the weights goes through here, so
        an FSDP2 unit of the experts alone (expert parallelism) gathers them around it
        (``register_fsdp_forward_method``)."""
        return runner(x_AH, tokens_per_expert, self)

    def stacked_parameters(self) -> Dict[str, Tensor]:
        return {name: p for name in _EXPERT_KEYS if (p := getattr(self, name)) is not None}

    def expert_keys(self, name: str, every: bool = False) -> List[str]:
        """The per-expert checkpoint names (relative to this module) of stacked parameter ``name``:
        of the experts this rank holds, or with ``every`` of all the layer's experts."""
        experts = self.all_expert_names if every else self.expert_names
        return [f"{expert}.{_EXPERT_KEYS[name]}" for expert in experts]

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} ({', '.join(self.expert_names)}), "
                f"fc1 {tuple(self.fc1_weight.shape)}, fc2 {tuple(self.fc2_weight.shape)}")

    # -- checkpoints: one tensor per expert ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, param in self.stacked_parameters().items():
            stacked = param if keep_vars else param.detach()
            if hasattr(stacked, "full_tensor"):  # an FSDP2 shard (a DTensor): every rank gathers it
                stacked = stacked.full_tensor()
            for key, tensor in zip(self.expert_keys(name), stacked.unbind(0)):
                destination[prefix + key] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        known = set()
        for name, param in self.stacked_parameters().items():
            keys = [prefix + key for key in self.expert_keys(name)]
            # Other EP ranks' experts are not unexpected: a checkpoint holds every expert.
            known.update(prefix + f"{expert}.{_EXPERT_KEYS[name]}" for expert in self.all_expert_names)
            stacked = prefix + name in state_dict  # the stacked tensor itself
            if stacked:
                keys, known = [prefix + name], known | {prefix + name}
            present = [k for k in keys if k in state_dict]
            missing_keys.extend(k for k in keys if k not in state_dict)
            if len(present) != len(keys):
                continue
            incoming = [state_dict[k] for k in keys]
            if stacked and incoming[0].shape[0] == len(self.all_expert_names):
                incoming = [local_rows(incoming[0], param)]  # every expert's: this EP rank's rows
            shape = param.shape if stacked else param.shape[1:]
            bad = [(k, t) for k, t in zip(keys, incoming) if tuple(t.shape) != tuple(shape)]
            if bad:
                key, tensor = bad[0]
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(tensor.shape)} from checkpoint, the shape in current "
                                  f"model is {tuple(shape)}.")
                continue
            with torch.no_grad():
                param.copy_(incoming[0] if stacked else torch.stack(incoming))
        for key in state_dict:
            # Megatron's linears saved an ``_extra_state`` (None without FP8) per expert linear.
            if key.startswith(prefix) and key not in known and not key.endswith("._extra_state"):
                unexpected_keys.append(key)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        raise NotImplementedError(
            "megatron.core dist_checkpointing of stacked MoMa experts is not supported yet; save with "
            "moma-pretrain's checkpoints (torch.save per TP rank, one tensor per expert) or "
            "model.state_dict()."
        )


def per_expert_state(state: Dict[str, Any], groups: Sequence) -> Dict[str, Any]:
    """``state`` with each stacked expert tensor (``...experts.fc1_weight`` [E, ...] of every expert, as an
    FSDP2 checkpoint's DCP directory holds them) split into a checkpoint's per-expert names
    (``...experts.<group>.<index>.linear_fc1.weight``); ``groups``: the layers' expert groups, in order."""
    names = [f"{g.name}.{i}" for g in groups for i in range(g.num_experts)]
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if name in _EXPERT_KEYS and prefix.endswith(".experts") and torch.is_tensor(value) \
                and value.shape[0] == len(names):
            out.update({f"{prefix}.{expert}.{_EXPERT_KEYS[name]}": tensor
                        for expert, tensor in zip(names, value.unbind(0))})
        else:
            out[key] = value
    return out


def stacked_parameter_sources(model: torch.nn.Module, every: bool = False) -> Dict[str, List[str]]:
    """{name of each stacked expert parameter in ``model``: the per-expert checkpoint names it holds,
    in expert order}: what turns a checkpoint's per-expert tensors (or optimizer state) into it.
    ``every``: the names of all the layer's experts, also those other EP ranks hold."""
    sources = {}
    for module_name, module in model.named_modules():
        if isinstance(module, StackedExperts):
            prefix = f"{module_name}." if module_name else ""
            for name in module.stacked_parameters():
                sources[prefix + name] = [prefix + key for key in module.expert_keys(name, every)]
    return sources


def holds_expert_state(model: torch.nn.Module):
    """A predicate on ``model.state_dict()``'s keys: True for those of its StackedExperts."""
    prefixes = tuple(f"{name}." for name, module in model.named_modules()
                     if isinstance(module, StackedExperts))
    return lambda key: key.startswith(prefixes)


# -- execution -------------------------------------------------------------------------------------
def choose_execution(x_AH: Tensor, tokens_per_expert: Sequence[int], experts: StackedExperts) -> str:
    """The rule of ``moma_expert_execution="auto"``, from benchmarks/bench_moma_mlp.py and
    benchmarks/bench_paper_configs.py (benchmarks/README.md has the figures):

    - CPU: ``chunked``. ``torch._grouped_mm`` runs one matmul per expert there anyway; expert by
      expert, SwiGLU's element-wise work stays in cache (it costs about half of dense's), and the
      hand-written backward writes the weight gradients in place instead of stacking them. Below
      ``CHUNKED_MIN_TOKENS_PER_EXPERT`` tokens per expert on average (decoding), ``grouped`` where
      ``_grouped_mm`` takes the operands: at ~16 tokens per expert it ran 1.2-1.4x faster than the
      per-expert loop (bench_moma_mlp.py --quick shapes).
    - CUDA: ``grouped`` where ``_grouped_mm`` takes the operands (bf16 on compute capability 9.0+,
      16-byte row strides), else ``padded`` when the loads are even (expert choice in training gives
      every expert of a group the same count), else ``loop`` (a padded batch of uneven loads
      computes mostly padding). Not yet measured on a GPU.
    """
    if not x_AH.is_cuda:
        # Few tokens per expert (decoding, tiny micro-batches): per-expert Python work dominates, and
        # one grouped call per matmul is cheaper.
        small = sum(tokens_per_expert) < CHUNKED_MIN_TOKENS_PER_EXPERT * len(tokens_per_expert)
        return "grouped" if small and grouped_mm_supported(x_AH, experts) else "chunked"
    if grouped_mm_supported(x_AH, experts):
        return "grouped"
    loads = list(tokens_per_expert)
    even = bool(loads) and max(loads) * len(loads) <= 1.25 * max(sum(loads), 1)
    return "padded" if even else "loop"


def run_experts(execution: str, x_AH: Tensor, tokens_per_expert: Sequence[int],
                experts: "StackedExperts") -> Tensor:
    """Every expert on its rows of ``x_AH`` (sorted by expert) with the runner ``execution`` names
    (``moma_expert_execution``: 'auto' chooses by ``choose_execution``); [A, H] in, [A, H] out."""
    if execution == "auto":
        execution = choose_execution(x_AH, tokens_per_expert, experts)
    if execution == "grouped" and not grouped_mm_supported(x_AH, experts):
        execution = "padded"
    # Looked up here at call time, so tests and benchmarks can see which runner ran.
    runner = {"loop": run_experts_loop, "chunked": run_experts_chunked,
              "grouped": run_experts_grouped, "padded": run_experts_padded}[execution]
    return experts.run(runner, x_AH, tokens_per_expert)


def grouped_mm_supported(x_AH: Tensor, experts: StackedExperts) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: float32/bf16 on CPU, bf16 on Hopper or
    newer GPUs, and every row stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_AH.is_cuda:
        if x_AH.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_AH.device) < (9, 0):
            return False
    elif x_AH.dtype not in (torch.float32, torch.bfloat16):
        return False
    _, fc1_width, hidden = experts.fc1_weight.shape  # [E, 2F, H]
    item = x_AH.element_size()
    return all((dim * item) % 16 == 0 for dim in (hidden, fc1_width, fc1_width // 2))


def _swiglu(h: Tensor, activation) -> Tensor:
    # Megatron's MLP order for gated linear units: the first half is the gate.
    gate, up = torch.chunk(h, 2, dim=-1)
    return activation(gate) * up


def expert_of_each_row(tokens_per_expert: Sequence[int], device) -> Tensor:
    """[A] index of the expert each of the A chosen rows belongs to (rows sorted by expert)."""
    counts = torch.tensor(list(tokens_per_expert), device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts,
                                   output_size=sum(tokens_per_expert))


def _add_per_expert(y_AX: Tensor, bias_EX: Optional[Tensor], tokens_per_expert: Sequence[int]):
    """y + each row's expert bias, one broadcast add per expert slice (no per-row gather)."""
    if bias_EX is None:
        return y_AX
    return torch.cat([y + b for y, b in zip(torch.split(y_AX, list(tokens_per_expert)),
                                            bias_EX.unbind(0))])


def run_experts_loop(x_AH: Tensor, tokens_per_expert: Sequence[int], experts: StackedExperts) -> Tensor:
    """Reference: expert e's SwiGLU FFN on its ``tokens_per_expert[e]`` rows of ``x_AH``, in order."""
    # Tensor parallelism: each rank holds a slice of every expert's FFN width, as Megatron's
    # ColumnParallel/RowParallel linears do; one reduction for all experts instead of one each.
    x_AH = copy_to_tensor_model_parallel_region(x_AH, group=experts.tp_group)
    # unbind: one autograd node whose backward stacks the experts' gradients once. (Indexing the
    # stacked weight per expert would fill a zero tensor of the whole stack per expert in backward.)
    b1 = (experts.fc1_bias.unbind(0) if experts.fc1_bias is not None
          else [None] * experts.num_experts)
    outputs = []
    for x_CH, w1, b1_e, w2 in zip(torch.split(x_AH, list(tokens_per_expert)),
                                  experts.fc1_weight.unbind(0), b1, experts.fc2_weight.unbind(0)):
        h_CO = torch.nn.functional.linear(x_CH, w1, b1_e)  # O = 2F: [gate; up]
        outputs.append(torch.nn.functional.linear(_swiglu(h_CO, experts.activation), w2))
    y_AH = reduce_from_tensor_model_parallel_region(torch.cat(outputs), group=experts.tp_group)
    return _add_per_expert(y_AH, experts.fc2_bias, tokens_per_expert)


class _ChunkedExperts(torch.autograd.Function):
    """Expert by expert, forward and backward, each SwiGLU on one expert's slice while it is in cache;
    the backward writes each expert's weight gradient straight into its slice of the stacked gradient
    (autograd through per-expert views would stack or zero-fill the whole stack per layer). Saves the
    input and the fc1 output [A, 2F]; the activation is recomputed per expert in backward."""

    @staticmethod
    def forward(ctx, x_AH, w1_EOH, b1_EO, w2_EHF, tokens_per_expert):
        counts = list(tokens_per_expert)
        h_AO = x_AH.new_empty(x_AH.shape[0], w1_EOH.shape[1])
        y_AH = x_AH.new_empty(x_AH.shape[0], w2_EHF.shape[1])
        for e, (x_CH, h_CO, y_CH) in enumerate(zip(x_AH.split(counts), h_AO.split(counts),
                                                    y_AH.split(counts))):
            torch.mm(x_CH, w1_EOH[e].t(), out=h_CO)
            if b1_EO is not None:
                h_CO += b1_EO[e]
            torch.mm(_swiglu(h_CO, torch.nn.functional.silu), w2_EHF[e].t(), out=y_CH)
        ctx.save_for_backward(x_AH, h_AO, w1_EOH, w2_EHF)
        ctx.counts = counts
        ctx.w1, ctx.w2, ctx.b1 = w1_EOH, w2_EHF, b1_EO  # the parameters themselves, for their .grad
        return y_AH

    @staticmethod
    def backward(ctx, dy_AH):
        x_AH, h_AO, w1_EOH, w2_EHF = ctx.saved_tensors
        counts, dy_AH = ctx.counts, dy_AH.contiguous()
        dx_AH = torch.empty_like(x_AH)
        # Weight gradients go straight into the parameters' persistent .grad where it exists (the
        # training loop keeps it on CPU, where a fresh 64 MiB buffer per step would page-fault); the
        # function then returns None for them. Elsewhere into new tensors autograd accumulates.
        dw1_EOH, into_w1 = _gradient_buffer(ctx.w1)
        dw2_EHF, into_w2 = _gradient_buffer(ctx.w2)
        db1_EO, into_b1 = _gradient_buffer(ctx.b1) if ctx.b1 is not None else (None, False)
        for e, (x_CH, h_CO, dy_CH, dx_CH) in enumerate(zip(
                x_AH.split(counts), h_AO.split(counts), dy_AH.split(counts), dx_AH.split(counts))):
            gate_CF, up_CF = h_CO.chunk(2, dim=1)
            sig_CF = torch.sigmoid(gate_CF)
            silu_CF = gate_CF * sig_CF
            dw2_EHF[e].addmm_(dy_CH.t(), silu_CF * up_CF, beta=1 if into_w2 else 0)
            da_CF = dy_CH @ w2_EHF[e]
            dh_CO = torch.cat([da_CF * up_CF * (sig_CF + silu_CF * (1 - sig_CF)), da_CF * silu_CF], dim=1)
            dw1_EOH[e].addmm_(dh_CO.t(), x_CH, beta=1 if into_w1 else 0)
            torch.mm(dh_CO, w1_EOH[e], out=dx_CH)
            if db1_EO is not None:
                db1_EO[e] = (db1_EO[e] if into_b1 else 0) + dh_CO.sum(0)
        return (dx_AH, None if into_w1 else dw1_EOH, None if into_b1 else db1_EO,
                None if into_w2 else dw2_EHF, None)


def _gradient_buffer(param):
    """(where to write ``param``'s gradient, whether that is its existing ``.grad``)."""
    grad = param.grad
    if grad is not None and grad.shape == param.shape and grad.is_contiguous() and not grad.requires_grad:
        return grad, True
    return torch.empty_like(param), False


def run_experts_chunked(x_AH: Tensor, tokens_per_expert: Sequence[int], experts: StackedExperts) -> Tensor:
    """CPU fast path: ``_ChunkedExperts`` (SwiGLU with SiLU, as every MoMa expert); matches the loop."""
    x_AH = copy_to_tensor_model_parallel_region(x_AH, group=experts.tp_group)
    y_AH = _ChunkedExperts.apply(x_AH.contiguous(), experts.fc1_weight, experts.fc1_bias,
                                 experts.fc2_weight, tuple(tokens_per_expert))
    y_AH = reduce_from_tensor_model_parallel_region(y_AH, group=experts.tp_group)
    return _add_per_expert(y_AH, experts.fc2_bias, tokens_per_expert)


def run_experts_grouped(x_AH: Tensor, tokens_per_expert: Sequence[int], experts: StackedExperts) -> Tensor:
    """Fast path: two grouped matmuls over the stacked weights; matches ``run_experts_loop``."""
    offsets = torch.tensor(tokens_per_expert, dtype=torch.int64).cumsum(0).to(
        device=x_AH.device, dtype=torch.int32
    )
    x_AH = copy_to_tensor_model_parallel_region(x_AH, group=experts.tp_group)
    h_AO = torch._grouped_mm(x_AH, experts.fc1_weight.transpose(1, 2), offs=offsets)
    h_AO = _add_per_expert(h_AO, experts.fc1_bias, tokens_per_expert)
    y_AH = torch._grouped_mm(_swiglu(h_AO, experts.activation), experts.fc2_weight.transpose(1, 2),
                             offs=offsets)
    y_AH = reduce_from_tensor_model_parallel_region(y_AH, group=experts.tp_group)
    return _add_per_expert(y_AH, experts.fc2_bias, tokens_per_expert)


def run_experts_padded(x_AH: Tensor, tokens_per_expert: Sequence[int], experts: StackedExperts) -> Tensor:
    """Fast path without ``_grouped_mm``: scatter into [E, C_max, H], two ``bmm``, gather back."""
    num_experts, capacity = experts.num_experts, max(tokens_per_expert, default=0)
    total, hidden = x_AH.shape
    counts = torch.tensor(list(tokens_per_expert), device=x_AH.device)
    # Row of each chosen token in the padded [E * C_max] layout: expert * C_max + rank within expert.
    expert_A = expert_of_each_row(tokens_per_expert, x_AH.device)
    first_row_E = torch.cumsum(counts, 0) - counts
    slot_A = expert_A * capacity + torch.arange(total, device=x_AH.device) - first_row_E[expert_A]

    x_AH = copy_to_tensor_model_parallel_region(x_AH, group=experts.tp_group)
    x_ECH = x_AH.new_zeros(num_experts * capacity, hidden).index_copy(0, slot_A, x_AH)
    x_ECH = x_ECH.view(num_experts, capacity, hidden)
    h_ECO = torch.bmm(x_ECH, experts.fc1_weight.transpose(1, 2))
    if experts.fc1_bias is not None:
        h_ECO = h_ECO + experts.fc1_bias.unsqueeze(1)
    y_ECH = torch.bmm(_swiglu(h_ECO, experts.activation), experts.fc2_weight.transpose(1, 2))
    y_AH = reduce_from_tensor_model_parallel_region(y_ECH.reshape(-1, hidden)[slot_A],
                                                    group=experts.tp_group)
    return _add_per_expert(y_AH, experts.fc2_bias, tokens_per_expert)

