"""``--use-torch-fsdp2``: torch's ``fully_shard`` (FSDP2) over the data-parallel group.

Sharding plan: one FSDP unit per transformer layer (and under ``--aux-router-joint`` one per aux
router), and one for the root
(embedding, final norm, output layer, and with tied embeddings the shared weight, which must stay in
one unit). A layer's unit holds its attention, its router(s), all of its experts of every modality
group (the stacked expert weights are one parameter per layer; under expert parallelism they stay
out, see below) and its Mixture-of-Depths router.
Jointly trained aux routers are units of their own because their losses are computed after the
layer's forward (outside any activation checkpoint: ``aux_router.PendingAuxLoss``); otherwise they
run inside their layer's forward (causal routing) and belong to its unit. Every rank gathers and
reduce-scatters the same tensors in the same order whatever tokens it holds: the experts always run
(with zero tokens if need be), and so does every aux router, so a rank whose micro-batch has no image
tokens takes part in the same collectives as the others. Each parameter is sharded on its first
dimension (the experts' dimension for stacked experts without expert parallelism).

``--bf16``: a ``MixedPrecisionPolicy`` gathers bf16 parameters for compute and reduces gradients in
fp32; the sharded parameters and the optimizer state stay fp32. ``--torch-fsdp2-no-reshard-after-
forward`` keeps each layer's gathered parameters from forward to backward (more memory, one gather
fewer per layer). Clipping: torch's norm over the DTensor gradients (the whole mesh), TP shards
summed over the tensor-parallel group.

Expert parallelism: the experts' stacked weights, already split over the EP ranks, are a unit of
their own (``StackedExperts``, gathered around its ``run``) sharded over the expert-data-parallel
group instead of the data-parallel one: each rank holds 1/DP of the experts. Their gradients are
reduce-scattered over that group and divided by the data-parallel size (each owner's gradient
already sums every EP rank's tokens), as the engines average the other gradients.

Checkpoints: each rank writes its shards of the weights and Adam moments into the iteration's
``dcp/mp_rank_NN/`` (torch.distributed.checkpoint over the data-parallel group; the stacked expert
weights under their stacked names, or under expert parallelism one entry per expert under its
global name, ``...experts.image.3.linear_fc1.weight``, written by the rank whose shard holds it),
and nothing is gathered. Loading reads the shards each rank now holds, whatever the number of ranks
(and the EP size) that wrote them. A checkpoint with whole tensors (the ddp engine's) loads too:
the weights before sharding, the moments split on loading.
"""

from contextlib import contextmanager
from typing import List

import torch

from ...expert_parallel import is_expert_parallel, local_rows
from ...experts import stacked_parameter_sources
from .. import checkpointing
from ..checkpointing import MODEL_PREFIX, OPTIMIZER_PREFIX, CheckpointError
from .base import Engine


def _mesh(group, parallel):
    """A 1-D mesh over ``group``'s ranks (the data-parallel or the expert-data-parallel group)."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.distributed.get_process_group_ranks(group)
    return DeviceMesh.from_group(group, parallel.device.type, mesh=ranks)


_KEPT_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
                    "expert_rows", "all_expert_rows", "num_global_experts")


def shard_model(model, parallel, bf16: bool, reshard_after_forward: bool, aux_units: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ...aux_router import aux_routers
    from ...experts import StackedExperts

    mesh = _mesh(parallel.dp_group, parallel)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # fully_shard puts new (DTensor) parameters in place of the old ones, without their Python
    # attributes: those that clipping (TP shards), the SP gradient sum and EP read are carried over.
    kept = {name: {a: getattr(p, a) for a in _KEPT_ATTRIBUTES if hasattr(p, a)}
            for name, p in model.named_parameters()}
    expert_mesh = _mesh(parallel.expert_dp_group, parallel) if parallel.ep > 1 else None
    for layer in model.decoder.layers:
        # Trained jointly, aux routers also run after their layer's forward (their loss is computed
        # when the loop pops it): each is then a unit of its own, gathered when it runs.
        for _, router in aux_routers(layer) if aux_units else ():
            fully_shard(router, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        for experts in (m for m in layer.modules() if isinstance(m, StackedExperts)) if expert_mesh else ():
            # Split over EP already: sharded over the expert-DP group, their gradients summed there
            # and divided by the data-parallel size (each owner's sums every EP rank's tokens).
            fully_shard(experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
            experts.set_gradient_divide_factor(float(parallel.dp))
            if expert_mesh.size() > 1:
                # A plain sum, then the division (gloo has no PREMUL_SUM). Not on a one-rank mesh,
                # where torch 2.13 would divide twice (once in the copy that stands for the sum).
                experts.set_force_sum_reduction_for_comms(True)
            register_fsdp_forward_method(experts, "run")
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for name, param in model.named_parameters():
        for attribute, value in kept.get(name, {}).items():
            setattr(param, attribute, value)
    return mesh


def _shard_like(whole, param):
    """This rank's shard of the whole tensor ``whole``, placed as the DTensor ``param``."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_rows(tensor) -> List[int]:
    """The rows (first-dimension indices) of ``tensor`` this rank holds: all of a plain tensor's, a
    DTensor's shard of them (FSDP2's ``Shard(0)``: ``torch.chunk``'s blocks over the mesh)."""
    rows = list(range(tensor.shape[0]))
    if not hasattr(tensor, "device_mesh"):
        return rows
    blocks = torch.arange(tensor.shape[0]).chunk(tensor.device_mesh.size())
    rank = tensor.device_mesh.get_local_rank()
    return blocks[rank].tolist() if rank < len(blocks) else []


