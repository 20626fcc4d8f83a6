"""``moma-torchrun``: torchrun (same flags) for ``moma-pretrain`` jobs that must survive preemption
cleanly.

torchrun forwards a SIGTERM or SIGINT it receives to the workers, waits ``--shutdown-timeout`` seconds
(default 30) for them, then kills them and exits with an error, whatever the workers did. With
``moma-torchrun`` the workers' answer counts: when they saved a checkpoint on the signal (rank 0 reports
it in a file whose folder is passed in ``MOMA_SIGNAL_REPORT_DIR``), it exits 0 after SIGTERM (130 after
SIGINT), so a SLURM job that is requeued on preemption ends cleanly. In a multi-node job the first
worker of every node reports to its node's launcher. The default shutdown timeout is 300 s here, time
for a large checkpoint to be written; ``--shutdown-timeout`` or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` set it
(torch releases from 2026 on; older ones always wait 30 s, and ``moma-torchrun`` says so).

    moma-torchrun --nproc-per-node 8 -m moma_plugin.pretrain --config my.yaml
"""

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

REPORT_ENV = "MOMA_SIGNAL_REPORT_DIR"
DEFAULT_SHUTDOWN_TIMEOUT_S = "300"


def report_signal_stop(signal_name: Optional[str], iteration: int, checkpoint: Optional[str]):
    """Called by the first worker of each node of a job under moma-torchrun when its run ends (on a
    signal or not: a signal can also reach the launcher after the workers' final save), with the
    checkpoint it ended with (every rank knows whether the save succeeded)."""
    directory = os.environ.get(REPORT_ENV)
    if not directory:
        return
    record = {"signal": signal_name, "iteration": iteration, "checkpoint": checkpoint}
    Path(directory, f"stop-{os.getpid()}.json").write_text(json.dumps(record))


def _reports(directory: str) -> List[dict]:
    out = []
    for path in Path(directory).glob("stop-*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def main(argv: Optional[List[str]] = None):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import main as torchrun

    argv = sys.argv[1:] if argv is None else list(argv)
    if "shutdown_timeout" not in getattr(LaunchConfig, "__dataclass_fields__", {}):
        print("moma-torchrun: warning: this torch's launcher kills the workers 30 s after a signal, "
              "whatever they are doing; a checkpoint that takes longer to save is lost (newer torch "
              "waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT)", file=sys.stderr, flush=True)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S)
    directory = tempfile.mkdtemp(prefix="moma-torchrun-")
    os.environ[REPORT_ENV] = directory
    try:
        torchrun(argv)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        saved = [report for report in _reports(directory) if report.get("checkpoint")]
        if saved:
            report = saved[0]
            print(f"moma-torchrun: the workers stopped on {name} with iteration {report['iteration']} "
                  f"saved in {report['checkpoint']}", file=sys.stderr, flush=True)
            raise SystemExit(130 if name == "SIGINT" else 0) from None
        print(f"moma-torchrun: stopped by {name}; the workers reported no checkpoint saved on it",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + int(e.sigval)) from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
