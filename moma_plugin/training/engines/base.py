"""What every engine does, and the one interface the training loop sees.

An engine owns the model as it runs (``module``: wrapped by DDP, sharded by FSDP2, partitioned by
DeepSpeed), the optimizer, and everything between a micro-batch's loss and the optimizer step: the
gradient reduction over data-parallel ranks, accumulation over micro-batches, clipping, the step
itself, and the full (unsharded) state a checkpoint keeps. The loop calls, per step::

    engine.zero_grad()
    for each micro-batch:  with engine.accumulating(last):  engine.backward(engine.module(...) loss)
    norm = engine.clip(max_norm, parameters)   # before the step; inf/nan: the step is skipped
    engine.step()

Every engine averages gradients over the data-parallel ranks (as DDP, FSDP2 and DeepSpeed do by
default); the loop's loss is the sum over the global batch's tokens divided by their number, so it
scales its loss by the data-parallel size (``loss_scale``).
"""

import math
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterable, List, Optional

import torch

from ...cli import UsageError
from ...expert_parallel import gather_rows, is_expert_parallel, local_rows
from ...experts import holds_expert_state


def is_tp_sharded(param) -> bool:
    return getattr(param, "tensor_model_parallel", False)


def full(tensor):
    """The whole tensor of a DTensor (a collective over its mesh), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def total_norm(tensors_kinds: Iterable, parallel) -> float:
    """The L2 norm of ``(tensor, (tp_sharded, ep_sharded))`` pairs over the whole model: torch's
    ``get_total_norm`` per kind (over a DTensor's whole mesh for FSDP2 shards), the squares of
    tensor-parallel shards summed over the TP group and those of expert-parallel experts over the EP
    group, replicated tensors counted once, every pipeline stage's summed; float64 sums."""
    kinds = [(tp, ep) for tp in (True, False) for ep in (True, False)]
    squares = torch.zeros(len(kinds), dtype=torch.float64, device=parallel.device)
    pairs = list(tensors_kinds)
    for i, kind in enumerate(kinds):
        group = [t for t, k in pairs if k == kind]
        if group:
            squares[i] = full(torch.nn.utils.get_total_norm(group, 2.0)).double().pow(2)
    if parallel.tp > 1:  # kinds 0, 1: TP-sharded
        torch.distributed.all_reduce(squares[:2], group=parallel.tp_group)
    if parallel.ep > 1:  # kinds 0, 2: EP-sharded
        ep_sharded = squares[0::2].clone()
        torch.distributed.all_reduce(ep_sharded, group=parallel.ep_group)
        squares[0::2] = ep_sharded
    if parallel.pp > 1:
        torch.distributed.all_reduce(squares, group=parallel.pp_group)
    return float(squares.sum().sqrt())


@torch.no_grad()
def _sum_in_place(tensors: List[torch.Tensor], group, divide_by: float = 1.0):
    """Each tensor summed over ``group`` (None: not at all) and divided by ``divide_by``, in place,
    with one all-reduce of them flattened together."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if group is not None:
        torch.distributed.all_reduce(flat, group=group)
    if divide_by != 1.0:
        flat /= divide_by
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))


def _sum_gradients(params: List[torch.nn.Parameter], group, divide_by: float):
    """The gradients of ``params`` summed over ``group`` (None: not at all) and divided by
    ``divide_by``; a parameter without one gets zeros first, so every rank reduces the same tensors
    whatever its tokens."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if params and (group is not None or divide_by != 1):
        _sum_in_place([p.grad for p in params], group, divide_by=divide_by)


def reduce_expert_gradients(params: List[torch.nn.Parameter], parallel):
    """After the last micro-batch: the gradients of expert-parallel ``params`` (each owner's already
    sums every EP rank's tokens) summed over the expert-data-parallel group and divided by the
    data-parallel size, as the engines average the other gradients."""
    group = parallel.expert_dp_group if parallel.dp // parallel.ep > 1 else None
    _sum_gradients(params, group, divide_by=parallel.dp)


def reduce_pipeline_gradients(model: torch.nn.Module, parallel):
    """Under pipeline parallelism, after Megatron's schedule ran every micro-batch: each gradient
    averaged over the data-parallel group, then the gradient of tied embeddings summed over the
    first and last stages (each holds a copy: the embedding's and the output layer's use)."""
    from megatron.core import parallel_state

    _sum_gradients([p for p in model.parameters() if p.requires_grad],
                   parallel.dp_group if parallel.dp > 1 else None, divide_by=parallel.dp)
    if model.share_embeddings_and_output_weights and (model.pre_process or model.post_process):
        weight = model.shared_embedding_or_output_weight()
        torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


@torch.no_grad()
def reduce_sequence_parallel_gradients(model: torch.nn.Module, tp_group):
    """Sums over the TP group the gradients of parameters flagged ``sequence_parallel`` (norms and
    row-parallel biases under sequence parallelism: each TP rank saw only its chunk of the sequence,
    so each holds part of the gradient)."""
    if tp_group is None or tp_group.size() == 1:
        return
    grads = [p.grad for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads:  # FSDP2: each DTensor's shard on this data-parallel rank
        _sum_in_place([g.to_local() if hasattr(g, "to_local") else g for g in grads], tp_group)


def kind(param):
    """(split by tensor parallelism, split by expert parallelism): how ``total_norm`` counts it."""
    return is_tp_sharded(param), is_expert_parallel(param)


def counted(param) -> bool:
    """False for the last pipeline stage's copy of tied embeddings (Megatron flags it ``shared``):
    norms count the first stage's."""
    return not getattr(param, "shared", False)


class Engine:
    """The interface (see the module docstring); the defaults are those of a torch optimizer over
    plain or DTensor parameters."""

    name = "?"
    accounting = "ddp"  # its row in ``memory.bytes_per_parameter``

    def __init__(self, model: torch.nn.Module, args, parallel):
        self.model, self.args, self.parallel = model, args, parallel
        self.module = model  # what the forward runs through
        self.optimizer = None  # set by the engine
        self.loss_scale = float(parallel.dp)  # engines average gradients over DP ranks

    # -- a step -------------------------------------------------------------------------------------
    def autocast(self):
        """The context of a forward: bf16 autocast where the engine's mixed precision is torch's."""
        return nullcontext()

    @contextmanager
    def accumulating(self, last: bool):
        """Around one micro-batch's forward and backward; ``last``: the gradients are reduced."""
        yield

    def backward(self, loss: torch.Tensor):
        loss.backward()

    def zero_grad(self):
        # On CUDA freed gradients go back to the caching allocator; on CPU they go back to the
        # operating system and the next step's fresh buffers page-fault: there they are kept and
        # zeroed in place.
        self.optimizer.zero_grad(set_to_none=self.parallel.device.type != "cpu")

    def finish_gradients(self):
        """After the last micro-batch's backward and the engine's reduction, before clipping: the
        gradients of sequence-parallel parameters summed over the TP group."""
        reduce_sequence_parallel_gradients(self.model, self.parallel.tp_group)

    def clip(self, max_norm: float, parameters: List[torch.nn.Parameter]) -> float:
        """The global gradient norm of ``parameters`` before clipping; scales their gradients down to
        ``max_norm`` when above it (0: no clipping)."""
        grads = [(p.grad, kind(p)) for p in parameters if p.grad is not None]
        norm = total_norm([(p.grad, kind(p)) for p in parameters if p.grad is not None and counted(p)],
                          self.parallel)
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm and grads:
            # One call per mesh: FSDP2's DTensors of the data-parallel mesh and those of the
            # expert-data-parallel mesh (expert parallelism) do not mix in one foreach call.
            by_mesh = {}
            for g, _ in grads:
                by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
            for same in by_mesh.values():
                torch._foreach_mul_(same, max_norm / (norm + 1e-6))
        return norm

    def step(self):
        self.optimizer.step()

    @property
    def clips_itself(self) -> bool:
        """True when the engine clips inside ``step`` (DeepSpeed's ``gradient_clipping``)."""
        return False

    def skipped_for_loss_scale(self) -> bool:
        """With ``clips_itself``: True when dynamic loss scaling skipped the step (an overflow)."""
        return False

    def grad_norm_after_step(self) -> float:
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------------------
    def full_model_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's whole weights (every rank calls it; it may be a collective): with expert
        parallelism every EP rank's experts (their names are global)."""
        state = {k: full(v) for k, v in self.model.state_dict().items()}
        if self.parallel.ep > 1:
            parts = [None] * self.parallel.ep
            is_expert = holds_expert_state(self.model)
            mine = {k: v.cpu() for k, v in state.items() if is_expert(k)}
            torch.distributed.all_gather_object(parts, mine, group=self.parallel.ep_group)
            for part in parts:
                state.update(part)
        return state

    def model_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """What the checkpoint's rank file keeps of the model: its whole weights, or None when the
        engine writes them itself (``save_engine_files``)."""
        return self.full_model_state_dict()

    def optimizer_state_dict(self) -> Dict:
        """The optimizer's full state, parameter groups carrying the parameters' names."""
        state = self.optimizer.state_dict()
        params = self._numbered_parameters()
        group = self.parallel.ep_group
        state["state"] = {i: {k: gather_rows(full(v), params[i], group) if torch.is_tensor(v) else v
                              for k, v in entry.items()} for i, entry in state["state"].items()}
        return state

    def load_optimizer_state_dict(self, state: Dict):
        """Loads a full optimizer state (numbered as ``self.optimizer``'s parameters; every expert's
        moments: this EP rank keeps its experts')."""
        params = self._numbered_parameters()
        for index, entry in state["state"].items():
            for key, value in list(entry.items()):
                if torch.is_tensor(value) and is_expert_parallel(params[index]):
                    entry[key] = local_rows(value, params[index])
        self.optimizer.load_state_dict(state)

    def _numbered_parameters(self) -> List[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def parameter_norm(self) -> float:
        """The global L2 norm of the weights (TP shards summed, replicated weights counted once); NaN
        or inf when a weight is not finite (a checkpoint records it: a diverged one shows in it)."""
        return total_norm([(p.detach(), kind(p)) for p in self.model.parameters() if counted(p)], self.parallel)

    def load_checkpoint(self, state: Dict, directory):
        """Restores the optimizer (and weights the model does not hold yet: the loop loads whole
        weights before the engine wraps the model) from a checkpoint's ``state``, read from
        ``directory``."""
        from ..resume import load_optimizer_state

        if state["optimizer"].get("state") is None:
            if state["moma"].get("optimizer_not_kept"):
                raise UsageError(f"{directory} holds no optimizer state: {state['moma']['optimizer_not_kept']}")
            raise UsageError(f"{directory} was written by the {state.get('engine', '?')} engine, which keeps "
                             "its optimizer state in its own format; resume it with that engine's flags "
                             "(docs/TRAINING.md, \"Engines\")")
        load_optimizer_state(self.optimizer, self.model, state, load=self.load_optimizer_state_dict)

    # Written beside the checkpoint's rank files by every rank (None: nothing): a callable taking the
    # staging directory, returning the sub-directory it wrote.
    save_engine_files = None

    def describe(self) -> str:
        return self.name
