"""Attacks on the promise that no checkpoint is lost or silently corrupted: kills at every moment of a
publish, two writers on one directory, a missing or garbled tracker, flipped bytes, signals after the
last iteration, a held-out split too small, a full disk, and divergence (non-finite loss)."""

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moma_plugin.training import checkpointing, loop, step

from .test_pretrain import REPO, TINY, read_jsonl, run_cli

FAST = [*TINY, "--eval-interval", "100000", "--log-interval", "1"]


# -- 1. replacing a checkpoint: a kill at any moment leaves a complete one under the tracker --------
def _state(marker: float):
    return {"checkpoint_version": checkpointing.CHECKPOINT_VERSION, "iteration": 5, "args": {},
            "moma": {}, "payload": torch.full((4096,), marker)}


def _save_killed_at(save: str, kill_at: int, exchange: bool, iteration: int):
    """Child process: saves ``iteration`` (payload 2.0) over a directory holding iteration 5 and dies
    (os._exit, as kill -9 would) just before its ``kill_at``-th file-system operation."""
    import moma_plugin

    count = {"n": 0}

    def lethal(function):
        def wrapper(*args, **kwargs):
            count["n"] += 1
            if count["n"] == kill_at:
                os._exit(9)
            return function(*args, **kwargs)
        return wrapper

    for module, name in ((os, "replace"), (os, "rename"), (os, "unlink"), (os, "fsync"),
                         (os, "mkdir"), (shutil, "rmtree")):
        setattr(module, name, lethal(getattr(module, name)))
    try:
        from moma_plugin import storage
    except ImportError:  # code from before moma_plugin.storage
        storage = None
    if storage is not None:
        storage.exchange_paths = lethal(storage.exchange_paths) if exchange else (lambda a, b: False)
    del moma_plugin
    # The parent's process group (sockets, threads) is not the child's to use: save as one process.
    checkpointing._distributed = lambda: False
    checkpointing.save_checkpoint(save, iteration, _state(2.0), 0, writes=True)
    os._exit(0)


@pytest.mark.parametrize("iteration, exchange", [(5, True), (5, False), (6, True)],
                         ids=["replace-by-exchange", "replace-by-rename-aside", "new-iteration"])
def test_a_kill_at_any_moment_of_a_save_leaves_the_tracker_naming_a_complete_checkpoint(
        tmp_path, iteration, exchange):
    original = tmp_path / "original"
    checkpointing.save_checkpoint(str(original), 5, _state(1.0), 0, writes=True)
    context = multiprocessing.get_context("fork")
    outcomes = []
    for kill_at in range(1, 80):
        save = tmp_path / f"kill{kill_at}"
        shutil.copytree(original, save)
        child = context.Process(target=_save_killed_at, args=(str(save), kill_at, exchange, iteration))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            pytest.fail(f"the saving child hung (kill point {kill_at})")
        found = checkpointing.find_checkpoint(save, 0)
        # The tracker names a complete checkpoint, as it is (no fallback, no rebuilt tracker): the old
        # one or the new one.
        assert not found.tracker_stale and not any("could not be used" in n for n in found.notes), found.notes
        marker = float(found.state["payload"][0])
        assert (found.iteration, marker) in ((5, 1.0), (iteration, 2.0)), (kill_at, found.iteration, marker)
        assert torch.equal(found.state["payload"], _state(marker)["payload"])
        outcomes.append(marker)
        # and the next writer puts the directory right: its save publishes, the next load gets it
        checkpointing.tidy(save)
        checkpointing.save_checkpoint(str(save), iteration, _state(3.0), 0, writes=True)
        assert float(checkpointing.load_checkpoint(str(save), 0)["payload"][0]) == 3.0
        if child.exitcode == 0:
            break
    assert outcomes[0] == 1.0 and outcomes[-1] == 2.0 and len(outcomes) > 4, outcomes


