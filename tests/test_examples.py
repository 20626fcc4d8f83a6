"""The README's example keeps working (a short run; what it prints is checked, not its timing)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from .conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_moma_example_trains_on_the_bundled_corpus(tmp_path):
    env = {**os.environ, "MOMA_CACHE": str(tmp_path), "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tiny_moma.py"), "--steps", "30", "--recompute"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+ \| loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0]  # steps 1 and 25
    held_out = re.search(r"held-out loss text ([0-9.]+), image ([0-9.]+)", result.stdout)
    assert held_out and all(float(v) < 7 for v in held_out.groups())
    assert "steps outside the bound 0" in result.stdout


@pytest.mark.slow
def test_the_upcycling_example_runs_both_phases_and_the_baseline(tmp_path):
    """examples/upcycling.sh (its measured table is in docs/TRAINING.md, "Upcycling"), 3 iterations per
    phase: the upcycled run's FLOPs axis continues the source run's, and moma-compare tables all three."""
    env = {**os.environ, "MOMA_CACHE": str(tmp_path / "cache"), "PATH": f"{pathlib.Path(sys.executable).parent}"
           f"{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "examples" / "upcycling.sh"), str(tmp_path / "runs"), "3"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "upcycled phase: iteration 3 of 1t1i" in result.stdout
    table = json.loads((tmp_path / "runs" / "compare.json").read_text())
    runs = {run["name"]: run for run in table["runs"]}
    assert set(runs) == {"4t4i-scratch", "4t4i-upcycled", "1t1i"} and runs["4t4i-scratch"]["is_baseline"]
    # Both phases together cost about what the scratch run did (same iterations, FLOPs within 1%).
    assert runs["4t4i-upcycled"]["final_flops"] == pytest.approx(runs["4t4i-scratch"]["final_flops"], rel=0.01)


@pytest.mark.slow
def test_mot_example_runs(tmp_path):
    """examples/mot.sh (its measured table is in docs/MOT.md, "Measured"), 3 iterations per run: the four
    runs complete on the same data order, FLOPs-matched to dense, and moma-compare tables all four."""
    env = {**os.environ, "MOMA_CACHE": str(tmp_path / "cache"), "PATH": f"{pathlib.Path(sys.executable).parent}"
           f"{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "examples" / "mot.sh"), str(tmp_path / "runs"), "3"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(re.findall(r"^done: 3 iterations, ", result.stdout, re.MULTILINE)) == 4, result.stdout[-3000:]
    configs = {"dense": ("dense", ""), "mot": ("1t1i", "all"), "4t4i": ("4t4i", ""), "mot-4t1i": ("4t1i", "all")}
    for name, (experts, mot) in configs.items():  # each run trained its config and ended with its eval
        meta = json.loads((tmp_path / "runs" / name / "run.json").read_text())
        got = (meta["moma_experts"], meta["args"]["mot"], meta["args"]["balanced_sampler"])
        assert got == (experts, mot, False), (name, got)
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records[-1]["kind"] == "eval" and records[-1]["iteration"] == 3, (name, records[-1])
    table = json.loads((tmp_path / "runs" / "compare.json").read_text())
    runs = {run["name"]: run for run in table["runs"]}
    assert set(runs) == set(configs) and len(table["runs"]) == 4 and runs["dense"]["is_baseline"]
    assert {name: runs[name]["experts"] for name in configs} == {  # moma-compare labels MoT runs
        name: f"mot {experts}" if mot else experts for name, (experts, mot) in configs.items()}
    # FLOPs-matched: the same FLOPs per token as dense within the routers' share (1%).
    for name in configs:
        assert runs[name]["flops_per_token"] == pytest.approx(runs["dense"]["flops_per_token"], rel=0.01), name
