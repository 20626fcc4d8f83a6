"""MoMaGPTModel under Megatron-Core's pipeline schedules (``get_forward_backward_func``: 1F1B, and
interleaved with several model chunks per rank).

The model needs nothing special to be cut into stages (``pre_process``/``post_process``, ``vp_stage``,
as for ``GPTModel``), but a forward step must give every stage what its MoMa and MoD layers route by:
the micro-batch's modality ids. A stage without the embedding has no token ids to derive them from, so
the step passes ``modality_ids`` to every stage. Two more things differ from a GPT step:

- the aux routers of a stage without the loss learn from their own BCE loss, backpropagated in the
  step (their input is detached, so it touches nothing else); on the last stage it joins the loss;
- several micro-batches are in flight, so anything a layer records once per forward (routing
  metrics, aux losses) keys on the layout's ``forward_id``, which a recomputed forward reuses
  (``layout.is_new_forward``).

tests/test_pipeline_parallel.py runs two stages against the whole model (losses and every gradient).
"""

import re
from functools import partial
from typing import Callable, Dict, Optional

import torch

from .aux_router import pop_aux_loss


def stage_of(model):
    """The ``MoMaGPTModel`` inside ``model`` (a DDP or Float16 wrapper, or the model itself)."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(model, "decoder", return_model_obj=True)


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def whole_model_name(name: str, first_layer: int) -> str:
    """The whole model's name of a stage's parameter or buffer: a stage numbers its layers from 0
    (``decoder.layers.0...``); ``first_layer`` is the whole model's index of its first one."""
    match = _LAYER.fullmatch(name)
    if not match:
        return name
    return f"decoder.layers.{int(match.group(1)) + first_layer}.{match.group(2)}"


def forward_step(batch: Dict[str, torch.Tensor], model, num_microbatches: int,
                 loss_func: Callable[[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]], tuple]):
    """One stage's forward of one micro-batch, for a schedule's ``forward_step_func``: the stage
    model gets the tokens if it embeds them, the labels if it computes the loss, and the modality
    ids always. Returns (output, the stage's loss function or None): on the last stage
    ``loss_func(output, batch, aux_loss)`` makes the schedule's loss (``aux_loss`` is None unless aux
    routers train); elsewhere the stage's aux loss has been backpropagated already, divided by
    ``num_microbatches`` as the schedule divides the loss."""
    stage = stage_of(model)
    output = model(batch["tokens"] if stage.pre_process else None, batch["position_ids"],
                   batch.get("attention_mask"), labels=batch["labels"] if stage.post_process else None,
                   modality_ids=batch["modality_ids"])
    aux = pop_aux_loss(stage)
    if stage.post_process:
        return output, partial(_loss, loss_func, batch, aux)
    if aux is not None:
        (aux.float() / num_microbatches).backward()
    # The next stage receives into a buffer of pipeline_dtype (bf16 autocast may leave another dtype).
    dtype = stage.config.pipeline_dtype
    return (output if dtype is None else output.to(dtype)), None


def _loss(loss_func, batch, aux, output):
    return loss_func(output, batch, aux)
