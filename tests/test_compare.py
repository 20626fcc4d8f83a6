"""moma-compare on synthetic run directories whose speed-up is known: the baseline's loss is
a - b*ln(F); a sparse run with speed-up c has loss a - b*ln(c*F), i.e. the baseline curve with its FLOPs
divided by c."""

import json
import math

import numpy as np
import pytest

from moma_plugin.compare import (
    default_window,
    draw_runs,
    first_crossing,
    load_run,
    main,
    pick_baseline,
    plot_runs,
    speedup,
    summarize,
    trailing_mean,
)

ITERS = 400
FLOPS_PER_ITER = 1e15
CURVES = {"text": (6.0, 0.08), "image": (7.0, 0.1)}  # a, b of loss_m(F) = a - b*ln(F)


def losses(flops, factors, noise=0.0, offset=0.0):
    """Loss per series at cumulative FLOPs ``flops`` of a run with speed-up ``factors[m]`` per modality."""
    out = {f"loss_{m}": a - b * math.log(factors[m] * flops) + noise + offset for m, (a, b) in CURVES.items()}
    out["loss"] = sum(out.values()) / len(out)
    return out


def train_line(it, factors, noise=0.0, offset=0.0, flops_scale=1.0):
    """Iteration ``it``: the loss depends on the iteration (through the baseline's FLOPs) and ``factors``;
    the FLOPs logged are the baseline's times ``flops_scale``."""
    return {"kind": "train", "iteration": it, "tokens": it * 4096, "flops": it * FLOPS_PER_ITER * flops_scale,
            "lr": 1e-4, "grad_norm": 1.0, **losses(it * FLOPS_PER_ITER, factors, noise, offset)}


def write_run(root, name, experts, factors=None, flops_scale=1.0, iters=ITERS, eval_every=20, noise=0.0,
              lines=None, tail=""):
    """A run directory with speed-up ``factors`` (per modality, default 1) and, on top, speed-up
    1/``flops_scale`` (the same losses per iteration at ``flops_scale`` times the FLOPs). ``lines`` replaces the generated metrics lines; ``tail`` is appended raw."""
    factors = factors or {m: 1.0 for m in CURVES}
    path = root / name
    path.mkdir()
    (path / "run.json").write_text(json.dumps({
        "name": name, "moma_experts": experts, "modalities": list(CURVES),
        "flops_per_token": FLOPS_PER_ITER * flops_scale / 4096, "num_parameters": 123_000_000,
        "args": {"seq_length": 4096}}))
    if lines is None:
        lines = []
        for it in range(1, iters + 1):
            lines.append(train_line(it, factors, noise * (-1) ** it, flops_scale=flops_scale))
            if it % eval_every == 0:
                rec = train_line(it, factors, flops_scale=flops_scale)
                rec["kind"] = "eval"
                rec.update({f"ppl_{m}": math.exp(rec[f"loss_{m}"]) for m in CURVES})
                lines.append(rec)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return path


@pytest.fixture
def runs(tmp_path):
    """Dense baseline, a run twice as fast (same loss with half the FLOPs), one half as fast, and one with
    speed-up 1.5 on text and 3 on image."""
    return {
        "dense": write_run(tmp_path, "dense", "dense"),
        "fast": write_run(tmp_path, "fast", "4t4i", flops_scale=0.5),
        "slow": write_run(tmp_path, "slow", "8x", flops_scale=2.0),
        "mixed": write_run(tmp_path, "mixed", "1t3i", factors={"text": 1.5, "image": 3.0}),
    }


