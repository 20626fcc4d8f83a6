"""Checkpoints in Megatron-LM's layout, with everything an exact resume needs, that are never lost
or silently corrupted.

    <save>/latest_checkpointed_iteration.txt          the newest complete iteration, e.g. "100"
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt one file per tensor-parallel rank (per
                                                      rank and stage under pipeline parallelism:
                                                      mp_rank_00_001/, as Megatron-LM names them)
    <save>/iter_0000100/manifest.json                 size and SHA-256 of every file, the run's flags
    <save>/iter_0000100/dcp/mp_rank_00/               --use-torch-fsdp2: the weights and Adam moments
                                                      as a sharded torch.distributed.checkpoint
    <save>/iter_0000100/deepspeed/                    --deepspeed: DeepSpeed's own save_checkpoint

This is Megatron-LM's ``--ckpt-format torch`` layout and key names (``model``, ``optimizer``,
``opt_param_scheduler``, ``rng_state``, ``iteration``, ``args``, ``checkpoint_version``,
``num_floating_point_operations_so_far``), plus ``moma`` (sampler position, consumed tokens, elapsed
time). It is written with ``torch.save`` per rank rather than megatron-core's ``dist_checkpointing``:
the optimizer here is a plain torch one without Megatron's sharded state dicts, and
``dist_checkpointing.save`` stalled in two-process gloo runs on CPU.

Guarantees (each tested in tests/test_checkpoint_safety.py by breaking it):
- Publishing: every rank writes and fsyncs its file under ``iter_X.tmp``; rank 0 adds the manifest and
  renames the directory into place (an existing ``iter_X`` is swapped atomically, see
  ``storage.replace_dir``), then replaces the tracker atomically. A kill at any moment leaves the tracker
  naming a complete checkpoint. A failed write (a full disk) on any rank publishes nothing, on every rank.
- Loading verifies each rank's file against the manifest; a damaged or incomplete newest checkpoint is
  reported by file and the newest intact one is taken instead, with a warning. A missing or garbled
  tracker is rebuilt from the newest complete, verified checkpoint (``find_checkpoint``).

The FSDP2 engine keeps the model and optimizer tensors out of the rank file (``model`` is None there,
``optimizer`` holds the parameter groups only): each rank writes its shards into ``dcp/`` (DCP), which
reshards on loading, so a run resumes on another number of ranks. ``full_state`` reads them back into
the torch layout for the engines and tools that want whole tensors (ddp, generation, stage 2,
``moma-convert-checkpoint``).
"""

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import storage
from ..cli import UsageError

CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
_ITERATION_DIR = re.compile(r"iter_(\d{7,})")
# Arguments that must match between a checkpoint and the run that loads it: they shape the model.
ARCHITECTURE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "moma_experts", "moma_modalities", "normalization", "disable_bias_linear",
    "untie_embeddings_and_output_weights", "tensor_model_parallel_size", "moma_post_norm",
    "mod_interval", "mod_start_layer", "pipeline_model_parallel_size", "mot",
)
# Arguments that must match for the data position (the sampler's state) to mean the same samples.
DATA_ARGS = ("seq_length", "max_position_embeddings", "data_path", "valid_fraction", "seed")
# Defaults of architecture arguments added after a checkpoint was written (older checkpoints lack them).
ARCHITECTURE_DEFAULTS = {"mod_interval": 0, "mod_start_layer": 0, "pipeline_model_parallel_size": 1, "mot": ""}


