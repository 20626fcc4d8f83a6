"""Test harness: one gloo process group (world size 1) for the in-process tests, the `gpu` and `slow`
markers, and a launcher for multi-process tests."""

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


# `slow`: multi-process training runs and end-to-end commands, a minute or more of CI each, whose code
# does not depend on the megatron-core line beyond what the rest of the suite covers (the engines,
# DeepSpeed and torch are the same in both CI environments). .ci/run's second environment (Python 3.12,
# megatron-core 0.19) deselects them to stay within CI's time; its first runs everything. Besides the
# tests marked where they are defined, every test of these big shared fixtures is `slow`:
SLOW_FIXTURES = {"pretrain_results",  # test_engines.py: every engine, one and two processes
                 "ep_runs"}  # test_expert_parallel.py: every engine under expert parallelism


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long multi-process runs; deselect with -m 'not slow' (conftest.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
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
