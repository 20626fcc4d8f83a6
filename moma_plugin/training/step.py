"""One training step over an engine (``engines``): this rank's micro-batches forward and backward,
the engine's gradient reduction, clipping and optimizer step, and the loss sums every rank logs.

The loss is summed over every unmasked token of the global batch and divided by their number.
Per-modality losses: a token's loss counts for the modality of the token being predicted (its label).
With one pipeline stage the micro-batches run here, one after the other; with several, Megatron-Core's
1F1B schedule runs them (``pipeline_loss_sums``) and the last stage computes the loss."""

import math
from typing import Dict, List, Optional

import numpy as np
import torch

from ..aux_router import aux_router_parameters, pop_aux_loss
from .metrics_log import mean_loss


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def collate(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def label_modalities(batch, layout) -> torch.Tensor:
    """[b, s] modality id of each label (the token being predicted)."""
    return torch.from_numpy(layout.modality_ids(batch["labels"].numpy()).astype(np.int64))


def modality_loss_sums(loss_BS: torch.Tensor, loss_mask_BS: torch.Tensor, label_modality_BS: torch.Tensor,
                       num_modalities: int) -> torch.Tensor:
    """[2, M]: summed masked loss and token count of each label modality (float64)."""
    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=loss_BS.device)
    weights = loss_mask_BS.reshape(-1).double()
    index = label_modality_BS.reshape(-1).to(loss_BS.device)
    sums[0].index_add_(0, index, loss_BS.detach().reshape(-1).double() * weights)
    sums[1].index_add_(0, index, weights)
    return sums


def forward_loss(model, batch) -> torch.Tensor:
    """[b, s] float32 loss of each token (Megatron's cross entropy upcasts bf16 logits)."""
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 modality_ids=batch["modality_ids"]).float()


def pipeline_loss_sums(model, batches, args, parallel, num_modalities: int, scale: Optional[float] = None
                       ) -> torch.Tensor:
    """Megatron-Core's pipeline schedule over ``batches`` (on the device, each with its
    ``label_modality``): forward and backward of each token's loss times ``scale`` (the aux routers'
    loss joining it as in ``train_step``), or forward only when ``scale`` is None. Returns the [2, M]
    loss sums, the same on every stage (the last computes them)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..pipeline import forward_step

    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=parallel.device)
    count = len(batches)

    def loss_func(output, batch, aux):
        loss_BS = output.float()
        sums.add_(modality_loss_sums(loss_BS, batch["loss_mask"], batch["label_modality"], num_modalities))
        # The schedule divides what this returns by the number of micro-batches.
        loss = (loss_BS * batch["loss_mask"]).sum() * (count if scale is None else scale * count)
        return (loss if aux is None else loss + aux.float()), {}

    data = iter(batches)
    get_forward_backward_func()(
        forward_step_func=lambda iterator, model: forward_step(next(iterator), model, count, loss_func),
        data_iterator=data, model=[model], num_microbatches=count, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=scale is None)
    torch.distributed.all_reduce(sums, group=parallel.pp_group)
    return sums


def _forward_backward(engine, micro_batches, label_mods, scale: float, num_modalities: int, device
                      ) -> torch.Tensor:
    """One pipeline stage: each micro-batch's forward and backward in turn. Returns the [2, M] sums."""
    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=device)
    for i, (batch, label_mod) in enumerate(zip(micro_batches, label_mods)):
        batch = to_device(batch, device)
        with engine.accumulating(last=i == len(micro_batches) - 1):
            with engine.autocast():
                loss_BS = forward_loss(engine.module, batch)
            loss = (loss_BS * batch["loss_mask"]).sum() * scale
            aux_loss = pop_aux_loss(engine.model)  # --aux-router-joint: BCE of the aux routers
            if aux_loss is not None:  # averaged over micro-batches here, over ranks by the engine
                loss = loss + aux_loss.float() / len(micro_batches)
            engine.backward(loss)
        sums += modality_loss_sums(loss_BS, batch["loss_mask"], label_mod, num_modalities)
    return sums


def train_step(engine, micro_batches, layout, args, parallel):
    """Forward/backward over this rank's micro-batches, then the engine's reduction, clipping and
    step. Returns ([2, M] loss sums of the global batch, grad norm, applied?). The step is skipped
    when the loss or the gradient norm is not finite, except under DeepSpeed, which clips and steps
    in one call (``engine.clips_itself``): there the step is taken and the run stops after it."""
    num_modalities = len(layout.modalities)
    label_mods = [label_modalities(b, layout) for b in micro_batches]
    tokens = torch.tensor([float(sum(b["loss_mask"].sum() for b in micro_batches))], device=parallel.device)
    torch.distributed.all_reduce(tokens, group=parallel.dp_group)
    scale = engine.loss_scale / tokens.item()

    engine.zero_grad()
    if parallel.pp > 1:  # the engine reduces the gradients in finish_gradients
        batches = [dict(to_device(batch, parallel.device), label_modality=label_mod.to(parallel.device))
                   for batch, label_mod in zip(micro_batches, label_mods)]
        with engine.autocast():
            sums = pipeline_loss_sums(engine.module, batches, args, parallel, num_modalities, scale)
    else:
        sums = _forward_backward(engine, micro_batches, label_mods, scale, num_modalities, parallel.device)
    torch.distributed.all_reduce(sums, group=parallel.dp_group)
    engine.finish_gradients()
    if engine.clips_itself:
        engine.step()
        grad_norm = engine.grad_norm_after_step()
        if engine.skipped_for_loss_scale():  # fp16: an overflow lowers the loss scale, the run goes on
            return sums, grad_norm, math.isfinite(mean_loss(sums))
        return sums, grad_norm, math.isfinite(mean_loss(sums)) and math.isfinite(grad_norm)
    if not math.isfinite(mean_loss(sums)):
        return sums, float("nan"), False
    # The aux routers' gradients come from their own loss; they are clipped apart so that they never
    # scale the model's gradients.
    aux = {id(p) for p in aux_router_parameters(engine.model)}
    grad_norm = engine.clip(args.clip_grad, [p for p in engine.model.parameters() if id(p) not in aux])
    if not math.isfinite(grad_norm):
        return sums, grad_norm, False
    if getattr(args, "aux_router_joint", False):
        engine.clip(args.clip_grad, aux_router_parameters(engine.model))
    engine.step()
    return sums, grad_norm, True
