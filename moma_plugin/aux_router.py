"""Auxiliary routers: causal stand-ins for expert-choice decisions (MoMa paper, section 2.4).

Expert choice picks the top tokens of a whole batch, so it looks at future tokens. An auxiliary router
predicts from one token's hidden state alone whether the expert (or the MoD layer) would have picked it:
``p = sigmoid(SiLU(x W1) W2)``, ``W1: d -> d/2``, ``W2: d/2 -> experts`` (1 for a MoD layer). In the
``causal`` routing mode a token goes to an expert (through a MoD layer) iff ``p > threshold``; the main
router still supplies the weight.

Training (binary cross-entropy against the expert-choice assignments of each batch) happens in the
layers that own the routers, on a detached input (stop-gradient), whenever ``set_aux_router_training``
has switched it on: after pretraining (``moma-train-aux-routers``, the rest of the model frozen) or
jointly with it (``moma-pretrain --aux-router-joint``). Each router also counts its decisions against
the targets (true/false positives/negatives per modality), which ``collect_aux_metrics`` reads.
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import is_new_forward
from .routing import linear_fp32

ROUTING_MODES = ("train", "causal")


class AuxRouter(torch.nn.Module):
    """``logits = SiLU(x W1) W2`` (float32); ``sigmoid(logits)`` is the probability of being picked.

    ``trained`` is a persistent flag saved with the weights: causal routing refuses routers that were
    never trained. The weights do not require gradients until ``set_aux_router_training`` switches
    training on (a Megatron DDP bucket would otherwise wait for gradients that never come).
    """

    def __init__(self, config, num_outputs: int):
        super().__init__()
        hidden = max(config.hidden_size // 2, 1)
        self.fc1 = torch.nn.Parameter(torch.empty(hidden, config.hidden_size, dtype=config.params_dtype))
        self.fc2 = torch.nn.Parameter(torch.empty(num_outputs, hidden, dtype=config.params_dtype))
        config.init_method(self.fc1)
        config.init_method(self.fc2)
        for weight in (self.fc1, self.fc2):
            # Not flagged ``sequence_parallel``: aux routers read every token (gathered under SP).
            weight.requires_grad_(False)
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))
        self.register_buffer("confusion_M4", torch.zeros(config.num_modalities, 4, dtype=torch.long),
                             persistent=False)

    def forward(self, x_TH: Tensor) -> Tensor:
        return linear_fp32(F.silu(linear_fp32(x_TH, self.fc1)), self.fc2)

    def loss(self, x_TH: Tensor, targets_TE: Tensor, modality_T: Tensor, threshold: float) -> Tensor:
        """BCE of the router on ``x_TH.detach()`` against the 0/1 ``targets_TE``; counts its decisions
        per modality into ``confusion_M4`` (columns: true pos, false pos, false neg, true neg). With no
        tokens (a rank whose micro-batch holds none of the group's modality) the loss is a zero that
        still runs the router, so its weights get a (zero) gradient on every rank."""
        logits_TE = self(x_TH.detach())
        if logits_TE.numel() == 0:
            return logits_TE.sum()
        loss = F.binary_cross_entropy_with_logits(logits_TE, targets_TE.float())
        with torch.no_grad():
            predicted = logits_TE > logit(threshold)
            target = targets_TE.bool()
            per_token = torch.stack([
                (predicted & target).sum(1), (predicted & ~target).sum(1),
                (~predicted & target).sum(1), (~predicted & ~target).sum(1)], dim=1)
            self.confusion_M4.index_add_(0, modality_T, per_token)
        return loss

    def reset_metrics(self):
        self.confusion_M4.zero_()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclass
class PendingAuxLoss:
    """An aux-router loss recorded during a forward, computed (and its decisions counted) by
    ``pop_aux_loss``. Deferred so that its graph is built outside any activation checkpoint: inside
    one, Megatron's re-entrant checkpoint runs the forward without gradients (the loss would have no
    graph) and torch's non-re-entrant one refuses a recompute that saves fewer tensors (the recompute
    records no second loss)."""

    router: AuxRouter
    x_TH: Tensor  # detached
    targets_TE: Tensor
    modality_T: Tensor
    threshold: float

    def compute(self) -> Tensor:
        return self.router.loss(self.x_TH, self.targets_TE, self.modality_T, self.threshold)


class AuxRouterOwner:
    """Mixin of the modules that own aux routers (``MoMaMLP``, ``MoMaTransformerLayer``): routing mode,
    threshold, and the aux losses of the current forward."""

    routing_mode: str = "train"
    aux_threshold: float = 0.5
    aux_training: bool = False

    def _init_aux_state(self, threshold: float):
        self.routing_mode, self.aux_threshold, self.aux_training = "train", threshold, False
        self._aux_losses: List[PendingAuxLoss] = []
        self._aux_forward_id = None

    def _should_train_aux(self, forward_id) -> bool:
        """Aux losses are recorded once per forward (not again when activation recompute reruns it),
        in train routing mode, while aux-router training is switched on (in eval mode too, so that
        held-out accuracy can be measured; ``pop_aux_loss`` then discards the losses)."""
        if not self.aux_training or self.routing_mode != "train":
            return False
        if not is_new_forward(forward_id, self._aux_forward_id):
            return False
        self._aux_forward_id = forward_id
        return True


def aux_owners(model: torch.nn.Module) -> Iterator[AuxRouterOwner]:
    return (m for m in model.modules() if isinstance(m, AuxRouterOwner))


def aux_routers(model: torch.nn.Module) -> Iterator[Tuple[str, AuxRouter]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, AuxRouter))


def aux_router_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for _, router in aux_routers(model) for p in router.parameters()]


def has_trained_aux_routers(model: torch.nn.Module) -> bool:
    routers = [router for _, router in aux_routers(model)]
    return bool(routers) and all(bool(router.trained) for router in routers)


def set_routing_mode(model: torch.nn.Module, mode: str, threshold: float = None):
    """``train``: expert choice over the batch (as in pretraining). ``causal``: aux-router decisions,
    so the output at position t depends on no later token. Raises if causal routing is asked of a
    model whose aux routers were never trained."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode {mode!r}: use one of {ROUTING_MODES}.")
    if mode == "causal" and any(True for _ in aux_routers(model)) and not has_trained_aux_routers(model):
        untrained = [name for name, router in aux_routers(model) if not bool(router.trained)]
        raise RuntimeError(
            f"causal routing needs trained auxiliary routers, but {len(untrained)} of this model's are "
            f"untrained (e.g. {untrained[0]}). Train them first: `moma-train-aux-routers --load "
            "<checkpoint dir> --save <new dir>` (or pretrain with --aux-router-joint), then load that "
            "checkpoint."
        )
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"aux threshold {threshold} must be in (0, 1).")
    for owner in aux_owners(model):
        owner.routing_mode = mode
        if threshold is not None:
            owner.aux_threshold = threshold


