"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard events.

JSONL lines: ``{"kind": "train" | "eval", "iteration": N, "tokens": ..., "flops": ..., "loss": ...,
"loss_text": ..., ...}``; ``tokens`` and ``flops`` are cumulative over the run (all ranks), so curves
against compute need no other file. After a resume, iterations past the last checkpoint are logged again;
readers keep the last line of each (kind, iteration). TensorBoard tags are ``<kind>/<key>``
(``train/loss_text``, ``eval/ppl_image``) and the routing metrics' own names (``moma/layer1/...``).
"""

import json
import math
from pathlib import Path
from typing import Dict, Optional


class MetricsWriter:
    """Appends metrics to ``<run_dir>/metrics.jsonl`` and, if available, TensorBoard. Rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard_dir: Optional[Path], enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses no line
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                print("TensorBoard is not importable; metrics go to metrics.jsonl only")
            else:
                self.tensorboard = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, kind: str, iteration: int, values: Dict[str, float]):
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": iteration}
        record.update({k: _plain(v) for k, v in values.items()})
        self.file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    tag = key if key.startswith("moma/") else f"{kind}/{key}"
                    self.tensorboard.add_scalar(tag, value, iteration)

    def flush(self):
        if self.enabled:
            self.file.flush()
            if self.tensorboard is not None:
                self.tensorboard.flush()

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value
