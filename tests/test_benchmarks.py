"""The benchmarks keep running (a smoke run; timings are not asserted, only that the paths agree)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # conftest.py: the Python 3.12 CI environment deselects it

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The benchmarks start their own process groups: not on the port of this process's group.
ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


def test_moma_mlp_benchmark_smoke_run():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_moma_mlp.py"), "--quick", "--seq", "64",
         "--batch", "2"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    differences = re.search(r"chunked ([0-9.e+-]+), grouped ([0-9.e+-]+), padded ([0-9.e+-]+)",
                            result.stdout)
    assert differences and max(map(float, differences.groups())) < 1e-4, result.stdout
    for path in ("loop", "chunked", "grouped", "padded", "dense"):
        assert re.search(rf"^\| {path} ", result.stdout, re.MULTILINE), result.stdout


def test_generation_benchmark_smoke_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generation.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]  # it exits non-zero if the paths disagree
    for name in ("4t4i", "MoD 4t4i"):
        assert re.search(rf"^\| {name} \| [0-9,]+ \| [0-9,]+ \| [0-9.]+x \|$", result.stdout,
                         re.MULTILINE), result.stdout


def test_paper_configs_benchmark_smoke_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paper_configs.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    agreement = re.search(r"^max \|loss - loss_loop\| .*: ([0-9.e+-]+), relative ([0-9.e+-]+)", result.stdout,
                          re.MULTILINE)
    assert agreement and float(agreement.group(2)) < 1e-4, result.stdout
    for name in ("dense", "1t1i", "8x", "4t4i", "MoD 1t1i", "MoD 4t4i"):
        # A row in the wall, 1-thread CPU and aten-op tables, and (not dense) in the paper table.
        rows = re.findall(rf"^\| {name} \| [0-9]", result.stdout, re.MULTILINE)
        assert len(rows) == (3 if name == "dense" else 4), (name, result.stdout)


def test_engines_benchmark_smoke_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engines.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    for engine in ("ddp", "fsdp2", "zero2"):
        row = re.search(rf"^\| tiny \| {engine} \| [0-9,]+ \| ([0-9.]+) \| [0-9.]+ \| [0-9.]+ \| [0-9,]+ \| [0-9.]+ \|$",
                        result.stdout, re.MULTILINE)
        assert row, (engine, result.stdout)
    assert re.search(r"^\| tiny \| ddp \| [0-9,]+ \| 1\.00 \|", result.stdout, re.MULTILINE)


def test_expert_parallel_benchmark_smoke_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_expert_parallel.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]  # it exits non-zero if EP=1 and EP=2 disagree
    agreement = re.search(r"^max \|EP2 - EP1\| .*: output ([0-9.e+-]+), input gradient ([0-9.e+-]+)$",
                          result.stdout, re.MULTILINE)
    assert agreement and max(map(float, agreement.groups())) < 1e-4, result.stdout
    assert re.search(r"^\| EP=1 \(8 experts per rank\) +\| [0-9.]+ +\| [0-9.]+ +\| [0-9.]+ +\| 1\.00 ",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\| EP=2 \(4 per rank\) +\| [0-9.]+ +\| [0-9.]+ +\| [0-9.]+ +\| [0-9.]+ \[[0-9.]+-[0-9.]+\] ",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^EP=2 dispatch/combine .*: [0-9.]+% \[", result.stdout, re.MULTILINE), result.stdout
    model = re.search(r"^bytes per token \(model\): ([0-9.]+) ", result.stdout, re.MULTILINE)
    measured = re.search(r"^bytes per token \(measured\): ([0-9.]+) ", result.stdout, re.MULTILINE)
    assert model and measured, result.stdout
    # --quick: 128 tokens, H 64, capacity factor 1, balanced placement over 2 ranks: every (token,
    # expert) row crosses 4 times half the time (512 B) plus 8 counts of 8 B per 128 tokens.
    assert float(model.group(1)) == float(measured.group(1)) == 512.5, result.stdout


def test_mot_layer_benchmark_smoke_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mot_layer.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]  # it exits non-zero if a layer is not its variant
    for name in ("dense", "mot", "mot-ffn", "4t4i"):
        # A row in the wall and in the 1-thread CPU table, and (not dense) a ratio in the summary line.
        rows = re.findall(rf"^\| {name} +\| [0-9.]+M +\| [0-9.]+ +\| [0-9.]+ +\| [0-9.]+ +\| ", result.stdout,
                          re.MULTILINE)
        assert len(rows) == 2, (name, result.stdout)
        if name != "dense":
            assert re.search(rf"^fwd\+bwd time vs dense .*[:,] {name} [0-9.]+ wall, [0-9.]+ CPU", result.stdout,
                             re.MULTILINE), (name, result.stdout)
    assert re.search(r"^\| dense +\| [0-9.]+M .*\| 1\.00 +\| [0-9,]+ +\|$", result.stdout, re.MULTILINE)
