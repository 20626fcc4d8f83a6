"""A real one-node SLURM cluster in a temporary directory, for tests/test_slurm.py: Debian's slurmctld,
slurmd and munge (``.ci/run`` installs them), a generated ``slurm.conf`` on free ports, the daemons it
started stopped by their PIDs at the end."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

from .conftest import free_port

TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")


def missing_tools() -> Optional[str]:
    """Why no cluster can start here (None: it can)."""
    absent = [tool for tool in TOOLS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurmctld slurmd "
                "slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        # Jobs inherit this environment (sbatch exports it): not the rendezvous of pytest's own process
        # groups, which other tests may still hold.
        self.env: Dict[str, str] = {k: v for k, v in os.environ.items()
                                    if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.pids = []

    def start(self, timeout_s: float = 30):
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=local", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            # A requeued job waits out its old credential's lifetime before it starts again (120 s
            # by default): 10 s here, the test's requeue does not wait two minutes.
            "AuthType=auth/munge", "AuthInfo=cred_expire=10", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "ReturnToService=2", "MpiDefault=none", "JobRequeue=1",
            f"NodeName={self.host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)  # its socket's folder (the package's service makes it)
            subprocess.run([_tool("munged"), "--force", "--pid-file", str(self.root / "munged.pid")], check=True)
            self.pids.append(self.root / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_tool(daemon), "-f", str(self.conf)], env=self.env, check=True)
            self.pids.append(self.root / f"{daemon}.pid")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's node never became idle: {state.stdout} {state.stderr}\n"
                           + (self.root / "log" / "slurmctld.log").read_text()[-2000:])

    def stop(self):
        for pid_file in reversed(self.pids):
            try:
                os.kill(int(pid_file.read_text().split()[0]), 15)
            except (OSError, ValueError):
                pass
        time.sleep(1)

    def run(self, *command, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=True, **kwargs)

    def submit(self, *command, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        """The job id of ``sbatch command`` (an array's id for an array job), run in ``cwd``."""
        proc = subprocess.run(["sbatch", "--parsable", *command], env={**self.env, **(env or {})},
                              capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(command)}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as {field: value}."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_array(self, job_id: str, tasks: int, timeout_s: float) -> Dict[int, str]:
        """{task: final state} of array job ``job_id`` once its ``tasks`` tasks have all ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.run("scontrol", "show", "job", "-o", job_id).stdout
            records = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in text.splitlines()]
            states = {int(r["ArrayTaskId"]): r["JobState"] for r in records if r.get("ArrayTaskId", "").isdigit()}
            if len(states) == tasks and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()):
                return states
            time.sleep(0.5)
        raise TimeoutError(f"array job {job_id} not finished after {timeout_s} s:\n{text}")

    def wait(self, job_id: str, timeout_s: float, until=lambda job: job["JobState"] in ("COMPLETED", "FAILED",
                                                                                       "CANCELLED", "TIMEOUT")):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout_s} s")