def test_trailing_mean_by_iterations_and_crossing():
    keep, smoothed = trailing_mean(np.array([1.0, 2, 3, 4]), np.array([1.0, 3.0, 5.0, 7.0]), 2)
    # each record covers one iteration; a 2-iteration window is full from the second record on
    assert keep.tolist() == [False, True, True, True]
    np.testing.assert_allclose(smoothed, [2.0, 4.0, 6.0])
    keep, smoothed = trailing_mean(np.array([1.0, 2]), np.array([1.0, 3.0]), 1)
    assert keep.all() and smoothed.tolist() == [1.0, 3.0]
    # records every 10 iterations (each the mean of its 10): a 30-iteration window averages 3 records,
    # whatever the record count; never a cumulative mean over a partial window
    iterations = np.array([10.0, 20, 30, 40, 50, 60, 80, 100])  # logging got sparser after 60
    values = np.array([9.0, 7, 5, 4, 3, 2, 1.5, 1])
    keep, smoothed = trailing_mean(iterations, values, 30)
    assert keep.tolist() == [False, False, True, True, True, True, True, True]
    np.testing.assert_allclose(smoothed, [7.0, 16 / 3, 4.0, 3.0, 1.75, 1.25])
    flops, loss = np.array([1.0, 2.0, 4.0]), np.array([3.0, 2.0, 1.0])
    assert first_crossing(flops, loss, 1.5) == pytest.approx(3.0)
    assert first_crossing(flops, loss, 5.0) == 1.0  # already below at the first point
    assert math.isnan(first_crossing(flops, loss, 0.5))


def test_load_run(runs):
    run = load_run(runs["fast"])
    assert (run.name, run.experts, run.modalities) == ("fast", "4t4i", ["text", "image"])
    assert run.num_parameters == 123_000_000 and run.series_keys == ["loss", "loss_text", "loss_image"]
    assert [r["iteration"] for r in run.records["train"]] == list(range(1, ITERS + 1))
    assert len(run.records["eval"]) == ITERS // 20
    flops, loss = run.curve("loss_text", "train", smooth=1)  # 1: as logged
    np.testing.assert_allclose(flops, np.arange(1, ITERS + 1) * FLOPS_PER_ITER * 0.5)
    np.testing.assert_allclose(loss, 6.0 - 0.08 * np.log(2 * flops))  # twice as fast


@pytest.mark.parametrize("source", ["train", "eval"])
def test_speedup_known_factors(runs, source):
    dense, fast, slow, mixed = (load_run(runs[k]) for k in ("dense", "fast", "slow", "mixed"))
    for key in ("loss", "loss_text", "loss_image"):
        # the same curve on a FLOPs axis scaled by 1/2 (or 2): exact up to rounding, smoothed or not
        assert speedup(dense, fast, key, source) == pytest.approx(2.0, rel=1e-9)
        assert speedup(dense, slow, key, source) == pytest.approx(0.5, rel=1e-9)
        assert speedup(dense, dense, key, source) == pytest.approx(1.0, rel=1e-9)
    # mixed: its FLOPs nodes differ from the baseline's, so linear interpolation between points (coarser
    # for eval) and the lag of the trailing mean add a small error
    tol = 2e-3 if source == "train" else 1e-2
    assert speedup(dense, mixed, "loss_text", source, smooth=1) == pytest.approx(1.5, rel=tol)
    assert speedup(dense, mixed, "loss_image", source, smooth=1) == pytest.approx(3.0, rel=tol)
    assert speedup(dense, mixed, "loss_image", source) == pytest.approx(3.0, rel=3e-2)
    overall = speedup(dense, mixed, "loss", source, smooth=1)
    assert 1.5 < overall < 3.0
    # the inverse comparison inverts eta
    assert speedup(fast, dense, "loss", source) == pytest.approx(0.5, rel=1e-9)
    assert speedup(mixed, dense, "loss_image", source, smooth=1) == pytest.approx(1 / 3, rel=tol)


