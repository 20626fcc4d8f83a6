"""Held-out evaluation: loss and perplexity per modality, with ``train`` (expert choice over the
batch) or ``causal`` (aux routers decide) routing. It leaves the model as it found it: training mode,
routing mode, aux-router training and the routing statistics are restored in ``finally``."""

from contextlib import nullcontext
from typing import Dict, Iterator, Optional

import torch

from ..aux_router import aux_owners, set_aux_router_training, set_routing_mode
from ..cli import UsageError
from .initialize import Parallel, any_rank
from .metrics_log import losses_from_sums
from .signals import StopRequest
from .step import collate, forward_loss, label_modalities, modality_loss_sums, pipeline_loss_sums, to_device

METRIC_BUFFERS = ("tokens_per_expert_ME", "selection_histogram_M3", "mod_tokens_M2", "confusion_M4")


def metric_buffers(model) -> Dict[str, torch.Tensor]:
    return {name: buffer for name, buffer in model.named_buffers()
            if name.rsplit(".", 1)[-1] in METRIC_BUFFERS}


def held_out_batches(dataset, args, parallel: Parallel) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's collated micro-batches of ``--eval-iters`` evaluation steps (default: the whole
    held-out split, each step split over the data-parallel ranks), built one at a time. Checks the
    split is large enough when called, not when first iterated."""
    per_step = args.micro_batch_size * parallel.dp
    steps = len(dataset) // per_step
    if args.eval_iters is not None:
        steps = min(steps, args.eval_iters)
    if steps == 0:
        raise UsageError(f"the held-out split has {len(dataset)} samples, fewer than one evaluation "
                         f"step of {per_step} (--micro-batch-size {args.micro_batch_size} x "
                         f"{parallel.dp} data-parallel ranks); raise --valid-fraction or lower "
                         "--micro-batch-size")
    starts = (step * per_step + parallel.dp_rank * args.micro_batch_size for step in range(steps))
    return (collate([dataset[i] for i in range(start, start + args.micro_batch_size)])
            for start in starts)


@torch.no_grad()
def evaluate(model, dataset, args, layout, parallel: Parallel, routing_mode: str = "train",
             stop: Optional[StopRequest] = None, autocast=None) -> Optional[Dict[str, float]]:
    """Held-out loss and perplexity per modality (and overall) over ``--eval-iters`` micro-batches
    per rank (default: the whole held-out split, split over data-parallel ranks), with the given
    routing mode. Draws no random numbers and leaves the routing statistics of training untouched.
    ``autocast``: a callable giving the forward's precision context (an engine's ``autocast``).
    With ``stop``: None as soon as a stop was requested (checked on every rank before each
    micro-batch)."""
    num_modalities = len(layout.modalities)
    batches = held_out_batches(dataset, args, parallel)
    saved_metrics = {name: buffer.clone() for name, buffer in metric_buffers(model).items()}
    aux_training = any(owner.aux_training for owner in aux_owners(model))
    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=parallel.device)
    stopped = False
    set_aux_router_training(model, False)
    model.eval()
    set_routing_mode(model, routing_mode)
    try:
        for batch in batches:
            if stop is not None and any_rank(stop.received, parallel):
                stopped = True
                break
            label_mod = label_modalities(batch, layout)
            batch = to_device(batch, parallel.device)
            with autocast() if autocast else nullcontext():
                if parallel.pp > 1:  # Megatron's schedule, forward only: the sums of every stage
                    batch["label_modality"] = label_mod.to(parallel.device)
                    sums += pipeline_loss_sums(model, [batch], args, parallel, num_modalities)
                    continue
                loss_BS = forward_loss(model, batch)
            sums += modality_loss_sums(loss_BS, batch["loss_mask"], label_mod, num_modalities)
    finally:
        model.train()
        set_routing_mode(model, "train")
        set_aux_router_training(model, aux_training)
        for name, buffer in metric_buffers(model).items():
            buffer.copy_(saved_metrics[name])
    if stopped:
        return None
    torch.distributed.all_reduce(sums, group=parallel.dp_group)
    return losses_from_sums(sums, layout.modalities, with_ppl=True)
