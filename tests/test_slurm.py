"""launch_scripts/ on a real SLURM (tests/slurm_cluster.py: one node, daemons of Debian's packages): the
moma-pretrain script as a 2-task job (two launchers of one worker each, rendezvous on this host, as two
nodes would), and preempted mid-run (SIGTERM to the batch shell, as --signal sends it), requeued and
resumed to the loss of the run that was not stopped; the sweep as the array job it declares, tabled by
moma-compare. Skips where SLURM is not installed."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .slurm_cluster import Cluster, missing_tools

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_scripts" / "moma_pretrain.sbatch"
ITERS = 30
RUN = ["--config", str(REPO / "examples/configs/tiny_cpu.yaml"), "--train-iters", str(ITERS), "--log-interval",
       "1", "--eval-interval", "1000", "--eval-iters", "1", "--save-interval", "1000", "--no-progress-bar",
       "--micro-batch-size", "2", "--global-batch-size", "8"]

pytestmark = [pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
              pytest.mark.slow]  # conftest.py


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(cluster, workdir: Path, name: str) -> str:
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GPUS_PER_NODE": "1",
           "SAVE": str(workdir / name), "MOMA_CACHE": os.environ.get("MOMA_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    return cluster.submit("--ntasks", "2", "--ntasks-per-node", "2", "--job-name", name, "--chdir", str(workdir),
                          "--output", str(workdir / f"{name}.log"), str(SCRIPT), *RUN, env=env)


def final_loss(log: str) -> float:
    losses = re.findall(rf"iteration +{ITERS}/{ITERS} +\| lr \S+ \| loss ([0-9.]+)", log)
    assert losses, log[-3000:]
    return float(losses[-1])


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """The script's job run to its end: (its log, the folder it ran in)."""
    workdir = tmp_path_factory.mktemp("straight")
    job = cluster.wait(submit(cluster, workdir, "straight"), timeout_s=600)
    log = (workdir / "straight.log").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    return log, workdir


def test_the_launch_script_runs_a_two_node_job(straight):
    log, workdir = straight
    assert "layout: world 2 = 2 node(s) x 1; TP 1 x PP 1 x DP 2" in log
    assert "2 process(es) (TP 1 x DP 2)" in log and f"done: {ITERS} iterations" in log
    assert (workdir / "straight" / f"iter_{ITERS:07d}").is_dir()


def test_a_preempted_job_saves_requeues_and_resumes_to_the_same_loss(cluster, straight, tmp_path):
    """``scancel --signal=TERM --batch`` (what ``#SBATCH --signal=B:TERM@300`` sends before the time
    limit) at iteration 10 or later: the workers save and stop, the job requeues itself, and the same
    command resumes from the checkpoint to the straight run's final loss."""
    job_id = submit(cluster, tmp_path, "preempted")
    log_path = tmp_path / "preempted.log"
    deadline = time.monotonic() + 300
    while not (log_path.exists() and re.search(r"iteration +1\d/", log_path.read_text())):
        assert time.monotonic() < deadline, log_path.read_text()[-3000:] if log_path.exists() else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env=cluster.env, check=True)
    job = cluster.wait(job_id, timeout_s=600, until=lambda job: job["JobState"] in ("FAILED", "CANCELLED")
                       or job["JobState"] == "COMPLETED" and int(job.get("Restarts", 0)) >= 1)
    log = log_path.read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    stopped = re.search(r"saved iteration (\d+) to", log)
    assert "SIGTERM" in log and stopped and 10 <= int(stopped.group(1)) < ITERS, log[-3000:]
    assert f"done: {ITERS} iterations" in log
    assert final_loss(log) == final_loss(straight[0])


def test_the_sweep_runs_as_an_array_job(cluster, tmp_path):
    """sbatch launch_scripts/sweep.sbatch from the repository, as docs/SLURM.md submits it: its own
    ``#SBATCH --array=0-3`` makes one task per setting (dense, 8x, 1t1i, 4t4i), each a moma-pretrain
    job in its own run dir and checkpoint folder under SWEEP_DIR; moma-compare then tables them."""
    sweep = tmp_path / "sweep"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GPUS_PER_NODE": "1",
           "SWEEP_DIR": str(sweep), "MOMA_CACHE": os.environ.get("MOMA_CACHE", "")}
    flags = ["--config", str(REPO / "examples/configs/tiny_cpu.yaml"), "--train-iters", "4", "--log-interval", "2",
             "--eval-iters", "1", "--no-progress-bar", "--micro-batch-size", "2", "--global-batch-size", "4"]
    job_id = cluster.submit("--ntasks", "1", "--output", str(tmp_path / "sweep-%a.log"), "launch_scripts/sweep.sbatch",
                            *flags, env={k: v for k, v in env.items() if v}, cwd=REPO)
    states = cluster.wait_array(job_id, tasks=4, timeout_s=600)
    settings = ["dense", "8x", "1t1i", "4t4i"]
    for task, name in enumerate(settings):
        log = (tmp_path / f"sweep-{task}.log").read_text()
        assert states[task] == "COMPLETED", log[-3000:]
        assert f"moma-pretrain {name}:" in log and "done: 4 iterations" in log, log[-3000:]
        assert (sweep / name / "checkpoints" / "iter_0000004").is_dir()
    table = subprocess.run([str(Path(sys.executable).parent / "moma-compare"), *(str(sweep / name) for name in settings),
                            "--output", str(tmp_path / "sweep.png")], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = {}  # run name -> its row ("* " marks the baseline)
    for line in table.stdout.splitlines():
        cells = line.split()
        cells = cells[1:] if cells[:1] == ["*"] else cells
        if cells:
            rows[cells[0]] = cells
    assert all(rows[name][1] == name for name in settings), table.stdout  # run name, experts column
