"""What the benchmarks share: Markdown tables for their output (the form benchmarks/README.md quotes), the
one-process Megatron setup, and the revision of the code they measured."""

import os
import socket
import subprocess
from pathlib import Path
from typing import List, Sequence


def init_megatron_single_process():
    """One-process gloo group and tensor-parallel size 1, as tests/conftest.py sets up."""
    import torch
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def source_revision():
    """The git revision of the imported moma_plugin's checkout (and whether it has local changes)."""
    import moma_plugin

    where = Path(moma_plugin.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git revision unknown"
    return f"git {head}{' + local changes' if dirty else ''}" if head else "not a git checkout"


def print_markdown_table(header: Sequence[str], rows: List[Sequence[str]]):
    """A Markdown table, each column as wide as its widest cell, between blank lines."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()
