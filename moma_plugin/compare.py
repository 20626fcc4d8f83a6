"""moma-compare: loss-vs-FLOPs curves and the speed-up factor eta of MoMa runs against a dense baseline.

Input: run directories written by the training job. Each holds
  * ``run.json``: {"name", "moma_experts" ("dense", "4t4i", ...), "modalities", "flops_per_token",
    "num_parameters", "args"};
  * ``metrics.jsonl``: one JSON object per line, ``{"kind": "train" | "eval", "iteration", "tokens",
    "flops" (cumulative training FLOPs), "loss", "loss_<modality>", ...}``. After a crash and resume an
    iteration can appear twice: for each (kind, iteration) the last line wins. Lines that do not parse
    (a line cut short by a crash) are skipped with a warning.

Speed-up factor eta (MoMa paper, arXiv 2407.21770): a sparse model has speed-up eta when it reaches the
dense model's pre-training loss with 1/eta of the dense model's FLOPs. Here both curves are loss vs
cumulative training FLOPs (train losses smoothed by a trailing mean over a window of iterations, eval
losses as they are), compared at equal FLOPs:
  * budget F = min(final FLOPs of the baseline, final FLOPs of the run); L_d = baseline loss at F;
  * if the run reaches L_d (first crossing, linear interpolation) at F_s <= F: eta = F / F_s >= 1;
  * otherwise the run is slower: with L_r its loss at F and F_b the FLOPs at which the baseline first
    reaches L_r, eta = F_b / F <= 1;
  * NaN when the curves do not overlap in FLOPs or neither reaches the other's level.
A curve already below the level at its first point counts as reaching it there, so eta is then a bound.

Smoothing (``--smooth N``): each train record becomes the mean of the records of the last N iterations
(by iteration number, not by record count), and a smoothed curve starts only where its window is full,
so a run's first, fast-falling losses never bend it. The default window is 10% of the longest run's
iterations. The table reports each run's final loss as logged (its last record), not smoothed.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import model_label

SOURCES = ("train", "eval")


@dataclass
class Run:
    """One training run: metadata from run.json and its metric records (per kind, deduplicated by
    iteration with the last line winning, sorted by iteration)."""
    name: str
    experts: str
    modalities: List[str]
    flops_per_token: float
    num_parameters: int
    path: Path
    args: dict = field(default_factory=dict)
    records: Dict[str, List[dict]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.experts})"

    @property
    def series_keys(self) -> List[str]:
        return ["loss"] + [f"loss_{m}" for m in self.modalities]

    def require(self, source: str) -> List[dict]:
        """The records of ``source``; ValueError when the run has none."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
        recs = self.records.get(source, [])
        if not recs:
            other = "eval" if source == "train" else "train"
            raise ValueError(f"run {self.name!r} ({self.path}) has no {source!r} lines in metrics.jsonl; "
                             f"use --source {other}, or let the job run until it logs {source} metrics.")
        return recs

    def points(self, key: str, source: str = "train") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(iterations, FLOPs, loss) of series ``key`` as logged, skipping records without a finite
        value."""
        pts = [(r["iteration"], r["flops"], r[key]) for r in self.require(source)
               if isinstance(r.get(key), (int, float)) and isinstance(r.get("flops"), (int, float))
               and math.isfinite(r[key]) and math.isfinite(r["flops"])]
        return tuple(np.array([p[i] for p in pts], dtype=float) for i in range(3))

    def curve(self, key: str, source: str = "train", smooth: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """(FLOPs, loss) arrays of series ``key``; train losses smoothed by a trailing mean over
        ``smooth`` iterations (1: none), from the first record whose window is full."""
        iterations, flops, loss = self.points(key, source)
        if source == "train":
            keep, loss = trailing_mean(iterations, loss, smooth)
            flops = flops[keep]
        return flops, loss

    @property
    def last_iteration(self) -> int:
        return max(r["iteration"] for records in self.records.values() for r in records)


def trailing_mean(iterations: np.ndarray, values: np.ndarray, window: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(kept mask, smoothed values of the kept records): record i becomes the mean of the records j
    with ``iterations[i] - window < iterations[j] <= iterations[i]``, kept only when its window is
    full: it reaches back to the first record's own span (a record covers the iterations since the one
    before it). Fewer than one full window: the values as they are."""
    if window <= 1 or len(values) < 2:
        return np.ones(len(values), dtype=bool), values
    first_span = iterations[1] - iterations[0]
    keep = iterations - window >= iterations[0] - first_span
    if not keep.any():
        return np.ones(len(values), dtype=bool), values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.searchsorted(iterations, iterations - window, side="right")
    smoothed = (csum[hi] - csum[lo]) / (hi - lo)
    return keep, smoothed[keep]


def default_window(runs: Sequence["Run"]) -> int:
    """10% of the longest run's iterations (at least 1)."""
    return max(1, round(0.1 * max(r.last_iteration for r in runs)))


