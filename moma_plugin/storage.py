"""Writing files so that a crash, a kill or a full disk never leaves a half-written result in place.

Every result this project publishes (checkpoints, datasets, tracker files) is written under a temporary
name, flushed to stable storage (``fsync`` of the files and of the directories that hold them), then
renamed into place: a rename within one file system is atomic, so a reader sees the old file or the new
one, never a mixture. A directory that already exists is swapped with its replacement in one atomic
step where the file system can (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs); elsewhere
(NFS, Lustre, macOS) the old directory is first renamed aside to ``<name>.replaced`` and
``recover_replaced`` puts it back if a crash came between the two renames.
"""

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]
REPLACED_SUFFIX = ".replaced"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_path(path: PathLike):
    """Flushes a file's or a directory's contents (a directory: its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on directories; the data is then theirs
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: PathLike):
    """fsync of every file and directory under ``root`` (directories after their contents)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def atomic_write_text(path: PathLike, text: str):
    """Replaces ``path`` with ``text`` atomically: readers see the old or the new contents."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def sha256_file(path: PathLike, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: PathLike, blocks: int = 64, block_bytes: int = 64 << 10) -> str:
    """A fingerprint of a large file read in ``blocks`` evenly spaced blocks, plus its size: finds a
    file swapped for another or truncated in O(blocks) reads, not every flipped bit."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, (size - block_bytes) * i // max(blocks - 1, 1)))
            digest.update(f.read(block_bytes))
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process of this PID runs on this host (the owner of a lock or a temporary file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is "no space left" / "quota exceeded"."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(path: PathLike) -> str:
    return f"no space left on {free_space_of(path)}"


def free_space_of(path: PathLike) -> str:
    """'<path> (<free> free of <total>)' for the file system holding ``path``."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return str(path)
    return f"{path} ({_human_bytes(usage.free)} free of {_human_bytes(usage.total)})"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- replacing a directory ------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
    except (OSError, AttributeError):  # glibc before 2.28, musl
        _renameat2 = None


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Atomically swaps two existing paths; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(staging: PathLike, final: PathLike, exchange: Optional[bool] = None):
    """Publishes the complete directory ``staging`` as ``final``, replacing any ``final`` so that at
    every moment either the old or the new directory is complete under ``final`` or, between the two
    renames of the fallback, under ``final.replaced`` (see ``recover_replaced``). ``exchange=False``
    forces the fallback (tests)."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    if not final.exists():
        os.replace(staging, final)
        fsync_path(final.parent)
        return
    if exchange is not False and exchange_paths(staging, final):
        fsync_path(final.parent)
        shutil.rmtree(staging)  # now the old directory
        return
    aside = final.with_name(final.name + REPLACED_SUFFIX)
    if aside.exists():  # left by an earlier publish that completed both renames: garbage
        shutil.rmtree(aside)
    os.replace(final, aside)
    fsync_path(final.parent)
    os.replace(staging, final)
    fsync_path(final.parent)
    shutil.rmtree(aside)


def recover_replaced(final: PathLike) -> bool:
    """Puts back ``final`` from ``final.replaced`` when a crash came between the fallback's two
    renames; removes a stale ``final.replaced`` otherwise. True when it restored ``final``."""
    final = Path(final)
    aside = final.with_name(final.name + REPLACED_SUFFIX)
    if not aside.exists():
        return False
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        return False
    os.replace(aside, final)
    fsync_path(final.parent)
    return True


def remove_dir(path: PathLike):
    """Deletes a directory so that a crash midway never leaves a partial one under its name: it is
    renamed to a hidden ``.deleting`` name first."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)
