"""One writer per directory: an exclusive lock on a run's ``--save`` (and run) directory for the life of
the run, so that a requeued job cannot write checkpoints beside the job it replaces while that one still
runs.

The lock is ``<dir>/moma.lock``, held with ``flock``: the kernel (or the NFS lock manager) releases it
when its process dies however it dies, so a lock left by a killed run is recognised as stale without
guessing from PIDs or clocks. The file holds who took it (tool, host, PID, SLURM job id, start time) for
the message a second writer gets. Where the file system has no ``flock`` the lock falls back to
creating the file exclusively; a stale one is then taken over only when its holder ran on this host
and its PID is gone, and otherwise the message says how to remove it.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

from ..cli import UsageError
from ..storage import disk_full_message, is_disk_full, pid_alive

LOCK_FILE = "moma.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


def _holder_text(info: dict) -> str:
    parts = [info.get("tool", "a run"), f"host {info.get('host', '?')}", f"PID {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"SLURM job {info['slurm_job_id']}")
    return ", ".join(parts) + f" (started {info.get('started', '?')})"


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class DirectoryLock:
    """``with DirectoryLock(dir, tool):`` holds ``dir/moma.lock`` or raises UsageError naming the
    holder. ``note`` says whether a stale lock was taken over."""

    def __init__(self, directory, tool: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.tool = tool
        self.fd: Optional[int] = None
        self.note: Optional[str] = None

    def info(self) -> dict:
        return {"tool": self.tool, "host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}

    def _held_by(self, info: dict) -> UsageError:
        return UsageError(
            f"{self.directory} is in use by another run: {_holder_text(info)}. Wait for it to end or "
            "stop it, or give this run another directory (--save / --run-dir).")

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._held_by(_read_info(self.path)) from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_FLOCK:
                    return self._acquire_without_flock()
                raise
            # The holder before us may have unlinked the file between our open and our flock: then
            # we locked an orphan and must try again on the file now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_info(self.path)
        if previous:
            self.note = (f"{self.directory} was locked by {_holder_text(previous)}, which is no "
                         "longer running (a killed run); taking the lock over")
        self._write(fd)
        self.fd = fd
        return self

    def _write(self, fd: int):
        """Who holds the lock, for the message of a second writer. Best effort: on a full disk the
        lock (flock) holds all the same."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.info()).encode(), 0)
            os.fsync(fd)
        except OSError:
            pass

    def _acquire_without_flock(self) -> "DirectoryLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_info(self.path)
            stale = info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", 0)))
            if not stale:
                raise UsageError(
                    f"{self.directory} is in use by another run: {_holder_text(info)} (this file "
                    f"system has no flock, so a lock from another host cannot be checked; if that run "
                    f"is not running, delete {self.path}).") from None
            self.note = f"{self.directory} was locked by {_holder_text(info)}, which is gone; taking over"
            fd = os.open(self.path, os.O_RDWR | os.O_TRUNC)
        self._write(fd)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see acquire's inode check
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_directories(stack: ExitStack, directories, parallel, tool: str, checkpoints=None):
    """Rank 0 locks every directory for the life of ``stack`` and tidies ``checkpoints`` (what a killed
    writer left there: ``checkpointing.tidy``); every rank raises if a lock is held or cannot be taken."""
    from .checkpointing import from_rank0, tidy

    error, notes = None, []
    if parallel.is_first:
        try:
            for directory in dict.fromkeys(Path(d).resolve() for d in directories):
                lock = stack.enter_context(DirectoryLock(directory, tool))
                if lock.note:
                    notes.append(lock.note)
            if checkpoints is not None:
                notes += tidy(checkpoints)
        except UsageError as e:
            error = e.message
        except OSError as e:  # a full disk, a file where a directory should be, no permission, ...
            where = Path(e.filename or directory)
            error = (f"cannot lock {where}: {disk_full_message(where)}" if is_disk_full(e) else
                     f"{where} is a file, not a directory; give --save / --run-dir a directory"
                     if where.exists() and not where.is_dir() else
                     f"cannot lock {where} ({e.strerror or e}); give a --save / --run-dir this job "
                     "can write to")
    error = from_rank0(error)
    if error is not None:
        raise UsageError(error)
    for note in notes:
        print(f"note: {note}", flush=True)