def load_run(path) -> Run:
    """Read a run directory (run.json + metrics.jsonl)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory; pass the directory the training job "
                                f"wrote run.json and metrics.jsonl into.")
    meta_path, metrics_path = path / "run.json", path / "metrics.jsonl"
    for p in (meta_path, metrics_path):
        if not p.is_file():
            raise FileNotFoundError(f"{path} is not a run directory: {p.name} is missing; pass the "
                                    f"directory the training job wrote run.json and metrics.jsonl into.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); fix or rewrite it.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a {type(meta).__name__}, not the run's description; "
                         "fix or rewrite it.")

    latest: Dict[Tuple[str, int], dict] = {}
    with open(metrics_path, encoding="utf-8", errors="replace") as f:  # a bad byte spoils one line
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec["kind"], int(rec["iteration"]))
            except (ValueError, KeyError, TypeError):
                print(f"moma-compare: warning: {metrics_path}:{lineno}: skipping a line that does not "
                      f"parse as a metrics record", file=sys.stderr)
                continue
            if "flops" not in rec and "tokens" in rec and meta.get("flops_per_token"):
                rec["flops"] = rec["tokens"] * float(meta["flops_per_token"])
            latest[key] = rec
    if not latest:
        raise ValueError(f"{metrics_path} holds no metrics records; has the run logged an iteration yet?")
    records: Dict[str, List[dict]] = {}
    for (kind, _), rec in sorted(latest.items(), key=lambda kv: kv[0]):
        records.setdefault(kind, []).append(rec)
    experts = model_label(str(meta.get("moma_experts", "?")), (meta.get("args") or {}).get("mot"))
    return Run(name=str(meta.get("name") or path.name), experts=experts,
               modalities=list(meta.get("modalities", [])),
               flops_per_token=float(meta.get("flops_per_token") or 0.0),
               num_parameters=int(meta.get("num_parameters") or 0), path=path,
               args=dict(meta.get("args") or {}), records=records)


def first_crossing(flops: np.ndarray, loss: np.ndarray, level: float) -> float:
    """First FLOPs at which the piecewise-linear curve reaches ``loss <= level``; NaN if it never does."""
    below = np.nonzero(loss <= level)[0]
    if len(below) == 0:
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(flops[0])
    f0, f1, l0, l1 = flops[i - 1], flops[i], loss[i - 1], loss[i]
    return float(f0 + (l0 - level) / (l0 - l1) * (f1 - f0))


def speedup(baseline_run: Run, run: Run, key: str = "loss", source: str = "train",
            smooth: int = 10) -> float:
    """Speed-up factor eta of ``run`` over ``baseline_run`` on series ``key`` (see the module docstring)."""
    fb, lb = baseline_run.curve(key, source, smooth)
    fr, lr = run.curve(key, source, smooth)
    if len(fb) == 0 or len(fr) == 0:
        return math.nan
    budget = min(fb[-1], fr[-1])
    if budget < max(fb[0], fr[0]) or budget <= 0:
        return math.nan  # the curves do not overlap in FLOPs
    level_d = float(np.interp(budget, fb, lb))
    f_s = first_crossing(fr, lr, level_d)
    if math.isfinite(f_s) and f_s <= budget:
        return budget / f_s if f_s > 0 else math.nan
    level_r = float(np.interp(budget, fr, lr))
    f_b = first_crossing(fb, lb, level_r)
    return f_b / budget if math.isfinite(f_b) else math.nan


def pick_baseline(runs: Sequence[Run], baseline: Optional[str] = None) -> Run:
    """The run named (by directory or name) by ``baseline``, else the single run with experts 'dense'."""
    if baseline is not None:
        for r in runs:
            if r.name == baseline or (Path(baseline).exists() and r.path.resolve() == Path(baseline).resolve()):
                return r
        raise ValueError(f"--baseline {baseline!r} is neither a run directory nor the name of a run given.")
    dense = [r for r in runs if r.experts == "dense"]
    if len(dense) != 1:
        what = "none of the runs is" if not dense else f"{len(dense)} runs are"
        raise ValueError(f"no baseline for eta: {what} dense (moma_experts == 'dense'); "
                         f"pick one with --baseline RUN.")
    return dense[0]


def _series_keys(runs: Sequence[Run]) -> List[str]:
    keys: List[str] = []
    for r in runs:
        keys += [k for k in r.series_keys if k not in keys]
    return keys


def _title(key: str) -> str:
    return "overall" if key == "loss" else key[len("loss_"):]


def plot_runs(runs: Sequence[Run], output_path, source: str = "train",
              smooth: Optional[int] = None) -> Path:
    """Loss vs cumulative training FLOPs as a PNG (see ``draw_runs``)."""
    fig = draw_runs(runs, source, smooth)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=120)
    return output_path


def draw_runs(runs: Sequence[Run], source: str = "train", smooth: Optional[int] = None):
    """A figure of loss vs cumulative training FLOPs (log x), one subplot per series, one line per run
    (train: the smoothed curve, and faintly the losses as logged; a series of one point: a marker).
    ``smooth``: window in iterations (default ``default_window``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    smooth = default_window(runs) if smooth is None else smooth
    keys = _series_keys(runs)
    fig = Figure(figsize=(5 * len(keys), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    drawn = 0
    for ax, key in zip(axes, keys):
        for r in runs:
            flops, loss = r.curve(key, source, smooth)
            keep = flops > 0  # log axis
            if not keep.any():
                continue
            style = {"marker": "o"} if keep.sum() == 1 else ({"marker": "."} if source == "eval" else {})
            line = ax.plot(flops[keep], loss[keep], label=r.label, **style)[0]
            _, raw_flops, raw_loss = r.points(key, source)
            if source == "train" and smooth > 1 and len(raw_loss) > 1:
                shown = raw_flops > 0
                ax.plot(raw_flops[shown], raw_loss[shown], color=line.get_color(), alpha=0.25, lw=0.8)
            drawn += 1
        ax.set_xscale("log")
        ax.set_title(_title(key))
        ax.set_xlabel("training FLOPs")
        ax.grid(True, which="both", alpha=0.3)
    if not drawn:
        raise ValueError(f"nothing to plot: no run has {source} losses at positive FLOPs.")
    smoothed = (f"\n(mean of the last {smooth} iterations; faint: as logged)"
                if source == "train" and smooth > 1 else "")
    axes[0].set_ylabel(f"{source} loss{smoothed}")
    axes[0].legend(fontsize="small")
    return fig


def summarize(runs: Sequence[Run], baseline: Optional[Run], source: str = "train",
              smooth: Optional[int] = None) -> dict:
    """Per run: metadata, final FLOPs, final loss as logged and eta (on the smoothed curves) per series;
    NaN given as None."""
    smooth = default_window(runs) if smooth is None else smooth
    keys = _series_keys(runs)
    out = {"source": source, "smooth": smooth if source == "train" else 1, "series": keys,
           "baseline": baseline.name if baseline else None, "runs": []}
    for r in runs:
        final_loss, eta = {}, {}
        for key in keys:
            _, _, loss = r.points(key, source)
            final_loss[key] = float(loss[-1]) if len(loss) else None
            is_other = baseline is not None and r is not baseline
            e = speedup(baseline, r, key, source, smooth) if is_other else math.nan
            eta[key] = e if math.isfinite(e) else None
        final_flops = r.require(source)[-1].get("flops")
        out["runs"].append({"name": r.name, "experts": r.experts, "path": str(r.path),
                            "is_baseline": r is baseline, "num_parameters": r.num_parameters,
                            "flops_per_token": r.flops_per_token, "final_flops": final_flops,
                            "final_loss": final_loss, "eta": eta})
    return out


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def format_table(summary: dict) -> str:
    """Plain-text table of a ``summarize`` result, columns aligned; the baseline row marked with '*'."""
    keys = summary["series"]
    header = (["  run", "experts", "params", "FLOPs"] + [f"{_title(k)} loss" for k in keys]
              + [f"eta {_title(k)}" for k in keys])
    rows = [header]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    for r in summary["runs"]:
        rows.append([("* " if r["is_baseline"] else "  ") + r["name"], r["experts"],
                     _human(r["num_parameters"]), num(r["final_flops"], ".3g")]
                    + [num(r["final_loss"][k], ".4f") for k in keys]
                    + ["base" if r["is_baseline"] else num(r["eta"][k], ".2f") for k in keys])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    smooth = (f"; eta on train losses averaged over the last {summary['smooth']} iterations"
              if summary["smooth"] > 1 else "")
    note = (f"* baseline: {summary['baseline']}; eta = FLOPs the baseline needs / FLOPs the run needs "
            f"for the same loss" if summary["baseline"] else "no baseline: eta not computed")
    return "\n".join(lines + [f"(final {summary['source']} losses as logged{smooth}; {note})"])


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="moma-compare", formatter_class=HelpFormatter, description="Plot loss vs training FLOPs of MoMa runs and print the speed-up "
        "factor eta of each against a dense baseline.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (run.json + metrics.jsonl)")
    parser.add_argument("--baseline", metavar="RUN", help="baseline run directory or name "
                        "(default: the single run with moma_experts 'dense')")
    parser.add_argument("--source", choices=SOURCES, default="train", help="train or eval losses")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="average train losses over the last N iterations (1: none; default: 10%% "
                             "of the longest run's iterations)")
    parser.add_argument("--output", default="compare.png", metavar="PNG", help="plot file")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smooth is not None and args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        runs = [load_run(p) for p in args.runs]
        if args.baseline is not None and Path(args.baseline).is_dir() and not any(
                r.path.resolve() == Path(args.baseline).resolve() for r in runs):
            runs.insert(0, load_run(args.baseline))
        for r in runs:
            r.require(args.source)
        try:
            baseline = pick_baseline(runs, args.baseline)
        except ValueError as e:
            if args.baseline is not None:
                raise
            print(f"moma-compare: {e}", file=sys.stderr)
            baseline = None
        summary = summarize(runs, baseline, args.source, args.smooth)
        out = plot_runs(runs, args.output, args.source, args.smooth)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"moma-compare: error: {e}\n")
    except OSError as e:
        parser.exit(2, f"moma-compare: error: cannot write {e.filename or args.output} ({e.strerror})\n")
    print(format_table(summary))
    print(f"plot: {out}")
    if args.json:
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
