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
"""

from contextlib import contextmanager

import torch

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

    for layer in model.decoder.layers:
        # Trained jointly, aux routers also run after their layer's forward (their loss is computed
        # when the loop pops it): each is then a unit of its own, gathered when it runs.
        for _, router in aux_routers(layer) if aux_units else ():
            fully_shard(router, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return mesh


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

    def load_optimizer_state_dict(self, state):
        """Full moments in, this rank's shards of them kept (the checkpoint holds full tensors)."""
        from torch.distributed.tensor import distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, entry in state["state"].items():
            param = params[index]
            for key, value in list(entry.items()):
                if torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0:
                    entry[key] = distribute_tensor(value.to(param.device), param.device_mesh,
                                                   param.placements)
        self.optimizer.load_state_dict(state)

    def describe(self) -> str:
        return ("fsdp2 (torch fully_shard per layer + root" + (", bf16 parameters, fp32 reduce"
                                                                if self.bf16 else "") + ")")