# -- 2. one writer per directory -----------------------------------------------------------------------
def _wait_for(proc, text: str, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s"
    raise AssertionError(f"process ended before {text!r}:\n{''.join(lines)}\n{proc.stderr.read()}")


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    command = [*FAST, "--train-iters", "100000", "--run-dir", str(run_dir)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "moma_plugin.pretrain", *command], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(first, "iteration      2/")
        # A requeued job while the old one still runs. (--exit-interval: ends fast if it were let in.)
        second = run_cli([*command, "--exit-interval", "1"])
        assert second.returncode != 0
        assert "is in use by another run" in second.stderr, second.stderr[-2000:]
        assert f"PID {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    third = run_cli([*command, "--exit-interval", "2"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert "which is no longer running" in third.stdout and f"PID {first.pid}" in third.stdout


# -- 3. and 4. missing or garbled trackers, damaged checkpoints ----------------------------------------
@pytest.fixture
def four_iterations(megatron_single_process, tmp_path):
    """A run stopped after iteration 4 with checkpoints of iterations 2 and 4."""
    common = [*FAST, "--train-iters", "8", "--save-interval", "2", "--run-dir", str(tmp_path / "run")]
    first = loop.pretrain([*common, "--exit-interval", "4"])
    assert first.status == "exit-interval" and first.iteration == 4
    return common, tmp_path / "run" / "checkpoints"


@pytest.mark.parametrize("tracker", [None, "", "garbage\n"], ids=["missing", "empty", "garbage"])
def test_a_missing_or_garbled_tracker_is_rebuilt_from_the_newest_checkpoint(four_iterations, capsys,
                                                                            tracker):
    common, save = four_iterations
    before = {p: p.stat().st_mtime_ns for p in save.glob("iter_*/mp_rank_00/*.pt")}
    assert len(before) == 2
    path = save / checkpointing.TRACKER
    path.unlink()
    if tracker is not None:
        path.write_text(tracker)
    result = loop.pretrain(common)  # the same command again: never a fresh start over the old ones
    out = capsys.readouterr().out
    assert sorted(result.train_losses) == [5, 6, 7, 8], out
    assert f"resumed from {save / 'iter_0000004'} at iteration 4" in out
    assert f"rewrote {path}: iteration 4" in out
    assert checkpointing.read_tracker(save) == 8
    for path, mtime in before.items():  # iterations 2 and 4 untouched
        assert path.stat().st_mtime_ns == mtime, path


def _flip_bytes(path: Path, count: int = 16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_newest_checkpoint_are_found_and_the_intact_one_is_taken(four_iterations,
                                                                                       capsys):
    common, save = four_iterations
    damaged = save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    _flip_bytes(damaged)
    result = loop.pretrain(common)
    out = capsys.readouterr().out
    assert f"{damaged} does not match its SHA-256" in out
    assert "taking the newest intact one instead: iteration 2" in out
    assert sorted(result.train_losses) == [3, 4, 5, 6, 7, 8]


def test_truncated_and_missing_checkpoint_files_are_named(four_iterations):
    _, save = four_iterations
    newest = save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    found = checkpointing.find_checkpoint(save, 0)
    assert found.iteration == 2 and any("(truncated)" in note and str(newest) in note
                                        for note in found.notes)
    shutil.rmtree(save / "iter_0000002")
    with pytest.raises(SystemExit, match="no complete, intact checkpoint there"):
        checkpointing.find_checkpoint(save, 0)
    # --ckpt-step names the one asked for, and says nothing about tensor parallelism
    with pytest.raises(SystemExit, match="--ckpt-step 6: .*iter_0000006 is missing") as error:
        checkpointing.find_checkpoint(save, 0, iteration=6)
    assert "tensor" not in str(error.value)


def test_a_rank_file_missing_for_another_tensor_parallel_size_says_so(four_iterations):
    _, save = four_iterations
    with pytest.raises(SystemExit, match="holds 1 tensor-parallel shard.*--tensor-model-parallel-size 2"):
        checkpointing.find_checkpoint(save, 1, tp_size=2)


# -- 5. signals after the last iteration, Ctrl-C, torchrun ---------------------------------------------
SIGNAL_DURING = """
import os, signal, sys
from moma_plugin.training import checkpointing, loop
import torch
where, name = sys.argv[1], sys.argv[2]
owner = {"save_checkpoint": checkpointing, "destroy_process_group": torch.distributed}.get(where, loop)
real = getattr(owner, where)
def with_signal(*args, **kwargs):
    os.kill(os.getpid(), getattr(signal, name))
    return real(*args, **kwargs)
setattr(owner, where, with_signal)
loop.main(sys.argv[3:])
"""


@pytest.mark.parametrize("where, name, status", [
    ("save_checkpoint", "SIGTERM", 0), ("evaluate", "SIGTERM", 0), ("_plot", "SIGTERM", 0),
    ("evaluate", "SIGINT", 130), ("_plot", "SIGINT", 130),
    ("destroy_process_group", "SIGTERM", 0), ("destroy_process_group", "SIGINT", 130),  # the teardown
])
@pytest.mark.slow
def test_a_signal_after_the_last_iteration_still_ends_with_the_final_checkpoint(tmp_path, where, name,
                                                                               status):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING, where, name, *FAST, "--train-iters", "3",
                           "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert checkpointing.read_tracker(run_dir / "checkpoints") == 3
    assert checkpointing.load_checkpoint(str(run_dir / "checkpoints"), 0)["iteration"] == 3
    if where != "destroy_process_group":  # during the teardown it is only remembered
        assert f"received {name}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_sigterm_during_the_set_up_stops_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING, "setup_parallel", "SIGTERM", *FAST,
                           "--train-iters", "3", "--run-dir", str(run_dir)], cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "received SIGTERM before the first step: nothing new to save" in proc.stdout
    assert "iteration      1/" not in proc.stdout


@pytest.mark.slow
def test_sigterm_to_moma_torchrun_exits_0_after_the_workers_saved_on_every_node(tmp_path):
    """Two launchers (two "nodes" of one worker each, c10d rendezvous on this host), as SLURM starts
    them: SIGTERM to both, as preemption does; each exits 0 once its node's worker reports the save."""
    from .conftest import free_port

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    launcher = Path(sys.executable).parent / "moma-torchrun"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
    command = ["-m", "moma_plugin.pretrain", *FAST, "--micro-batch-size", "2", "--train-iters", "100000",
               "--run-dir", str(run_dir)]
    nodes = [subprocess.Popen([str(launcher), *rendezvous, "--node-rank", str(rank), *command], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        _wait_for(nodes[0], "iteration      2/")
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    saved = checkpointing.read_tracker(run_dir / "checkpoints")
    assert saved is not None and saved >= 2
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
        assert f"the workers stopped on SIGTERM with iteration {saved} saved in" in out


# -- 6. the held-out split is checked before training; the checkpoint is saved before evaluating -------
def test_a_held_out_split_too_small_is_refused_before_any_training(megatron_single_process, tmp_path,
                                                                   monkeypatch):
    steps = []
    real = step.forward_loss
    monkeypatch.setattr(step, "forward_loss", lambda model, batch: steps.append(1) or real(model, batch))
    with pytest.raises(SystemExit, match="the held-out split has 1 samples, fewer than one evaluation step of 4"):
        loop.pretrain([*TINY, "--valid-fraction", "0.002", "--train-iters", "4", "--eval-interval", "2",
                       "--run-dir", str(tmp_path)])
    assert steps == []


def test_the_checkpoint_of_an_evaluation_iteration_is_saved_before_evaluating(megatron_single_process,
                                                                              tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.pretrain([*TINY, "--train-iters", "6", "--eval-interval", "2", "--save-interval", "2",
                       "--run-dir", str(tmp_path)])
    assert checkpointing.read_tracker(tmp_path / "checkpoints") == 2


# -- a full disk ------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system (tmpfs), where mounting is allowed (root in a sandbox)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_checkpoint_disk_stops_the_run_with_a_message_and_keeps_the_last_checkpoint(small_disk,
                                                                                           tmp_path):
    proc = run_cli([*FAST, "--train-iters", "4", "--run-dir", str(tmp_path / "run"),
                    "--save", str(small_disk / "checkpoints"), "--save-interval", "2"])
    assert proc.returncode != 0
    assert f"no space left on {small_disk}" in proc.stderr, proc.stderr[-2000:]
    assert "was not saved" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((small_disk / "checkpoints").glob("*.tmp"))  # nothing half-written is left


@pytest.mark.slow
def test_a_full_run_directory_does_not_stop_a_run_whose_checkpoint_disk_has_room(small_disk, tmp_path):
    run_dir = small_disk / "run"
    run_dir.mkdir()
    filler = small_disk / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:
        pass
    proc = run_cli([*FAST, "--train-iters", "3", "--run-dir", str(run_dir),
                    "--save", str(tmp_path / "checkpoints"), "--no-progress-bar"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"cannot write metrics to {run_dir}" in proc.stderr and "no space left on" in proc.stderr
    assert checkpointing.read_tracker(tmp_path / "checkpoints") == 3


def test_a_disk_full_error_is_recognised_through_torchs_runtime_error(tmp_path, monkeypatch):
    """Without a small disk to fill: torch.save reports ENOSPC as a RuntimeError whose context is the
    OSError; the save is refused on every rank with the message, nothing published."""
    import errno

    def full(state, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(checkpointing.torch, "save", full)
    with pytest.raises(SystemExit, match=f"no space left on {tmp_path}.*Iteration 5 was not saved"):
        checkpointing.save_checkpoint(str(tmp_path), 5, _state(1.0), 0, writes=True)
    assert list(tmp_path.iterdir()) == []


# -- 8. divergence: the diverged state is not saved; resuming can change the schedule ------------------
def test_a_divergence_is_not_saved_and_resuming_rolls_back_with_a_new_learning_rate(
        megatron_single_process, tmp_path, monkeypatch, capsys):
    common = [*FAST, "--train-iters", "12", "--save-interval", "3", "--run-dir", str(tmp_path)]
    real_forward, real_collate = step.forward_loss, loop.collate
    calls, batches = {"n": 0}, []

    def diverging(model, batch):
        calls["n"] += 1
        loss = real_forward(model, batch)
        return loss * 50 if calls["n"] in (4, 5) else loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(step, "forward_loss", diverging)
    monkeypatch.setattr(loop, "collate", lambda items: batches.append(real_collate(items)) or batches[-1])
    result = loop.pretrain(common)
    err = capsys.readouterr().err
    save = tmp_path / "checkpoints"
    assert result.status == "nan" and result.iteration == 5
    assert checkpointing.saved_iterations(save) == [3]  # iteration 5's diverged weights were not saved
    assert checkpointing.read_tracker(save) == 3
    assert "non-finite loss at iteration 6" in err and "iteration 3" in err
    assert "--override-opt_param-scheduler" in err
    failed_batch = batches[5]["tokens"]
    assert json.loads((save / "nan_stop.json").read_text())["failed_iteration"] == 6

    # A lower --lr alone is refused: which value wins must be said.
    monkeypatch.setattr(step, "forward_loss", real_forward)
    with pytest.raises(SystemExit, match=r"--lr 0.0015 \(checkpoint: 0.003\).*--override-opt_param"):
        loop.pretrain([*common, "--lr", "1.5e-3"])
    batches.clear()
    resumed = loop.pretrain([*common, "--lr", "1.5e-3", "--override-opt_param-scheduler"])
    out = capsys.readouterr().out
    assert resumed.status == "completed" and sorted(resumed.train_losses) == list(range(4, 13))
    assert "continues from that step" in out
    assert torch.equal(batches[0]["tokens"], failed_batch)  # the data goes on from the failed step
    lrs = {r["iteration"]: r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")
           if r["kind"] == "train" and r["iteration"] >= 4}
    peak, floor = 1.5e-3, 1.5e-5  # the new schedule: warm-up 1 iteration, linear decay over 12
    assert lrs[4] == pytest.approx(floor + (peak - floor) * (12 - 4) / (12 - 1))
    assert not (save / "nan_stop.json").exists()  # incorporated in the next checkpoint


def test_the_checkpoint_schedule_can_win_and_run_json_says_so(megatron_single_process, tmp_path,
                                                              capsys):
    common = [*FAST, "--train-iters", "6", "--run-dir", str(tmp_path)]
    loop.pretrain([*common, "--exit-interval", "2"])
    loop.pretrain([*common, "--lr", "1e-2", "--use-checkpoint-opt_param-scheduler"])
    assert "using the checkpoint's values instead of --lr 0.01 (checkpoint: 0.003)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.json").read_text())["args"]["lr"] == 0.003


def test_resuming_a_finished_run_says_it_is_finished(megatron_single_process, tmp_path, capsys):
    common = [*FAST, "--train-iters", "2", "--run-dir", str(tmp_path)]
    loop.pretrain(common)
    capsys.readouterr()
    again = loop.pretrain(common)
    out = capsys.readouterr().out
    assert again.status == "finished" and again.train_losses == {}
    assert "is finished" in out and "held-out loss" not in out


def test_keep_last_deletes_old_checkpoints_but_never_the_newest(megatron_single_process, tmp_path):
    loop.pretrain([*FAST, "--train-iters", "6", "--save-interval", "1", "--keep-last", "2",
                   "--run-dir", str(tmp_path)])
    assert checkpointing.saved_iterations(tmp_path / "checkpoints") == [5, 6]
    assert checkpointing.read_tracker(tmp_path / "checkpoints") == 6


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(megatron_single_process, tmp_path,
                                                                 capsys):
    """Rolling back with --ckpt-step: the checkpoints of the abandoned future are kept under another
    name, so that neither --keep-last nor a fallback ever mixes them with the new branch."""
    common = [*FAST, "--train-iters", "6", "--save-interval", "2", "--keep-last", "2",
              "--run-dir", str(tmp_path)]
    loop.pretrain(common)
    save = tmp_path / "checkpoints"
    assert checkpointing.saved_iterations(save) == [4, 6]
    resumed = loop.pretrain([*common, "--ckpt-step", "4", "--save-interval", "1"])
    assert sorted(resumed.train_losses) == [5, 6]
    assert "moved the checkpoints newer than iteration 4 aside" in capsys.readouterr().out
    assert checkpointing.saved_iterations(save) == [5, 6]  # --keep-last 2 of the new branch
    assert len(list(save.glob("iter_0000006.abandoned-*"))) == 1


def test_the_lock_without_flock_takes_over_only_a_dead_local_holder(tmp_path, monkeypatch):
    """File systems without flock: the lock file is created exclusively; a holder on this host whose
    PID is gone is stale, anything else is refused with how to remove the lock."""
    import errno
    import fcntl

    from moma_plugin.training.run_lock import LOCK_FILE, DirectoryLock

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"tool": "moma-pretrain", "host": socket.gethostname(),
                                                  "pid": dead.pid, "started": "yesterday"}))
    with DirectoryLock(tmp_path, "moma-pretrain") as lock:
        assert f"PID {dead.pid}" in lock.note and "gone" in lock.note
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(SystemExit, match=rf"in use by another run: moma-pretrain, host .*PID {os.getpid()}"):
            DirectoryLock(tmp_path, "moma-pretrain").acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "another-node", "pid": 1}))
    with pytest.raises(SystemExit, match=f"cannot be checked; if that run is not running, delete {tmp_path}"):
        DirectoryLock(tmp_path, "moma-pretrain").acquire()


