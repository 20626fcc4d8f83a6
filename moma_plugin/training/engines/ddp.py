"""``ddp`` (the default): torch's ``DistributedDataParallel`` over the data-parallel group (gloo on
CPU, NCCL on GPU). Gradients are averaged in buckets during the backward of the last micro-batch
(``no_sync`` before it); ``--ddp-bucket-size`` sets the bucket size. Under ``--bf16`` the weights,
gradients and optimizer state stay fp32 and the forward runs under bf16 autocast.

Expert parallelism: the experts' parameters differ between EP ranks, so DDP leaves them out; after
the last micro-batch's backward their gradients (each owner's already sums every EP rank's tokens)
are summed over the expert-data-parallel group and divided by the data-parallel size, as DDP's
average does for the others.

Pipeline parallelism: Megatron's schedule runs the micro-batches, so the model runs bare and its
gradients are averaged over the data-parallel group after the last one (``reduce_pipeline_gradients``,
one all-reduce instead of DDP's buckets overlapping the backward)."""

from contextlib import contextmanager, nullcontext

import torch

from ...expert_parallel import is_expert_parallel
from .base import Engine, reduce_expert_gradients, reduce_pipeline_gradients


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, model, args, parallel, build_optimizer):
        super().__init__(model, args, parallel)
        bucket_mb = args.ddp_bucket_size * 4 / 2 ** 20 if args.ddp_bucket_size else 25  # elements, as Megatron
        experts = [name for name, p in model.named_parameters() if is_expert_parallel(p)]
        self.expert_params = [p for p in model.parameters() if is_expert_parallel(p)]
        if experts:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, experts)
        if parallel.dp > 1 and parallel.pp == 1:  # else nothing to average, or averaged after the schedule
            self.module = torch.nn.parallel.DistributedDataParallel(
                model, process_group=parallel.dp_group, bucket_cap_mb=bucket_mb,
                device_ids=[parallel.device.index] if parallel.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=False)
        self.optimizer = build_optimizer(model, args)
        self.dtype = torch.bfloat16 if args.bf16 else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.parallel.device.type, dtype=self.dtype)

    def backward(self, loss):
        # Megatron's linears re-enter autocast in their backward on CUDA only (custom_bwd for
        # "cuda"); on CPU the backward runs under the forward's autocast here, as it would there.
        with self.autocast() if self.parallel.device.type == "cpu" else nullcontext():
            loss.backward()

    @contextmanager
    def accumulating(self, last: bool):
        with nullcontext() if last or self.module is self.model else self.module.no_sync():
            yield
        if last and self.expert_params:
            reduce_expert_gradients(self.expert_params, self.parallel)

    def finish_gradients(self):
        if self.parallel.pp > 1:
            reduce_pipeline_gradients(self.model, self.parallel)
        super().finish_gradients()

    def describe(self) -> str:
        how = "gradients averaged after the pipeline schedule" if self.parallel.pp > 1 else \
            "torch DistributedDataParallel"
        return f"ddp ({how}" + (", bf16 autocast" if self.dtype else "") + ")"
