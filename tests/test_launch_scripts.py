"""launch_scripts/ without a cluster: the layout check (moma_plugin.slurm) and each script's DRY_RUN,
which prints the resolved command and stops before srun. tests/test_slurm.py runs them on a real SLURM."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moma_plugin.slurm import check_layout

pytestmark = pytest.mark.slow  # conftest.py: the Python 3.12 CI environment deselects it

REPO = Path(__file__).resolve().parents[1]


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    environment.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DRY_RUN="1",
                       LAUNCH_SCRIPTS=str(REPO / "launch_scripts"), **env)
    return subprocess.run(["bash", str(REPO / "launch_scripts" / script), *args], env=environment,
                          capture_output=True, text=True, timeout=60)


def test_the_layout_check():
    assert check_layout(2, 8, tp=2, ep=4, global_batch_size=256, micro_batch_size=2) == (
        "world 16 = 2 node(s) x 8; TP 2 x PP 1 x DP 8; experts over EP 4 (expert-data-parallel 2); "
        "global batch 256 = 16 micro-batch(es) of 2 per rank")
    with pytest.raises(ValueError, match=r"world size 12 .* is not a multiple of TP 8 x PP 1"):
        check_layout(3, 4, tp=8)
    with pytest.raises(ValueError, match=r"EP 3 does not divide the data-parallel size 4 .* among \[1, 2, 4\]"):
        check_layout(1, 4, ep=3)
    with pytest.raises(ValueError, match=r"--global-batch-size 10 is not a multiple of --micro-batch-size 2 x DP 4"):
        check_layout(1, 4, global_batch_size=10, micro_batch_size=2)


def test_the_pretrain_script_prints_its_command_and_checks_the_layout():
    proc = dry_run("moma_pretrain.sbatch", "--train-iters", "3", SLURM_NTASKS="2", GPUS_PER_NODE="4", EP="2",
                   GLOBAL_BATCH_SIZE="16", MASTER_ADDR="node1")
    assert proc.returncode == 0, proc.stderr
    assert "layout: world 8 = 2 node(s) x 4; TP 1 x PP 1 x DP 8; experts over EP 2" in proc.stdout
    assert ("moma-torchrun --nnodes 2 --nproc-per-node 4 --master-addr node1 --master-port 20000 -m "
            "moma_plugin.pretrain --save ") in proc.stdout
    assert "--expert-model-parallel-size 2 --global-batch-size 16 --train-iters 3" in proc.stdout
    bad = dry_run("moma_pretrain.sbatch", GPUS_PER_NODE="3", EP="2")
    assert bad.returncode == 2 and "EP 2 does not divide the data-parallel size 3" in bad.stderr
    assert "moma-torchrun" not in bad.stdout  # stopped before anything runs


def test_the_sweep_gives_each_array_task_its_experts():
    for task, experts in enumerate(["dense", "8x", "1t1i", "4t4i"]):
        proc = dry_run("sweep.sbatch", SLURM_ARRAY_TASK_ID=str(task), GPUS_PER_NODE="2", SWEEP_DIR="sw")
        assert proc.returncode == 0, proc.stderr
        assert f"--save sw/{experts}/checkpoints --moma-experts {experts} --run-dir sw/{experts}" in proc.stdout
    beyond = dry_run("sweep.sbatch", SLURM_ARRAY_TASK_ID="4")
    assert beyond.returncode == 2 and "submit --array=0-3" in beyond.stderr


def test_the_megatron_lm_script_prints_its_command():
    proc = dry_run("megatron_lm.sbatch", "--num-layers", "2", MEGATRON_LM="/opt/Megatron-LM", GLOBAL_BATCH_SIZE="16",
                   TP="2", SAVE="/ckpt")
    assert proc.returncode == 0, proc.stderr
    assert ("torchrun --nnodes 1 --nproc-per-node 8 --master-addr localhost --master-port 20000 pretrain_gpt.py "
            "--spec moma_plugin moma_layer_spec --tensor-model-parallel-size 2") in proc.stdout
    assert "--save /ckpt --load /ckpt --ckpt-format torch --exit-signal-handler --num-layers 2" in proc.stdout
    missing = dry_run("megatron_lm.sbatch", GLOBAL_BATCH_SIZE="16")
    assert missing.returncode != 0 and "set MEGATRON_LM" in missing.stderr


# docs/SLURM.md's commands, as written there (tests/test_docs.py checks they are in this file)
DOC_COMMANDS = [
    "DRY_RUN=1 SLURM_NTASKS=2 GPUS_PER_NODE=8 EP=4 GLOBAL_BATCH_SIZE=256 bash launch_scripts/moma_pretrain.sbatch",
    "DRY_RUN=1 SLURM_ARRAY_TASK_ID=2 bash launch_scripts/sweep.sbatch --config examples/configs/tiny_cpu.yaml",
]


@pytest.mark.parametrize("command", DOC_COMMANDS)
def test_the_commands_of_the_slurm_docs(command):
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["bash", "-e", "-c", command], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "layout: world" in proc.stdout, proc.stderr
    if "moma_pretrain" in command:  # what the document says it prints
        assert ("layout: world 16 = 2 node(s) x 8; TP 1 x PP 1 x DP 16; experts over EP 4 (expert-data-parallel "
                "4); global batch 256 = 16 micro-batch(es) of 1 per rank") in proc.stdout
    else:
        assert "--moma-experts 1t1i --run-dir runs/sweep/1t1i" in proc.stdout