def _zeros(meta):
    """A whole tensor of a DCP entry's size and dtype."""
    return torch.zeros(meta.size, dtype=meta.properties.dtype)


class FSDP2Engine(Engine):
    name = accounting = "fsdp2"

    def __init__(self, model, args, parallel, build_optimizer):
        super().__init__(model, args, parallel)
        self.bf16 = args.bf16
        # {stacked expert parameter split over EP ranks: the names of the experts this rank holds}
        expert_names = {name for name, p in model.named_parameters() if is_expert_parallel(p)}
        self.expert_sources = {name: keys for name, keys in stacked_parameter_sources(model).items()
                               if name in expert_names}
        self.every_expert = {name: keys for name, keys in
                             stacked_parameter_sources(model, every=True).items() if name in expert_names}
        self.mesh = shard_model(model, parallel, args.bf16, args.torch_fsdp2_reshard_after_forward,
                                aux_units=args.aux_router_joint)
        # The experts' DTensors live on another mesh: groups of their own, one fused call each.
        self.optimizer = build_optimizer(model, args, {} if expert_names else None)

    @contextmanager
    def accumulating(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    # -- checkpoints: sharded (see the module docstring) ---------------------------------------------
    def model_state_dict(self):
        return None  # in the DCP directory

    def optimizer_state_dict(self):
        state = {"state": None, "param_groups": self.optimizer.state_dict()["param_groups"]}
        if self.every_expert:  # how readers of the whole checkpoint restack the experts' moments
            state["expert_sources"] = self.every_expert
        return state

    def _per_expert(self, name: str, tensor):
        """{DCP name: tensor} of a weight or moment: one entry per expert for the stacked experts
        split over EP ranks (views of the rows of this rank's shard: the experts it holds), else the
        tensor under ``name``."""
        if name not in self.expert_sources or tensor.dim() == 0:
            return {name: tensor}
        names = self.expert_sources[name]
        return {names[row]: view for row, view in zip(_shard_rows(tensor), _local(tensor).unbind(0))}

    def _model_tensors(self):
        """{name: this rank's DTensor} of the weights and persistent buffers (the stacked experts'
        parameters as they are, not their per-expert views; under EP one view per expert)."""
        tensors = {}
        for name, param in self.model.named_parameters():
            tensors.update(self._per_expert(name, param.detach()))
        for module_name, module in self.model.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    tensors[f"{module_name}.{name}" if module_name else name] = buffer
        return tensors

    def save_engine_files(self, staging):
        names = {param: name for name, param in self.model.named_parameters()}
        tensors = {MODEL_PREFIX + name: t for name, t in self._model_tensors().items()}
        for param, entry in self.optimizer.state.items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    for name, part in self._per_expert(names[param], value).items():
                        tensors[f"{OPTIMIZER_PREFIX}{name}/{key}"] = part
        checkpointing.write_dcp(tensors, checkpointing.dcp_dir(staging, self.parallel.tp_rank),
                                group=self.parallel.dp_group)
        return checkpointing.DCP_DIR

    def load_checkpoint(self, state, directory):
        if not checkpointing.is_sharded(state):
            return super().load_checkpoint(state, directory)
        path = checkpointing.dcp_dir(directory, self.parallel.tp_rank)
        saved = checkpointing.dcp_keys(path)
        weights, restacked, place_experts = self._weight_targets(saved)
        # Checked on every expert, not only this rank's: every rank stops, or none (read_dcp is a
        # collective).
        # Experts read one entry each (the stacked name is not a target) are expected all, whatever
        # this rank's shard holds.
        expected = set(weights).union(*(self.every_expert[name] for name in self.expert_sources
                                        if name not in weights))
        missing = sorted(k for k in expected if MODEL_PREFIX + k not in saved and "aux_router" not in k)
        if missing:
            raise CheckpointError(f"{path} lacks weights of this model ({', '.join(missing[:3])}); "
                                  "build the model with the checkpoint's flags")
        targets = {MODEL_PREFIX + k: t for k, t in weights.items() if MODEL_PREFIX + k in saved}
        targets.update(self._moment_targets(saved, restacked))
        checkpointing.read_dcp(path, targets, group=self.parallel.dp_group)  # into the shards
        place_experts()
        _, by_name = checkpointing.split_dcp(targets)
        by_name = checkpointing.stack_expert_entries(by_name, restacked)
        optimizer = checkpointing.numbered_optimizer_state(state["optimizer"], by_name)
        super().load_checkpoint(dict(state, optimizer=optimizer), directory)

    def _weight_targets(self, saved):
        """(``{name: tensor DCP reads it into}`` of the weights, ``{stacked expert parameter: the
        per-expert entries it is read from}``, what puts experts read elsewhere in place). The
        weights are read into the parameters themselves, except where the checkpoint's experts are
        laid out otherwise than this model's: stacked (written without EP) for experts split over
        EP ranks (read whole, this rank's rows kept), or one entry per expert (written under EP)
        for stacked DTensors (read whole, stacked, this rank's shard kept)."""
        weights, params = self._model_tensors(), dict(self.model.named_parameters())
        whole, split = {}, {}
        for name, experts in stacked_parameter_sources(self.model, every=True).items():
            if name in self.expert_sources:
                if MODEL_PREFIX + self.expert_sources[name][0] not in saved and MODEL_PREFIX + name in saved:
                    for expert in self.expert_sources[name]:
                        weights.pop(expert, None)  # this rank's shard holds some of them
                    weights[name] = whole[name] = _zeros(saved[MODEL_PREFIX + name])
            elif MODEL_PREFIX + name not in saved and MODEL_PREFIX + experts[0] in saved:
                del weights[name]
                split[name] = experts
                weights.update({expert: _zeros(saved[MODEL_PREFIX + expert]) for expert in experts})

        @torch.no_grad()
        def place_experts():
            for name, full in whole.items():
                _local(params[name]).copy_(_local(_shard_like(local_rows(full, params[name]), params[name])))
            for name, experts in split.items():
                stacked = torch.stack([weights[expert] for expert in experts])
                _local(params[name]).copy_(_local(_shard_like(stacked, params[name])))

        return weights, {**self.expert_sources, **split}, place_experts

    def _moment_targets(self, saved, restacked):
        """{DCP key: tensor to read it into} of the optimizer state: a parameter's moments into
        tensors shaped (and sharded) like it, or whole where the checkpoint's shape differs; one
        expert's moments (written under EP) by the ranks that read that expert."""
        params = dict(self.model.named_parameters())
        wanted = {expert for experts in restacked.values() for expert in experts}
        targets = {}
        for key, meta in saved.items():
            if not key.startswith(OPTIMIZER_PREFIX):
                continue
            name = key[len(OPTIMIZER_PREFIX):].rsplit("/", 1)[0]
            param = params.get(name)
            if param is not None and tuple(meta.size) == tuple(param.shape):
                targets[key] = torch.zeros_like(param.detach())
            elif param is not None or name in wanted:
                targets[key] = _zeros(meta)
        return targets

    def load_optimizer_state_dict(self, state):
        """Moments in: whole tensors (a ddp checkpoint) are split into this rank's shards (the
        experts left to EP: their rows); shards (a DCP checkpoint) are kept."""
        from torch.distributed.tensor import DTensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, entry in state["state"].items():
            param = params[index]
            for key, value in list(entry.items()):
                if not torch.is_tensor(value) or isinstance(value, DTensor) or value.dim() == 0:
                    continue
                value = local_rows(value, param)  # every expert's: this EP rank's
                if isinstance(param, DTensor) and value.shape == param.shape:
                    entry[key] = _shard_like(value, param)
        self.optimizer.load_state_dict(state)

    def describe(self) -> str:
        return ("fsdp2 (torch fully_shard per layer + root" + (", bf16 parameters, fp32 reduce"
                                                                if self.bf16 else "") + ")")
