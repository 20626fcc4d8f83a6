"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per line), TensorBoard events, and the
log line.

JSONL lines: ``{"kind": "train" | "eval", "iteration": N, "tokens": ..., "flops": ..., "loss": ...,
"loss_text": ..., ...}``; ``tokens`` and ``flops`` are cumulative over the run (all ranks), so curves
against compute need no other file. After a resume, iterations past the last checkpoint are logged again;
readers keep the last line of each (kind, iteration). TensorBoard tags are ``<kind>/<key>``
(``train/loss_text``, ``eval/ppl_image``) and the routing metrics' own names (``moma/layer0/...``).

Metrics never cost the run: when the run directory's disk is full (or any write fails), the writer
says so once, keeps training, and tries again at the next record.
"""

import json
import math
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..storage import atomic_write_text, disk_full_message, is_disk_full


def _quiet_disk_full_in_threads():
    """TensorBoard writes from a thread of its own; a full disk there must cost one warning, not a
    traceback (installed once per process)."""
    previous = threading.excepthook
    if getattr(previous, "moma_quiet", False):
        return

    def hook(args):
        if isinstance(args.exc_value, OSError) and is_disk_full(args.exc_value):
            print(f"warning: TensorBoard events not written ({args.exc_value}); training goes on",
                  file=sys.stderr, flush=True)
            return
        previous(args)

    hook.moma_quiet = True
    threading.excepthook = hook


class MetricsWriter:
    """Appends metrics to ``<run_dir>/metrics.jsonl`` and, if available, TensorBoard. Rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard_dir: Optional[Path], enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = None
        self.file = None
        self.failed_writes = 0
        if not enabled:
            return
        self._guard(lambda: self._open_file())
        if tensorboard_dir is not None:
            _quiet_disk_full_in_threads()
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                print("TensorBoard is not importable; metrics go to metrics.jsonl only")
            else:
                self._guard(lambda: setattr(self, "tensorboard", SummaryWriter(log_dir=str(tensorboard_dir))))

    def _open_file(self):
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses no line

    def _guard(self, action) -> bool:
        try:
            action()
            return True
        except OSError as e:
            self.failed_writes += 1
            if self.failed_writes == 1:
                what = disk_full_message(self.path.parent) if is_disk_full(e) else f"{type(e).__name__}: {e}"
                print(f"warning: cannot write metrics to {self.path.parent} ({what}); training goes on "
                      "and checkpoints are still saved; metrics resume once the write succeeds",
                      file=sys.stderr, flush=True)
            return False

    def write(self, kind: str, iteration: int, values: Dict[str, float]):
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": iteration}
        record.update({k: _plain(v) for k, v in values.items()})
        line = json.dumps(record) + "\n"
        if self.file is None:
            self._guard(self._open_file)
        if self.file is not None:
            self._guard(lambda: self.file.write(line))
        if self.tensorboard is not None:
            self._guard(lambda: self._write_tensorboard(kind, iteration, values))

    def write_file(self, name: str, text: str):
        """``<run_dir>/<name>``, replaced atomically; like every metric, a failed write only warns."""
        if self.enabled:
            self._guard(lambda: atomic_write_text(self.path.parent / name, text))

    def _write_tensorboard(self, kind: str, iteration: int, values: Dict[str, float]):
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                tag = key if key.startswith("moma/") else f"{kind}/{key}"
                self.tensorboard.add_scalar(tag, value, iteration)

    def flush(self):
        if self.enabled:
            if self.file is not None:
                self._guard(self.file.flush)
            if self.tensorboard is not None:
                self._guard(self.tensorboard.flush)

    def close(self):
        if self.enabled:
            if self.file is not None:
                self._guard(self.file.close)
            if self.tensorboard is not None:
                self._guard(self.tensorboard.close)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


# -- losses and the log line -------------------------------------------------------------------------
def mean_loss(sums: torch.Tensor) -> float:
    """Mean loss over all modalities from [2, M] loss sums and token counts."""
    return float(sums[0].sum() / sums[1].sum().clamp(min=1))


def losses_from_sums(sums: torch.Tensor, modalities, with_ppl: bool = False) -> Dict[str, float]:
    """{"loss", "loss_<modality>"[, "ppl", "ppl_<modality>"]} from [2, M] loss sums and counts."""
    out = {"loss": mean_loss(sums)}
    for m, name in enumerate(modalities):
        out[f"loss_{name}"] = float(sums[0, m] / sums[1, m]) if sums[1, m] > 0 else float("nan")
    if with_ppl:
        for key in list(out):
            out[key.replace("loss", "ppl")] = math.exp(min(out[key], 700.0))
    return out