def set_aux_router_training(model: torch.nn.Module, enabled: bool = True):
    """Turns the aux-router BCE losses (and their decision counts) on/off, and with them whether the
    aux-router weights require gradients. Switch it on before building the optimizer."""
    for owner in aux_owners(model):
        owner.aux_training = enabled
        owner._aux_losses = []
    for param in aux_router_parameters(model):
        param.requires_grad_(enabled)


def mark_aux_routers_trained(model: torch.nn.Module):
    for _, router in aux_routers(model):
        router.trained.fill_(True)


def pop_aux_loss(model: torch.nn.Module):
    """Sum of the aux-router BCE losses recorded since the last call (None if there were none); each
    is a mean over its router's decisions, so every router weighs the same."""
    losses = []
    for owner in aux_owners(model):
        losses.extend(pending.compute() for pending in owner._aux_losses)
        owner._aux_losses = []
    return torch.stack(losses).sum() if losses else None


def aux_confusions(model: torch.nn.Module, reset: bool = True) -> Dict[Tuple[int, str], torch.Tensor]:
    """{(layer counted from 0, "experts" or "mod"): [M, 4] counts of true/false positives, false/true
    negatives} of each aux router since the last reset."""
    confusions = {}
    for owner in aux_owners(model):
        for kind, router in owner.aux_routers():
            confusions[(owner.layer_number - 1, kind)] = router.confusion_M4.cpu().clone()
            if reset:
                router.reset_metrics()
    return confusions


def aux_metrics(confusions: Dict[Tuple[int, str], torch.Tensor], modalities) -> Dict[str, float]:
    """Accuracy, precision, recall of each aux router against the expert-choice targets, per layer
    and modality, e.g. ``aux/layer1/image/experts_accuracy`` and ``aux/layer0/text/mod_recall`` (layers
    counted from 0, as in parameter names); plus ``aux/accuracy`` over everything."""
    metrics: Dict[str, float] = {}
    total = torch.zeros(4, dtype=torch.long)
    for (layer, kind), confusion in confusions.items():
        for modality, name in enumerate(modalities):
            tp, fp, fn, tn = confusion[modality].tolist()
            if tp + fp + fn + tn == 0:
                continue
            prefix = f"aux/layer{layer}/{name}/{kind}"
            metrics[f"{prefix}_accuracy"] = (tp + tn) / (tp + fp + fn + tn)
            metrics[f"{prefix}_precision"] = tp / (tp + fp) if tp + fp else float("nan")
            metrics[f"{prefix}_recall"] = tp / (tp + fn) if tp + fn else float("nan")
            metrics[f"{prefix}_positive_frac"] = (tp + fn) / (tp + fp + fn + tn)
        total += confusion.sum(0)
    if total.sum() > 0:
        tp, fp, fn, tn = total.tolist()
        metrics["aux/accuracy"] = (tp + tn) / (tp + fp + fn + tn)
        metrics["aux/all_zeros_accuracy"] = (fp + tn) / (tp + fp + fn + tn)
    return metrics


def collect_aux_metrics(model: torch.nn.Module, reset: bool = True) -> Dict[str, float]:
    """``aux_metrics`` of the model's aux routers, decisions counted since the last reset."""
    owner = next(aux_owners(model), None)
    modalities = owner.config.moma_modalities if owner is not None else ()
    return aux_metrics(aux_confusions(model, reset), modalities)