class CheckpointError(UsageError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do."""


def iteration_dir(save, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def rank_name(rank) -> str:
    """The directory of a model-parallel rank's file: ``rank`` is its TP rank, or (TP rank, pipeline
    stage) under pipeline parallelism (``Parallel.model_parallel_rank``)."""
    if isinstance(rank, tuple):
        return f"mp_rank_{rank[0]:02d}_{rank[1]:03d}"
    return f"mp_rank_{rank:02d}"


def rank_file(directory: Path, rank) -> Path:
    return Path(directory) / rank_name(rank) / "model_optim_rng.pt"


DCP_DIR = "dcp"
# Keys of the tensors in a DCP checkpoint: "model/<parameter or buffer name>" and
# "optimizer/<parameter name>/<state key>" (e.g. ".../exp_avg"); flat, so that DCP keeps them as they
# are (names hold dots).
MODEL_PREFIX, OPTIMIZER_PREFIX = "model/", "optimizer/"


def dcp_dir(directory: Path, tp_rank: int) -> Path:
    return Path(directory) / DCP_DIR / f"mp_rank_{tp_rank:02d}"


def write_dcp(tensors: Dict[str, torch.Tensor], path: Path, group=None):
    """Every rank of ``group`` writes its shards of ``tensors`` (DTensors: their local shards;
    plain tensors: once) to the DCP directory ``path``; a collective over ``group``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True),
             process_group=group)


def dcp_keys(path: Path) -> Dict[str, Any]:
    """{key: its tensor metadata (``size``, ``properties.dtype``)} of the DCP directory ``path``."""
    import torch.distributed.checkpoint as dcp

    return dict(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def read_dcp(path: Path, targets: Optional[Dict[str, torch.Tensor]] = None, group=None
             ) -> Dict[str, torch.Tensor]:
    """The tensors of the DCP directory ``path``: into ``targets`` (DTensors are filled shard by
    shard, whatever the number of ranks that wrote them; a collective over ``group``), else whole
    tensors read by this process alone."""
    import torch.distributed.checkpoint as dcp

    if targets is None:
        targets = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in dcp_keys(path).items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(targets, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    else:
        dcp.load(targets, storage_reader=dcp.FileSystemReader(str(path)), process_group=group)
    return targets


def split_dcp(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict]]:
    """(model state, {parameter name: its optimizer state}) of ``tensors`` keyed as DCP keeps them."""
    model, optimizer = {}, {}
    for key, value in tensors.items():
        if key.startswith(MODEL_PREFIX):
            model[key[len(MODEL_PREFIX):]] = value
        elif key.startswith(OPTIMIZER_PREFIX):
            name, entry = key[len(OPTIMIZER_PREFIX):].rsplit("/", 1)
            optimizer.setdefault(name, {})[entry] = value
    return model, optimizer


def is_sharded(state: Dict[str, Any]) -> bool:
    """True when the checkpoint's tensors are in its DCP directory (FSDP2), not in ``state``."""
    return state.get("model") is None


def full_state(state: Dict[str, Any], directory: Path, tp_rank: int) -> Dict[str, Any]:
    """``state`` with whole tensors: those of the DCP directory put back into ``model`` and the
    optimizer's ``state`` (numbered as its parameter groups' names), read by this process alone;
    ``state`` itself when it has them already."""
    if not is_sharded(state):
        return state
    path = dcp_dir(directory, tp_rank)
    try:
        model, by_name = split_dcp(read_dcp(path))
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    # An FSDP2 checkpoint under expert parallelism keeps each expert's moments under its own name.
    by_name = stack_expert_entries(by_name, state["optimizer"].get("expert_sources", {}))
    return dict(state, model=model, optimizer=numbered_optimizer_state(state["optimizer"], by_name))


def stack_expert_entries(by_name: Dict[str, Dict], sources: Dict[str, List[str]]) -> Dict[str, Dict]:
    """``by_name`` ({parameter name: its optimizer state}) with the per-expert entries of each stacked
    expert parameter (``sources``: {stacked name: its experts' names, in order}) stacked under the
    stacked name; scalar entries (Adam's ``step``) are taken from the stacked name's own entry or
    from the first expert. Stacked parameters whose experts are not all there are left alone."""
    for stacked, per_expert in sources.items():
        if not all(name in by_name for name in per_expert):
            continue
        entries = [by_name.pop(name) for name in per_expert]
        merged = dict(by_name.get(stacked, {}))
        for key, value in entries[0].items():
            if torch.is_tensor(value) and value.dim():
                merged[key] = torch.stack([e[key] for e in entries])
            else:
                merged.setdefault(key, value)
        by_name[stacked] = merged
    return by_name


def numbered_optimizer_state(optimizer: Dict[str, Any], by_name: Dict[str, Any]) -> Dict[str, Any]:
    """``optimizer`` (a rank file's: parameter groups with ``param_names``) with ``state`` set from
    ``by_name`` ({parameter name: its state}, as ``split_dcp`` returns), numbered as the groups
    number the parameters."""
    numbered = {i: by_name[name] for g in optimizer["param_groups"]
                for name, i in zip(g["param_names"], g["params"]) if name in by_name}
    return dict(optimizer, state=numbered)


def read_tracker(load) -> Optional[int]:
    """The iteration named by ``latest_checkpointed_iteration.txt``, or None without one. Raises
    CheckpointError when the file holds something else (empty, garbage)."""
    tracker = Path(load) / TRACKER
    if not tracker.exists():
        return None
    if tracker.is_dir():
        raise CheckpointError(f"{tracker} is a directory, not a tracker file; remove it")
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tracker} cannot be read ({e})") from None
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(f"{tracker} holds {text[:40]!r}, not an iteration number")
    return int(text)