@pytest.mark.parametrize("iters, flops_scale, expected", [
    (300, 0.5, 2.0),   # the run stops before the baseline's FLOPs: compared at the run's final FLOPs
    (800, 0.5, 2.0),   # the run goes on to the baseline's final FLOPs
    (1200, 0.5, 2.0),  # and beyond: compared at the baseline's final FLOPs
    (100, 2.0, 0.5),   # a slower run, stopped halfway through the baseline's FLOPs
    (300, 2.0, 0.5),   # a slower run, trained longer than the baseline
])
def test_speedup_compares_at_equal_flops(tmp_path, iters, flops_scale, expected):
    dense = load_run(write_run(tmp_path, "dense", "dense"))
    run = load_run(write_run(tmp_path, "run", "4t4i", flops_scale=flops_scale, iters=iters))
    for source in ("train", "eval"):
        assert speedup(dense, run, "loss_text", source) == pytest.approx(expected, rel=1e-9)


def test_smoothing_removes_noise(tmp_path):
    dense = load_run(write_run(tmp_path, "dense", "dense", noise=0.05))
    fast = load_run(write_run(tmp_path, "fast", "4t4i", flops_scale=0.5, noise=0.05))
    # alternating +-noise: a 2-point trailing mean cancels it exactly; the raw curve crosses early
    assert speedup(dense, fast, "loss", smooth=2) == pytest.approx(2.0, rel=1e-9)
    assert speedup(dense, fast, "loss", smooth=1) > 2.2


def test_no_overlap_is_nan(tmp_path):
    dense = load_run(write_run(tmp_path, "dense", "dense", iters=50))
    lines = [train_line(it, {m: 1.0 for m in CURVES}) for it in range(100, 200)]
    late = load_run(write_run(tmp_path, "late", "4t4i", lines=lines))
    assert math.isnan(speedup(dense, late, "loss"))


def test_resume_duplicates_last_line_wins(tmp_path, runs):
    factors = {m: 1.0 for m in CURVES}
    # the first attempt went off the rails after its last checkpoint (iteration 250) and crashed at 300
    first = [train_line(it, factors, flops_scale=0.5) for it in range(1, 251)]
    first += [train_line(it, factors, offset=5.0, flops_scale=0.5) for it in range(251, 301)]
    resumed = [train_line(it, factors, flops_scale=0.5) for it in range(251, ITERS + 1)]
    run = load_run(write_run(tmp_path, "resumed", "4t4i", lines=first + resumed))
    assert [r["iteration"] for r in run.records["train"]] == list(range(1, ITERS + 1))
    reference = load_run(runs["fast"])
    np.testing.assert_allclose(run.curve("loss")[1], reference.curve("loss")[1])
    assert speedup(load_run(runs["dense"]), run, "loss") == pytest.approx(2.0, rel=1e-9)


def test_truncated_last_line(tmp_path, runs, capsys):
    lines = [train_line(it, {m: 1.0 for m in CURVES}, flops_scale=0.5) for it in range(1, ITERS + 1)]
    run = load_run(write_run(tmp_path, "cut", "4t4i", lines=lines, tail='{"kind": "train", "iteration": 4'))
    assert "metrics.jsonl:401" in capsys.readouterr().err
    assert len(run.records["train"]) == ITERS
    assert speedup(load_run(runs["dense"]), run, "loss") == pytest.approx(2.0, rel=1e-9)


