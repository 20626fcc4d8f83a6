"""``--use-torch-fsdp2``: torch's ``fully_shard`` (FSDP2) over the data-parallel group.

Sharding plan: one FSDP unit per transformer layer (and under ``--aux-router-joint`` one per aux
router), and one for the root
(embedding, final norm, output layer, and with tied embeddings the shared weight, which must stay in
one unit). A layer's unit holds its attention, its router(s), all of its experts of every modality
group (the stacked expert weights are one parameter per layer) and its Mixture-of-Depths router.
Jointly trained aux routers are units of their own because their losses are computed after the
layer's forward (outside any activation checkpoint: ``aux_router.PendingAuxLoss``); otherwise they
run inside their layer's forward (causal routing) and belong to its unit. Every rank gathers and
reduce-scatters the same tensors in the same order whatever tokens it holds: the experts always run
(with zero tokens if need be), and so does every aux router, so a rank whose micro-batch has no image
tokens takes part in the same collectives as the others. Each parameter is sharded on its first
dimension (the experts' dimension for stacked experts).

``--bf16``: a ``MixedPrecisionPolicy`` gathers bf16 parameters for compute and reduces gradients in
fp32; the sharded parameters and the optimizer state stay fp32. ``--torch-fsdp2-no-reshard-after-
forward`` keeps each layer's gathered parameters from forward to backward (more memory, one gather
fewer per layer). Clipping: torch's norm over the DTensor gradients (the whole mesh), TP shards
summed over the tensor-parallel group.

Checkpoints: each rank writes its shards of the weights and Adam moments into the iteration's
``dcp/mp_rank_NN/`` (torch.distributed.checkpoint over the data-parallel group; the stacked expert
weights under their stacked names), and nothing is gathered. Loading reads the shards each rank
now holds, whatever the number of ranks that wrote them. A checkpoint with whole tensors (the ddp
engine's) loads too: the weights before sharding, the moments split on loading.
"""

from contextlib import contextmanager

import torch

from .. import checkpointing
from ..checkpointing import MODEL_PREFIX, OPTIMIZER_PREFIX, CheckpointError
from .base import Engine


def _mesh(parallel):
    """The data-parallel mesh of this rank (a 1-D mesh over the DP group's ranks)."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.distributed.get_process_group_ranks(parallel.dp_group)
    return DeviceMesh.from_group(parallel.dp_group, parallel.device.type, mesh=ranks)


def shard_model(model, parallel, bf16: bool, reshard_after_forward: bool, aux_units: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(parallel)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    from ...aux_router import aux_routers

    # fully_shard puts new (DTensor) parameters in place of the old ones, without their Python
    # attributes: those that clipping (TP shards) and the SP gradient sum read are carried over.
    kept = {name: {a: getattr(p, a) for a in _KEPT_ATTRIBUTES if hasattr(p, a)}
            for name, p in model.named_parameters()}
    for layer in model.decoder.layers:
        # Trained jointly, aux routers also run after their layer's forward (their loss is computed
        # when the loop pops it): each is then a unit of its own, gathered when it runs.
        for _, router in aux_routers(layer) if aux_units else ():
            fully_shard(router, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for name, param in model.named_parameters():
        for attribute, value in kept.get(name, {}).items():
            setattr(param, attribute, value)
    return mesh


_KEPT_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


class FSDP2Engine(Engine):
    name = accounting = "fsdp2"

    def __init__(self, model, args, parallel, build_optimizer):
        super().__init__(model, args, parallel)
        self.bf16 = args.bf16
        self.mesh = shard_model(model, parallel, args.bf16, args.torch_fsdp2_reshard_after_forward,
                                aux_units=args.aux_router_joint)
        self.optimizer = build_optimizer(model, args)

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
        return {"state": None, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def _model_tensors(self):
        """{name: this rank's DTensor} of the weights and persistent buffers (the stacked experts'
        parameters as they are, not their per-expert views)."""
        tensors = {name: param.detach() for name, param in self.model.named_parameters()}
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
                    tensors[f"{OPTIMIZER_PREFIX}{names[param]}/{key}"] = value
        checkpointing.write_dcp(tensors, checkpointing.dcp_dir(staging, self.parallel.tp_rank),
                                group=self.parallel.dp_group)
        return checkpointing.DCP_DIR

    def load_checkpoint(self, state, directory):
        if not checkpointing.is_sharded(state):
            return super().load_checkpoint(state, directory)
        path = checkpointing.dcp_dir(directory, self.parallel.tp_rank)
        saved = checkpointing.dcp_keys(path)
        model = self._model_tensors()
        missing = [k for k in model if MODEL_PREFIX + k not in saved and "aux_router" not in k]
        if missing:
            raise CheckpointError(f"{path} lacks weights of this model ({', '.join(missing[:3])}); "
                                  "build the model with the checkpoint's flags")
        targets = {MODEL_PREFIX + k: t for k, t in model.items() if MODEL_PREFIX + k in saved}
        params = dict(self.model.named_parameters())
        for key, meta in saved.items():
            if key.startswith(OPTIMIZER_PREFIX):
                param = params[key[len(OPTIMIZER_PREFIX):].rsplit("/", 1)[0]]
                targets[key] = torch.zeros_like(param.detach()) if tuple(meta.size) == tuple(param.shape) \
                    else torch.zeros(meta.size, dtype=meta.properties.dtype)
        checkpointing.read_dcp(path, targets, group=self.parallel.dp_group)  # into the shards
        _, by_name = checkpointing.split_dcp(targets)
        optimizer = checkpointing.numbered_optimizer_state(state["optimizer"], by_name)
        super().load_checkpoint(dict(state, optimizer=optimizer), directory)

    def load_optimizer_state_dict(self, state):
        """Moments in: whole tensors (a ddp checkpoint) are split into this rank's shards; shards (a
        DCP checkpoint) are kept."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, entry in state["state"].items():
            param = params[index]
            for key, value in list(entry.items()):
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim() > 0 \
                        and value.shape == param.shape:
                    entry[key] = distribute_tensor(value.to(param.device), param.device_mesh,
                                                   param.placements)
        self.optimizer.load_state_dict(state)

    def describe(self) -> str:
        return ("fsdp2 (torch fully_shard per layer + root" + (", bf16 parameters, fp32 reduce"
                                                                if self.bf16 else "") + ")")