def write_tracker(save, iteration: int):
    storage.atomic_write_text(Path(save) / TRACKER, str(iteration))


def saved_iterations(save) -> List[int]:
    """Iterations of the ``iter_XXXXXXX`` directories under ``save`` (complete or not), ascending; an
    ``iter_X.replaced`` left by a publish interrupted between its two renames counts for ``iter_X``
    when that is missing. Reads only: putting things right is ``tidy``'s (the lock holder's) job."""
    save = Path(save)
    if not save.is_dir():
        return []
    found = []
    for entry in save.iterdir():
        name = entry.name[: -len(storage.REPLACED_SUFFIX)] if entry.name.endswith(storage.REPLACED_SUFFIX) \
            else entry.name
        match = _ITERATION_DIR.fullmatch(name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(set(found))


def has_checkpoints(directory) -> bool:
    """Whether ``directory`` (None: no) holds a tracker or an iteration directory."""
    return directory is not None and ((Path(directory) / TRACKER).exists() or bool(saved_iterations(directory)))


def checkpoint_dir(save, iteration: int) -> Path:
    """Where iteration ``iteration`` lies: ``iter_X``, or ``iter_X.replaced`` while a publish that was
    interrupted between its renames has not been put right (``tidy``)."""
    final = iteration_dir(save, iteration)
    aside = final.with_name(final.name + storage.REPLACED_SUFFIX)
    return aside if not final.exists() and aside.is_dir() else final


def tidy(save) -> List[str]:
    """What a killed writer left in ``save``, put right by the next writer (rank 0, holding the
    directory's lock): an interrupted publish's ``iter_X.replaced`` back in place, and staging
    (``iter_X.tmp``) and deletion (``.iter_X.deleting-PID``) leftovers removed. Returns notes."""
    save = Path(save)
    if not save.is_dir():
        return []
    notes = []
    for entry in sorted(save.iterdir()):
        if entry.name.endswith(storage.REPLACED_SUFFIX) and entry.is_dir():
            final = entry.with_name(entry.name[: -len(storage.REPLACED_SUFFIX)])
            if storage.recover_replaced(final):
                notes.append(f"put back {final.name} (a save of it was interrupted between its renames)")
        elif (entry.name.endswith(".tmp") and _ITERATION_DIR.fullmatch(entry.name[:-4])) or \
                (entry.name.startswith(".iter_") and ".deleting-" in entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry.name}, left by an interrupted save or deletion")
        elif entry.name.startswith(f".{TRACKER}.tmp-") and entry.is_file():
            entry.unlink(missing_ok=True)
    return notes


def set_aside_newer(save, iteration: int) -> List[str]:
    """Renames the checkpoints in ``save`` newer than ``iteration`` (the one a run resumes from) to
    ``iter_X.abandoned-<time>``: the future of another branch of the run, kept for the user, never
    loaded, replaced or pruned by this one. Returns their new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for newer in (i for i in saved_iterations(save) if i > iteration):
        source = checkpoint_dir(save, newer)
        target = iteration_dir(save, newer).with_name(f"{iteration_dir(save, newer).name}.abandoned-{stamp}")
        os.replace(source, target)
        moved.append(target.name)
    if moved:
        storage.fsync_path(save)
    return moved


def read_manifest(directory: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a checkpoint directory; None for checkpoints written before manifests."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str) for entry in files.values()) \
            or not isinstance(manifest.get("args", {}), dict):
        raise CheckpointError(f"{path} is damaged (not a checkpoint manifest: no list of files with "
                              "their sizes and checksums)")
    return manifest


def incomplete_reason(directory: Path) -> Optional[str]:
    """Why the checkpoint in ``directory`` is incomplete (a file missing or of the wrong size), or
    None when every file the manifest lists is there. Cheap: no file is read."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is missing"
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return str(e)
    if manifest is None:  # older checkpoints: rank 0's file must be there at least
        return None if rank_file(directory, 0).exists() else f"{rank_file(directory, 0)} is missing"
    for name, entry in manifest["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        if path.is_dir():
            return f"{path} is a directory, not a file"
        if size != entry["bytes"]:
            return f"{path} has {size:,} bytes, the manifest says {entry['bytes']:,} (truncated)"
    return None


def damage_reason(directory: Path, tp_rank: int) -> Optional[str]:
    """Why this TP rank's file of the checkpoint does not match its manifest checksum, or None."""
    directory = Path(directory)
    path = rank_file(directory, tp_rank)
    try:
        manifest = read_manifest(directory)
        if manifest is None:
            return None if path.exists() else f"{path} is missing"
        entry = manifest["files"].get(str(path.relative_to(directory)))
        if entry is None:
            return f"{path} is not listed in {directory / MANIFEST}"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} has {size:,} bytes, the manifest says {entry['bytes']:,}"
        if storage.sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its SHA-256 in {directory / MANIFEST} (damaged on disk)"
    except CheckpointError as e:
        return str(e)
    except FileNotFoundError:
        return f"{path} is missing (or vanished while read: is another job writing {directory.parent}?)"
    return None


# -- collectives that also work without a process group ------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _gather(value) -> list:
    if not _distributed():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def from_rank0(value):
    """Rank 0's ``value`` on every rank (a collective; ``value`` itself without a process group)."""
    if not _distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# -- saving -------------------------------------------------------------------------------------------
def _write_rank_file(state: Dict[str, Any], path: Path) -> Tuple[str, int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: torch then reports a full disk as the OSError it is
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return str(path.relative_to(path.parent.parent)), path.stat().st_size, storage.sha256_file(path)


def _write_engine_files(write, staging: Path, iteration: int):
    """Every rank writes its part; then rank 0 returns the (name, bytes, sha256) records of all the
    files of the sub-directory (for the manifest), the others None; a failure's message on any rank."""
    try:
        subdir = write(staging)
    except Exception as e:
        return _failure(f"saving iteration {iteration}", staging, e)
    finally:
        if _distributed():
            torch.distributed.barrier()
    if _rank() != 0:
        return None
    return [(str(path.relative_to(staging)), path.stat().st_size, storage.sha256_file(path))
            for path in sorted((staging / subdir).rglob("*")) if path.is_file()]


def _failure(what: str, path: Path, error: BaseException) -> str:
    if storage.is_disk_full(error):
        return f"{storage.disk_full_message(path)} while writing {path}"
    return f"could not write {path} ({type(error).__name__}: {error}) while {what}"


def save_checkpoint(save, iteration: int, state: Dict[str, Any], tp_rank: int, writes: bool,
                    summary: Optional[Dict[str, Any]] = None, keep_last: Optional[int] = None,
                    extra_files: Optional[Dict[str, str]] = None, engine_files=None) -> Path:
    """Writes this rank's ``state`` (if ``writes``: the first data-parallel rank of each TP rank) and
    publishes the checkpoint with its manifest (``summary``: extra fields for it, e.g. the loss;
    ``extra_files``: {name: text} published inside the checkpoint directory with it; ``engine_files``:
    a callable every rank calls with the staging directory, returning the sub-directory it wrote there
    (DeepSpeed's own checkpoint), whose files the manifest then lists). Every rank must call it. Raises CheckpointError on every rank when any rank's write failed; the previous
    checkpoints and the tracker are then untouched. ``keep_last``: delete all but the newest that many
    checkpoints afterwards."""
    state = dict(state, moma=dict(state.get("moma", {}), has_manifest=True))
    final = iteration_dir(save, iteration)
    staging = final.with_name(final.name + ".tmp")
    error = None
    if _rank() == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as e:
            error = _failure(f"saving iteration {iteration}", staging, e)
    error = from_rank0(error)
    if error is None:
        record = None
        if writes:
            try:
                record = _write_rank_file(state, rank_file(staging, tp_rank))
            except Exception as e:  # torch raises RuntimeError with the OSError as its context
                record = _failure(f"saving iteration {iteration}", rank_file(staging, tp_rank), e)
        records = _gather(record)
        if engine_files is not None and not any(isinstance(r, str) for r in records):
            extra = _gather(_write_engine_files(engine_files, staging, iteration))
            records += [entry for r in extra for entry in (r if isinstance(r, list) else [r])]
        errors = [r for r in records if isinstance(r, str)]
        error = errors[0] if errors else None
        if error is None and _rank() == 0:
            try:
                for name, text in (extra_files or {}).items():
                    (staging / name).write_text(text)
                _publish(save, iteration, staging, [r for r in records if r], state, summary)
            except OSError as e:
                error = _failure(f"publishing iteration {iteration}", final, e)
            else:
                error = _track(save, iteration, keep_last)
        error = from_rank0(error)
    if error is not None:
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if error.startswith(str(iteration_dir(save, iteration))):  # published; only the tracker failed
            raise CheckpointError(error)
        try:
            newest = read_tracker(save)
        except CheckpointError:
            newest = None
        kept = f"the newest complete checkpoint (iteration {newest}) is untouched" if newest is not None \
            else "no earlier checkpoint exists"
        raise CheckpointError(f"{error}. Iteration {iteration} was not saved; {kept}. Free space (moma-"
                              "pretrain's --keep-last N keeps fewer checkpoints) and run the same command "
                              "again.")
    return final


def save_offline(save, iteration: int, states: Dict[int, Dict[str, Any]],
                 summary: Optional[Dict[str, Any]] = None,
                 extra_files: Optional[Dict[str, str]] = None) -> Path:
    """One process writing the states of every TP rank ({tp rank: state}; ``moma-convert-checkpoint``)
    as one checkpoint, published and tracked as ``save_checkpoint`` does."""
    final = iteration_dir(save, iteration)
    staging = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        records = [_write_rank_file(dict(state, moma=dict(state["moma"], has_manifest=True)),
                                    rank_file(staging, tp_rank)) for tp_rank, state in sorted(states.items())]
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        _publish(save, iteration, staging, records, states[0], summary)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{_failure(f'saving iteration {iteration}', staging, e)}; nothing was "
                              "published") from None
    error = _track(save, iteration, None)
    if error is not None:
        raise CheckpointError(error)
    return final


def _track(save, iteration: int, keep_last: Optional[int]) -> Optional[str]:
    """After publishing: the tracker, then --keep-last pruning (a failure there only warns)."""
    try:
        write_tracker(save, iteration)
    except OSError as e:
        return (f"{iteration_dir(save, iteration)} is complete, but {Path(save) / TRACKER} could not be "
                f"updated ({storage.disk_full_message(save) if storage.is_disk_full(e) else e}); the next "
                "start finds it anyway (it rebuilds the tracker)")
    if keep_last:
        try:
            prune(save, keep_last)
        except OSError as e:
            print(f"warning: --keep-last {keep_last}: could not delete old checkpoints in {save} ({e})",
                  flush=True)
    return None


def _publish(save, iteration: int, staging: Path, records, state, summary):
    files = {name: {"bytes": size, "sha256": digest} for name, size, digest in sorted(records)}
    manifest = {"format": "moma_plugin checkpoint", "iteration": iteration, "files": files,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": state.get("args", {}),
                **(summary or {})}
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    storage.replace_dir(staging, iteration_dir(save, iteration))


def prune(save, keep_last: int) -> List[int]:
    """Deletes all but the newest ``keep_last`` complete checkpoints up to the tracked one (never the
    tracked one, never one newer than it); returns the iterations deleted."""
    tracked = read_tracker(save)
    complete = [i for i in saved_iterations(save) if tracked is not None and i <= tracked
                and incomplete_reason(iteration_dir(save, i)) is None]
    doomed = [i for i in complete[:-keep_last] if i != tracked] if keep_last > 0 else []
    for iteration in doomed:
        storage.remove_dir(iteration_dir(save, iteration))
    return doomed


# -- loading ------------------------------------------------------------------------------------------
@dataclass
class Found:
    """A checkpoint chosen for loading, this rank's state, and what the user must be told."""

    iteration: int
    directory: Path
    state: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    tracker_stale: bool = False  # the tracker is missing, garbled or names a damaged checkpoint


def _load_rank_state(directory: Path, tp_rank: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    reason = damage_reason(directory, tp_rank)
    if reason is not None:
        return None, reason
    path = rank_file(directory, tp_rank)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: every kind of damage
        return None, f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION \
            or "moma" not in state:
        version = state.get("checkpoint_version") if isinstance(state, dict) else None
        return None, (f"{path} is not a moma-pretrain checkpoint (version {version}); it cannot be "
                      "resumed exactly")
    if state["moma"].get("has_manifest") and read_manifest(directory) is None:
        return None, (f"{directory / MANIFEST} is missing (it was written with this checkpoint), so "
                      f"{path} cannot be verified")
    manifest = read_manifest(directory)
    if manifest is not None and any(
            _normalize(manifest["args"].get(name)) != _normalize(state.get("args", {}).get(name))
            for name in ARCHITECTURE_ARGS if name in manifest["args"]):
        return None, f"{directory / MANIFEST} disagrees with {path} about the model's flags (damaged)"
    return state, None


def _missing_rank_reason(directory: Path, tp_rank, tp_size: Optional[int], pp_size: int = 1) -> str:
    ranks = sorted(p.name for p in Path(directory).glob("mp_rank_*"))
    staged = any(name.count("_") == 3 for name in ranks)  # mp_rank_TT_PPP: pipeline stages
    if ranks and tp_size is not None and (staged or pp_size > 1):
        return (f"{rank_file(directory, tp_rank)} is missing: the checkpoint holds {', '.join(ranks)} and "
                f"this run uses --tensor-model-parallel-size {tp_size} --pipeline-model-parallel-size "
                f"{pp_size}; use the sizes it was saved with (its {MANIFEST} lists its flags)")
    if ranks and tp_size is not None and len(ranks) != tp_size:
        return (f"{rank_file(directory, tp_rank)} is missing: the checkpoint holds {len(ranks)} "
                f"tensor-parallel shard(s) ({', '.join(ranks)}) and this run uses "
                f"--tensor-model-parallel-size {tp_size}; use the size it was saved with")
    return f"{rank_file(directory, tp_rank)} is missing"


def find_checkpoint(load, tp_rank, iteration: Optional[int] = None,
                    tp_size: Optional[int] = None, pp_size: int = 1) -> Found:
    """The checkpoint to resume from ``load``, loaded and verified on every rank (a collective when a
    process group exists): ``iteration`` if given (``--ckpt-step``), else the tracker's; if that one
    is damaged or the tracker is missing or garbled, the newest intact checkpoint, with notes.
    ``tp_rank``: this rank's file (``rank_name``)."""
    load = Path(load)
    notes: List[str] = []
    stale = False
    existing = saved_iterations(load)
    if iteration is not None:
        candidates = [iteration]
    else:
        try:
            tracked = read_tracker(load)
        except CheckpointError as e:
            tracked, stale = None, True
            notes.append(f"{e}")
        if tracked is None and not stale and not existing:
            raise CheckpointError(
                f"--load {load}: no {TRACKER} and no iter_* checkpoint there; point --load at a "
                "directory a previous run saved into (its --save), or drop --load to start from scratch")
        if tracked is None and not stale:
            stale = True
            notes.append(f"{load / TRACKER} is missing")
        newer = [i for i in existing if tracked is not None and i > tracked]
        if newer:
            notes.append(f"{load} holds iteration(s) {newer} newer than the tracker's {tracked} (a run "
                         "stopped between saving and updating the tracker, or a deliberate rollback); "
                         f"using {tracked}, as the tracker says")
        older = sorted((i for i in existing if tracked is None or i < tracked), reverse=True)
        candidates = ([tracked] if tracked is not None else []) + older
    failures: List[str] = []
    for candidate in candidates:
        directory = checkpoint_dir(load, candidate)
        reason = incomplete_reason(directory)
        state = None
        if reason is None:
            if not rank_file(directory, tp_rank).exists():
                reason = _missing_rank_reason(directory, tp_rank, tp_size, pp_size)
            else:
                state, reason = _load_rank_state(directory, tp_rank)
        reasons = [r for r in _gather(reason) if r is not None]
        if not reasons:
            if failures:
                stale = True
                notes.append(f"the newest checkpoint could not be used ({'; '.join(failures)}); "
                             f"taking the newest intact one instead: iteration {candidate}")
            if read_manifest(directory) is None:
                notes.append(f"{directory} was written before checkpoints had manifests: not verified")
            return Found(candidate, directory, state, notes, stale)
        failures.append(reasons[0])
        if iteration is not None:
            raise CheckpointError(f"--ckpt-step {iteration}: {reasons[0]}")
    listed = "; ".join(failures + notes) if failures or notes else "none found"
    raise CheckpointError(
        f"--load {load}: no complete, intact checkpoint there ({listed}). Move the damaged "
        "directories away and resume from another --load, or give a new --save to start afresh")


def whole_rank_states(load, iteration: int, tp: int, pp: int = 1) -> Tuple[List[List[Dict[str, Any]]], Path]:
    """One process reading every model-parallel rank's verified state of iteration ``iteration`` of
    ``load`` with whole tensors (``full_state``), for the offline tools: ([TP rank][stage] states, the
    checkpoint's directory). The notes of the first read are printed."""
    states: List[List[Dict[str, Any]]] = []
    directory = None
    for tp_rank in range(tp):
        states.append([])
        for stage in range(pp):
            found = find_checkpoint(load, tp_rank if pp == 1 else (tp_rank, stage), iteration, tp, pp)
            if tp_rank == stage == 0:
                for note in found.notes:
                    print(f"note: {note}", flush=True)
            directory = found.directory
            states[-1].append(full_state(found.state, found.directory, tp_rank))
    return states, directory


def load_checkpoint(load, tp_rank: int = 0, iteration: Optional[int] = None) -> Dict[str, Any]:
    """This TP rank's verified state of the checkpoint ``find_checkpoint`` picks."""
    return find_checkpoint(load, tp_rank, iteration).state


def read_checkpoint_args(load, iteration: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
    """(iteration, the run's flags) of the checkpoint ``find_checkpoint`` would pick, read from its
    manifest without loading any weights (the tools after pretraining need the flags before they can
    set up tensor parallelism). Checkpoints without a manifest: from rank 0's file."""
    found_iteration = iteration
    if found_iteration is None:
        try:
            found_iteration = read_tracker(load)
        except CheckpointError:
            found_iteration = None
        complete = [i for i in saved_iterations(load) if incomplete_reason(checkpoint_dir(load, i)) is None]
        if found_iteration is None or found_iteration not in complete:
            if not complete:
                raise CheckpointError(f"--load {load}: no complete checkpoint there (no {TRACKER} or "
                                      "iter_* directory with its files); point --load at a --save "
                                      "directory of moma-pretrain")
            found_iteration = found_iteration if found_iteration in complete else complete[-1]
    directory = checkpoint_dir(load, found_iteration)
    manifest = read_manifest(directory) if directory.exists() else None
    if manifest is not None:
        return found_iteration, manifest["args"]
    state, reason = _load_rank_state(directory, 0) if directory.exists() else (None, f"{directory} is missing")
    if state is None:
        raise CheckpointError(f"--load {load}: {reason}")
    return found_iteration, state["args"]


# -- random state and compatibility -----------------------------------------------------------------
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_compatible(saved_args: Dict[str, Any], args) -> None:
    """Raises CheckpointError when the checkpoint's model shape or data differ from this run's flags
    (each differing flag named)."""

    def differing(names):
        out = []
        for name in names:
            saved = saved_args.get(name, ARCHITECTURE_DEFAULTS.get(name))
            if _normalize(saved, name) != _normalize(getattr(args, name, None), name):
                out.append(f"{_flag(name)}: checkpoint {saved!r}, now {getattr(args, name, None)!r}")
        return out

    model = differing(ARCHITECTURE_ARGS)
    if model:
        raise CheckpointError("the checkpoint was trained with a different model; use the same flags "
                              "(or a new --save directory):\n  " + "\n  ".join(model))
    data = differing(name for name in DATA_ARGS if name in saved_args)
    if data:
        raise CheckpointError("the checkpoint's data position (its sampler state) belongs to other "
                              "data or sequences; resume with the same flags (or start a new --save "
                              "directory):\n  " + "\n  ".join(data))


def _normalize(value, name: str = ""):
    if name == "mot":  # 'all' and 'ffn,attention,norms' are the same model
        from ..config import parse_mot_parts

        return list(parse_mot_parts(value or ""))
    return list(value) if isinstance(value, tuple) else value


def load_model_state(model: torch.nn.Module, state_dict: Dict[str, Any]) -> List[str]:
    """Loads model weights strictly, except that auxiliary-router weights may be missing (checkpoints
    written before aux routers existed): those keep their fresh, untrained values. Returns the names of
    the aux-router tensors that were missing."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shapes differ: e.g. another vocabulary (the data's), another width
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:2]
        raise CheckpointError(
            "the checkpoint's weights do not fit this model (" + "; ".join(shapes or [str(e)[:200]])
            + "): was it trained on other data (another vocabulary: pass the --data-path it was trained "
            "on) or with other flags?") from None
    aux_missing = [k for k in result.missing_keys if "aux_router" in k]
    other_missing = [k for k in result.missing_keys if "aux_router" not in k]
    if other_missing or result.unexpected_keys:
        raise CheckpointError(
            "the checkpoint's weights do not fit this model: "
            + (f"missing {other_missing[:5]}" if other_missing else "")
            + (f" unexpected {result.unexpected_keys[:5]}" if result.unexpected_keys else "")
            + "; build the model with the checkpoint's flags.")
    return aux_missing
