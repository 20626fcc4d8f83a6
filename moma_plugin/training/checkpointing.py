"""Checkpoints in Megatron-LM's layout, with everything an exact resume needs.

    <save>/latest_checkpointed_iteration.txt          the newest complete iteration, e.g. "100"
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt one file per tensor-parallel rank

This is Megatron-LM's ``--ckpt-format torch`` layout and key names (``model``, ``optimizer``,
``opt_param_scheduler``, ``rng_state``, ``iteration``, ``args``, ``checkpoint_version``,
``num_floating_point_operations_so_far``), plus ``moma`` (sampler position, consumed tokens, elapsed
time). It is written with ``torch.save`` per rank rather than megatron-core's ``dist_checkpointing``:
the optimizer here is a plain torch one without Megatron's sharded state dicts, and
``dist_checkpointing.save`` stalled in two-process gloo runs on CPU.

Nothing is lost on a crash: a checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed once every
rank has finished; the tracker file is replaced atomically afterwards, so it always names a complete
checkpoint.
"""

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"
# Arguments that must match between a checkpoint and the run that loads it: they shape the model.
ARCHITECTURE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "moma_experts", "moma_modalities", "normalization", "disable_bias_linear",
    "untie_embeddings_and_output_weights", "tensor_model_parallel_size", "moma_post_norm",
    "mod_interval", "mod_start_layer",
)
# Defaults of architecture arguments added after a checkpoint was written (older checkpoints lack them).
ARCHITECTURE_DEFAULTS = {"mod_interval": 0, "mod_start_layer": 0}


def iteration_dir(save: str, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def rank_file(directory: Path, tp_rank: int) -> Path:
    return directory / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


def read_tracker(load: str) -> Optional[int]:
    """The iteration named by ``latest_checkpointed_iteration.txt``, or None without one."""
    tracker = Path(load) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}, not an iteration number; point --load at a "
                         "Megatron checkpoint directory or delete the file.")
    return int(text)


def rng_state() -> Dict[str, Any]:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]):
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(save: str, iteration: int, state: Dict[str, Any], tp_rank: int,
                    writes: bool) -> Path:
    """Writes this rank's ``state`` (if ``writes``: the first data-parallel rank of each TP rank)
    and publishes the checkpoint. Every rank must call it."""
    final = iteration_dir(save, iteration)
    staging = final.with_name(final.name + ".tmp")
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if first:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    if writes:
        path = rank_file(staging, tp_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    _barrier()
    if first:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tracker = Path(save) / TRACKER
        tmp = tracker.with_name(TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, tracker)
    _barrier()
    return final


def load_checkpoint(load: str, tp_rank: int, iteration: Optional[int] = None) -> Dict[str, Any]:
    """This TP rank's state from the newest (or the given) iteration under ``load``."""
    if iteration is None:
        iteration = read_tracker(load)
        if iteration is None:
            raise FileNotFoundError(
                f"--load {load}: no {TRACKER} there; point --load at a directory a previous run "
                "saved into (its --save), or drop --load to start from scratch.")
    path = rank_file(iteration_dir(load, iteration), tp_rank)
    if not path.exists():
        raise FileNotFoundError(
            f"--load {load}: the tracker names iteration {iteration} but {path} is missing (was the "
            "checkpoint saved with a different --tensor-model-parallel-size?).")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("checkpoint_version") != CHECKPOINT_VERSION or "moma" not in state:
        raise ValueError(f"{path} is not a moma-pretrain checkpoint (version "
                         f"{state.get('checkpoint_version')}); it cannot be resumed exactly.")
    return state


def check_compatible(saved_args: Dict[str, Any], args) -> None:
    """Raises if the checkpoint's model shape differs from this run's flags."""
    differing = [
        f"--{name.replace('_', '-')}: checkpoint "
        f"{saved_args.get(name, ARCHITECTURE_DEFAULTS.get(name))!r}, now {getattr(args, name)!r}"
        for name in ARCHITECTURE_ARGS
        if _normalize(saved_args.get(name, ARCHITECTURE_DEFAULTS.get(name)))
        != _normalize(getattr(args, name, None))
    ]
    if differing:
        raise ValueError("the checkpoint was trained with a different model; use the same flags "
                         "(or a new --save directory):\n  " + "\n  ".join(differing))


def _normalize(value):
    return list(value) if isinstance(value, tuple) else value


def load_model_state(model: torch.nn.Module, state_dict: Dict[str, Any]) -> List[str]:
    """Loads model weights strictly, except that auxiliary-router weights may be missing (checkpoints
    written before aux routers existed): those keep their fresh, untrained values. Returns the names of
    the aux-router tensors that were missing."""
    result = model.load_state_dict(state_dict, strict=False)
    aux_missing = [k for k in result.missing_keys if "aux_router" in k]
    other_missing = [k for k in result.missing_keys if "aux_router" not in k]
    if other_missing or result.unexpected_keys:
        raise ValueError(
            "the checkpoint's weights do not fit this model: "
            + (f"missing {other_missing[:5]}" if other_missing else "")
            + (f" unexpected {result.unexpected_keys[:5]}" if result.unexpected_keys else "")
            + "; build the model with the checkpoint's flags.")
    return aux_missing