def test_a_deleted_manifest_does_not_turn_verification_off(four_iterations, capsys):
    """A checkpoint written with a manifest and found without one cannot be verified: the newest one
    that can is taken (only checkpoints from before manifests load unverified)."""
    common, save = four_iterations
    (save / "iter_0000004" / "manifest.json").unlink()
    _flip_bytes(save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt")
    result = loop.pretrain(common)
    out = capsys.readouterr().out
    assert "iter_0000004/manifest.json is missing (it was written with this checkpoint)" in out
    assert sorted(result.train_losses) == [3, 4, 5, 6, 7, 8]


def test_a_manifest_that_disagrees_with_its_checkpoint_is_damaged(four_iterations):
    _, save = four_iterations
    manifest = save / "iter_0000004" / "manifest.json"
    record = json.loads(manifest.read_text())
    record["args"]["ffn_hidden_size"] += 1
    manifest.write_text(json.dumps(record))
    found = checkpointing.find_checkpoint(save, 0)
    assert found.iteration == 2 and any("disagrees with" in note for note in found.notes)


def _fake_checkpoint(save: Path, iteration: int, norm):
    directory = checkpointing.iteration_dir(save, iteration)
    (directory / "mp_rank_00").mkdir(parents=True)
    (directory / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"x")
    (directory / "manifest.json").write_text(json.dumps({
        "files": {"mp_rank_00/model_optim_rng.pt": {"bytes": 1, "sha256": "0"}}, "args": {},
        "parameter_norm": norm, "parameters_finite": norm == norm and norm != float("inf")}))


def test_the_rollback_skips_checkpoints_whose_weights_had_diverged_already(tmp_path):
    from moma_plugin.training.resume import rollback_candidates

    for iteration, norm in ((100, 40.0), (200, 55.0), (300, 70.0), (400, 3.0e4), (500, 80.0)):
        _fake_checkpoint(tmp_path, iteration, norm)
    # 400 jumped by orders of magnitude: it and everything after it are left out
    assert rollback_candidates(tmp_path, 600) == [(300, 70.0), (200, 55.0), (100, 40.0)]
    assert rollback_candidates(tmp_path, 250) == [(200, 55.0), (100, 40.0)]


def test_resuming_refuses_data_that_changed_since_the_checkpoint(megatron_single_process, tmp_path):
    from moma_plugin.data.preprocess import main as preprocess

    from .test_data_safety import _corpus

    source = _corpus(tmp_path / "corpus", "apple orchard", 120)
    prefix = tmp_path / "data" / "ds"
    preprocess(["--input", str(source), "--output-prefix", str(prefix), "--quiet", "--codebook-size", "16"])
    common = [*FAST, "--train-iters", "4", "--data-path", str(prefix), "--valid-fraction", "0.3",
              "--no-balanced-sampler", "--run-dir", str(tmp_path / "run")]
    loop.pretrain([*common, "--exit-interval", "2"])
    # the same prefix preprocessed again: same vocabulary size, other image codes
    preprocess(["--input", str(source), "--output-prefix", str(prefix), "--quiet", "--codebook-size", "16",
                "--seed", "99"])
    with pytest.raises(SystemExit, match=f"the data of --data-path {prefix} changed since"):
        loop.pretrain(common)
