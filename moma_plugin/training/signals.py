"""SIGTERM and Ctrl-C during a run: save, then stop cleanly.

SLURM sends SIGTERM before preemption and at the time limit (``--signal=TERM@120`` gives two minutes);
torchrun forwards the SIGTERM (or SIGINT) it receives to every worker. The first SIGTERM or SIGINT asks
the run to stop: the loop finishes the current iteration, saves, and exits (status 0 after SIGTERM, 130
after SIGINT). After the last iteration it ends whatever remains once the final checkpoint is saved
(evaluation, plot). A second Ctrl-C, more than a second after the first (torchrun forwards the terminal's
Ctrl-C to workers that got it already), stops at once without saving, and says so.
"""

import signal
import sys
import time
from typing import Optional


class StopRequest:
    """Installs SIGTERM and SIGINT handlers for its lifetime (``with StopRequest(tool) as stop:``);
    ``stop.signal`` is the name of the first signal received, or None."""

    SECOND_CTRL_C_AFTER_S = 1.0

    def __init__(self, tool: str = "moma-pretrain", announce: bool = True):
        self.tool, self.announce = tool, announce
        self.signal: Optional[str] = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (a test thread): no handler
                pass
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    @property
    def received(self) -> bool:
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        return 130 if self.signal == "SIGINT" else 0

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = name, now
            if self.announce:
                print(f"{self.tool}: received {name}: saving a checkpoint at the end of this iteration, "
                      "then stopping" + (" (Ctrl-C again to stop at once without saving)"
                                         if name == "SIGINT" else ""), file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and now - self._first_at > self.SECOND_CTRL_C_AFTER_S:
            raise KeyboardInterrupt