class Interval:
    """Sums over the iterations between two log lines."""

    def __init__(self, num_modalities: int):
        self.sums = torch.zeros(2, num_modalities, dtype=torch.float64)
        self.seconds = 0.0
        self.iterations = 0
        self.micro_batches = 0
        self.grad_norms: List[float] = []
        self.modality_tokens = torch.zeros(num_modalities, dtype=torch.float64)

    def add(self, sums, seconds, micro_batches, grad_norm):
        self.sums += sums.cpu()
        self.seconds += seconds
        self.iterations += 1
        self.micro_batches += len(micro_batches)
        self.grad_norms.append(grad_norm)
        for batch in micro_batches:
            ids = batch["modality_ids"].reshape(-1)
            self.modality_tokens += torch.bincount(ids, minlength=len(self.modality_tokens)).double()

    def summary(self, modalities, target, tokens_per_iteration, flops_per_token, world):
        values = losses_from_sums(self.sums, modalities)
        seconds_per_iteration = self.seconds / max(self.iterations, 1)
        tokens_per_s = tokens_per_iteration / max(seconds_per_iteration, 1e-9)
        shares = (self.modality_tokens / self.modality_tokens.sum().clamp(min=1)).tolist()
        values.update(
            grad_norm=sum(self.grad_norms) / len(self.grad_norms),
            seconds_per_iteration=seconds_per_iteration,
            tokens_per_s=tokens_per_s,
            tflops_per_s=tokens_per_s * flops_per_token / 1e12 / world,
        )
        for name, share in zip(modalities, shares):
            values[f"sampler_share_{name}"] = share
        if target is not None:
            for name, share in zip(modalities, target):
                values[f"sampler_target_{name}"] = share
        return values


def routing_summary(metrics: Dict[str, float], micro_batches: int, modalities=()) -> Dict[str, float]:
    """Expert load over all MoMa layers per micro-batch: min/max tokens per expert, the share of
    tokens no expert picked, and the mean share of each modality's tokens the MoD layers process."""
    summary = {}
    for name in modalities:
        shares = [v for k, v in metrics.items()
                  if k.startswith("mod/") and k.endswith(f"/{name}/processed_frac")]
        if shares:
            summary[f"mod_processed_{name}"] = sum(shares) / len(shares)
    loads = [v for k, v in metrics.items() if k.endswith("/tokens_per_expert_min")
             or k.endswith("/tokens_per_expert_max")]
    if not loads:
        return summary
    tokens = {k.rsplit("/", 1)[0]: v for k, v in metrics.items() if k.endswith("/tokens")}
    unpicked = sum(metrics[f"{prefix}/picked_by_0_frac"] * count for prefix, count in tokens.items())
    return dict(summary, **{
        "expert_load_min": min(loads) / max(micro_batches, 1),
        "expert_load_max": max(loads) / max(micro_batches, 1),
        "unpicked_frac": unpicked / max(sum(tokens.values()), 1),
    })


def format_log_line(iteration: int, args, values: Dict[str, float], modalities) -> str:
    per_modality = ", ".join(f"{m} {values[f'loss_{m}']:.3f}" for m in modalities)
    parts = [
        f"iteration {iteration:>6d}/{args.train_iters:<6d}",
        f"lr {values['lr']:.3E}",
        f"loss {values['loss']:.4f} ({per_modality})",
        f"grad norm {values['grad_norm']:.3f}",
        f"{values['tokens_per_s']:,.0f} tokens/s",
        f"{values['tflops_per_s']:.4f} TFLOP/s per rank",
    ]
    if "expert_load_min" in values:
        parts.append(f"tokens/expert {values['expert_load_min']:.0f}-{values['expert_load_max']:.0f}, "
                     f"unpicked {values['unpicked_frac']:.3f}")
    if f"mod_processed_{modalities[0]}" in values:
        parts.append("MoD processed " + ", ".join(
            f"{m} {values[f'mod_processed_{m}']:.2f}" for m in modalities
            if f"mod_processed_{m}" in values))
    if "aux/accuracy" in values:
        parts.append(f"aux acc {values['aux/accuracy']:.3f}")
    share = values.get(f"sampler_share_{modalities[-1]}")
    if share is not None:
        target = values.get(f"sampler_target_{modalities[-1]}")
        parts.append(f"{modalities[-1]} share {share:.3f}"
                     + (f" (target {target:.3f})" if target is not None else ""))
    if values.get("sampler_violations"):
        parts.append(f"ratio bound missed by {values['sampler_violations']:.0f} micro-batch(es) so far")
    return " | ".join(parts)
