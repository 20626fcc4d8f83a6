"""Test harness: one gloo process group (world size 1) for the in-process tests, a `gpu` marker, and a
launcher for multi-process tests."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as torch_mp

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(function, args, nprocs: int = 2, timeout_s: float = 180, what: str = "the two ranks"):
    """Runs ``function(rank, *args)`` in ``nprocs`` spawned processes. A rank's exception is re-raised
    here (ending the others); ranks still running after ``timeout_s`` are killed and the test fails."""
    context = torch_mp.spawn(function, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{what} did not finish within {timeout_s} s")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron parallel state with tensor-parallel size 1 over a one-process gloo group."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