def test_clear_errors(tmp_path, runs):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run.json is missing"):
        load_run(tmp_path / "empty")
    (runs["fast"] / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl is missing"):
        load_run(runs["fast"])
    write_run(tmp_path, "crashed_early", "dense", lines=[], tail='{"kind": "tr')
    with pytest.raises(ValueError, match="no metrics records"):
        load_run(tmp_path / "crashed_early")
    no_eval = load_run(write_run(tmp_path, "noeval", "4t4i", eval_every=10**9))
    with pytest.raises(ValueError, match="no 'eval' lines.*--source train"):
        no_eval.curve("loss", "eval")
    dense = load_run(runs["dense"])
    with pytest.raises(ValueError, match="--baseline"):
        pick_baseline([no_eval])
    with pytest.raises(ValueError, match="2 runs are dense"):
        pick_baseline([dense, dense])
    assert pick_baseline([no_eval, dense]) is dense
    assert pick_baseline([no_eval, dense], "noeval") is no_eval


def test_plot_png(tmp_path, runs):
    import matplotlib.image

    out = plot_runs([load_run(runs[k]) for k in runs], tmp_path / "sub" / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 3 * img.shape[0]  # three subplots side by side
    assert img.std() > 0.01  # not a blank canvas


def test_final_loss_is_the_logged_one_and_the_smoothed_curve_has_no_kink(tmp_path):
    """The issue's case: a short run whose early losses fall fast. A trailing mean over records started
    as a cumulative mean (a kink) and reported a final loss far above the last logged one."""
    lines = [train_line(it, {m: 1.0 for m in CURVES}) for it in range(10, 310, 10)]
    for line in lines:  # steep start: loss 3x higher at iteration 10, falling off quickly
        boost = 2 * math.exp(-line["iteration"] / 30)
        for key in ("loss", "loss_text", "loss_image"):
            line[key] += boost
    run = load_run(write_run(tmp_path, "short", "dense", lines=lines))
    summary = summarize([run], None)
    assert summary["smooth"] == default_window([run]) == 30
    assert summary["runs"][0]["final_loss"]["loss"] == lines[-1]["loss"]  # as logged
    flops, loss = run.curve("loss", "train", 30)
    assert flops[0] == lines[2]["flops"]  # starts where the window is full
    assert (np.diff(loss) < 0).all()  # monotone like the data: no kink where a window fills


def test_plot_draws_a_single_evaluation_as_a_marker(tmp_path):
    lines = [train_line(it, {m: 1.0 for m in CURVES}) for it in range(1, 50)]
    final = dict(train_line(49, {m: 1.0 for m in CURVES}), kind="eval")
    run = load_run(write_run(tmp_path, "one_eval", "dense", lines=lines + [final]))
    assert plot_runs([run], tmp_path / "eval.png", source="eval").read_bytes()[:4] == b"\x89PNG"
    line = draw_runs([run], source="eval").axes[0].lines[0]
    assert len(line.get_xdata()) == 1 and line.get_marker() == "o"  # a line of one point is invisible


def test_cli(tmp_path, runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(runs[k]) for k in runs] + ["--json", "out.json", "--smooth", "10"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    rows = {line.split()[0] if not line.startswith("*") else "dense": line for line in out.splitlines()[1:5]}
    assert rows["dense"].startswith("* dense") and "base" in rows["dense"]
    assert rows["fast"].split()[-3:] == ["2.00", "2.00", "2.00"]
    assert rows["slow"].split()[-3:] == ["0.50", "0.50", "0.50"]
    eta_text, eta_image = map(float, rows["mixed"].split()[-2:])  # a 10-iteration mean: lags a little
    assert eta_text == pytest.approx(1.5, rel=2e-2) and eta_image == pytest.approx(3.0, rel=3e-2)
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["baseline"] == "dense"
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["fast"]["eta"]["loss"] == pytest.approx(2.0, rel=1e-9)
    assert by_name["dense"]["is_baseline"] and by_name["dense"]["eta"]["loss"] is None
    assert by_name["slow"]["final_flops"] == pytest.approx(ITERS * FLOPS_PER_ITER * 2)


def test_cli_baseline_choice_and_errors(tmp_path, runs, capsys):
    # no dense run: the table comes without eta and says why
    assert main([str(runs["fast"]), str(runs["slow"]), "--output", str(tmp_path / "a.png")]) == 0
    captured = capsys.readouterr()
    assert "no baseline" in captured.err and "--baseline" in captured.err
    # an explicit baseline directory not among the runs is added to them
    assert main([str(runs["slow"]), "--baseline", str(runs["fast"]), "--source", "eval",
                 "--output", str(tmp_path / "b.png")]) == 0
    slow_row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("slow"))
    assert slow_row.split()[-3:] == ["0.25", "0.25", "0.25"]
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "no such run directory" in capsys.readouterr().err
