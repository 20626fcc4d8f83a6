"""Resuming ``moma-pretrain``: which checkpoint, which flags win, where the data continues.

- The checkpoint: ``--load DIR`` (``--ckpt-step N`` for a given iteration), or the run's own ``--save``
  directory when it holds checkpoints (the same command again resumes: a requeued SLURM job). A missing,
  garbled or stale tracker is rebuilt from the newest complete, verified checkpoint, with a note
  (``checkpointing.find_checkpoint``).
- The schedule and optimizer hyper-parameters, Megatron's way: when ``--lr``, ``--min-lr``, the warm-up,
  decay, weight decay or Adam flags differ from the checkpoint's, the run refuses to start unless
  ``--override-opt_param-scheduler`` (the flags win) or ``--use-checkpoint-opt_param-scheduler`` (the
  checkpoint wins; the flags are set to its values, so run.json records what is used).
- The optimizer state: by parameter name, so it also loads into a model whose parameters were
  reorganised; a checkpoint written before the experts' weights were stacked (its optimizer state
  numbered per expert) gets each expert's moments stacked (``load_optimizer_state``).
- The data: the sampler continues where the checkpoint left it; after a stop on a non-finite loss
  (``nan_stop.json`` in ``--save``) it continues from the failed step instead (see ``record_nan_stop``).
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import storage
from ..cli import UsageError

NAN_STOP = "nan_stop.json"
OVERRIDE = "--override-opt_param-scheduler"
USE_CHECKPOINT = "--use-checkpoint-opt_param-scheduler"


def schedule_values(args) -> Dict[str, Any]:
    """The values a checkpoint records for the schedule and the optimizer, from this run's flags."""
    return {"lr": args.lr, "min_lr": args.min_lr, "lr_warmup_iters": args.lr_warmup_iters,
            "lr_decay_iters": args.lr_decay_iters, "lr_decay_style": args.lr_decay_style,
            "weight_decay": args.weight_decay, "adam_beta1": args.adam_beta1,
            "adam_beta2": args.adam_beta2, "adam_eps": args.adam_eps}


def checkpoint_schedule_values(state: Dict[str, Any]) -> Dict[str, Any]:
    """The same values as the checkpoint's scheduler and optimizer hold them."""
    scheduler = state["opt_param_scheduler"]
    group = state["optimizer"]["param_groups"][0]
    return {"lr": scheduler["max_lr"], "min_lr": scheduler["min_lr"],
            "lr_warmup_iters": scheduler["lr_warmup_steps"], "lr_decay_iters": scheduler["lr_decay_steps"],
            "lr_decay_style": scheduler["lr_decay_style"], "weight_decay": scheduler["start_wd"],
            "adam_beta1": group["betas"][0], "adam_beta2": group["betas"][1], "adam_eps": group["eps"]}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def reconcile_schedule(state: Dict[str, Any], args) -> List[str]:
    """Decides between the flags and the checkpoint for the schedule and optimizer values; sets the
    winning values on ``args``. Returns notes for the log; raises UsageError when they differ and
    neither ``--override-opt_param-scheduler`` nor ``--use-checkpoint-opt_param-scheduler`` says which
    wins."""
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise UsageError(f"{OVERRIDE} and {USE_CHECKPOINT} exclude each other; pass one")
    saved = checkpoint_schedule_values(state)
    ours = schedule_values(args)
    differing = [name for name in ours if not _same(ours[name], saved[name])]
    if not differing:
        return []
    listed = ", ".join(f"--{n.replace('_', '-')} {ours[n]} (checkpoint: {saved[n]})" for n in differing)
    if args.override_opt_param_scheduler:
        return [f"{OVERRIDE}: using the flags' {listed}"]
    if args.use_checkpoint_opt_param_scheduler:
        for name in differing:
            setattr(args, name, saved[name])
        return [f"{USE_CHECKPOINT}: using the checkpoint's values instead of {listed}"]
    hint = ""
    if "lr_decay_iters" in differing and "lr_decay_iters" not in args.explicit:
        hint = (f" (--lr-decay-iters defaults to --train-iters: to train longer on the same schedule pass "
                f"--lr-decay-iters {saved['lr_decay_iters']})")
    raise UsageError(f"resuming with a schedule that differs from the checkpoint's: {listed}{hint}. "
                     f"Pass {OVERRIDE} to use the flags, or {USE_CHECKPOINT} to keep the checkpoint's")


def load_optimizer_state(optimizer, model, state: Dict[str, Any], load=None):
    """Loads ``state["optimizer"]`` into ``optimizer`` (built by ``initialize.build_optimizer``) by
    parameter name, keeping this optimizer's implementation (fused or foreach), not the saved one's.
    ``load``: what takes the renumbered state (an engine's; default ``optimizer.load_state_dict``)."""
    saved = state["optimizer"]
    # A group's settings come from the saved group of its kind (weight decay or not): the experts
    # may form groups of their own (FSDP2 and DeepSpeed under expert parallelism), or not (ddp).
    of_kind = {}
    for group in saved["param_groups"]:
        of_kind.setdefault(group.get("wd_mult"), group)
    if all(group.get("wd_mult") in of_kind for group in optimizer.param_groups):
        olds = [of_kind[group.get("wd_mult")] for group in optimizer.param_groups]
    elif len(saved["param_groups"]) == len(optimizer.param_groups):
        olds = saved["param_groups"]
    else:
        raise UsageError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter "
                         f"groups, this one {len(optimizer.param_groups)}; resume with the moma_plugin "
                         "version that wrote it")
    if all("param_names" in group for group in saved["param_groups"]):
        by_name = {name: saved["state"][i] for g in saved["param_groups"]
                   for name, i in zip(g["param_names"], g["params"]) if i in saved["state"]}
    else:
        by_name = _state_by_name_from_positions(saved, state["model"], model)
    groups, numbered, first = [], {}, 0
    for current, old in zip(optimizer.param_groups, olds):
        indices = list(range(first, first + len(current["param_names"])))
        first += len(indices)
        for index, name in zip(indices, current["param_names"]):
            if name in by_name:
                numbered[index] = by_name[name]
        groups.append(dict(old, param_names=list(current["param_names"]), params=indices))
    implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    (load or optimizer.load_state_dict)({"state": numbered, "param_groups": groups})
    for group, kept in zip(optimizer.param_groups, implementation):
        group.update(kept)


def _state_by_name_from_positions(saved, saved_model: Dict[str, Any], model) -> Dict[str, Any]:
    """{parameter name: its state} of an optimizer state numbered by position (written before groups
    carried names): the positions follow the checkpoint's model state, in order, grouped by
    ``build_optimizer``'s rule (biases and 1-D tensors without weight decay). The per-expert entries of
    a checkpoint written before the experts' weights were stacked are stacked."""
    from ..experts import stacked_parameter_sources
    from .checkpointing import stack_expert_entries

    sources = stacked_parameter_sources(model)
    expert_names = {name for names in sources.values() for name in names}
    current = {name for name, _ in model.named_parameters()}
    names = [k for k in saved_model if k in current or k in expert_names]
    no_decay = [k for k in names if saved_model[k].dim() == 1 or k.endswith("bias")]
    decay = [k for k in names if k not in set(no_decay)]
    counts = [len(g["params"]) for g in saved["param_groups"]]
    if counts != [len(decay), len(no_decay)]:
        raise UsageError(
            f"the checkpoint's optimizer state does not fit this model (its groups hold {counts} "
            f"tensors, its weights make {[len(decay), len(no_decay)]}); resume it with the "
            "moma_plugin version that wrote it")
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    by_name = {name: saved["state"][i] for name, i in zip(decay + no_decay, ids) if i in saved["state"]}
    return stack_expert_entries(by_name, sources)


def apply_optimizer_values(optimizer, args):
    """After ``optimizer.load_state_dict``: the reconciled Adam values (torch restores the saved ones)."""
    for group in optimizer.param_groups:
        group["betas"] = (args.adam_beta1, args.adam_beta2)
        group["eps"] = args.adam_eps


# -- stopping on a non-finite loss --------------------------------------------------------------------
def _data_flags(args: Dict[str, Any]) -> Dict[str, Any]:
    from .checkpointing import DATA_ARGS

    return {name: args.get(name) for name in DATA_ARGS}


def record_nan_stop(save_dir: Path, failed_iteration: int, sampler_state: Dict[str, Any],
                    rollback: Optional[int], args: Dict[str, Any]):
    """Remembers where the data stood at the step that failed, so that resuming from an earlier
    checkpoint of this directory continues with that step's batches rather than replaying the ones
    that led to it. ``args``: the run's flags (their data flags must match on resume)."""
    storage.atomic_write_text(save_dir / NAN_STOP, json.dumps(
        {"failed_iteration": failed_iteration, "rollback_checkpoint": rollback,
         "data": _data_flags(args), "sampler": sampler_state}, indent=1))


def nan_stop_sampler(save_dir: Optional[Path], load_dir: Path, iteration: int, args: Dict[str, Any]
                     ) -> Tuple[Optional[Dict[str, Any]], Optional[int]]:
    """(sampler state, failed iteration) recorded by ``record_nan_stop`` when the run resumes from its
    own --save (``load_dir`` is ``save_dir``), from a checkpoint before the failure, with the same data
    flags; (None, None) otherwise."""
    if save_dir is None or Path(load_dir).resolve() != Path(save_dir).resolve():
        return None, None
    path = Path(save_dir) / NAN_STOP
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text())
        failed = int(record["failed_iteration"])
        data = record["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({e}); delete it to resume with the checkpoint's own data "
                         "position") from None
    if failed <= iteration or data != _data_flags(args):
        return None, None
    return record["sampler"], failed


def clear_nan_stop(save_dir: Path):
    (Path(save_dir) / NAN_STOP).unlink(missing_ok=True)


def rollback_candidates(save_dir: Path, before: int, growth: float = 10.0
                        ) -> List[Tuple[int, Optional[float]]]:
    """(iteration, weight norm) of the complete checkpoints in ``save_dir`` before iteration
    ``before`` that look sane, newest first: the states to go back to after a divergence. Walking from
    the oldest, a checkpoint looks diverged when its weights are not finite or their norm is more than
    ``growth`` times the previous sane checkpoint's (training moves the norm slowly, a divergence by
    orders of magnitude); it and every later one are left out."""
    from . import checkpointing

    sane: List[Tuple[int, Optional[float]]] = []
    for iteration in checkpointing.saved_iterations(save_dir):
        directory = checkpointing.checkpoint_dir(save_dir, iteration)
        if iteration >= before or checkpointing.incomplete_reason(directory) is not None:
            continue
        try:
            manifest = checkpointing.read_manifest(directory) or {}
        except UsageError:
            continue
        norm = manifest.get("parameter_norm")
        previous = next((n for _, n in reversed(sane) if n is not None), None)
        if not manifest.get("parameters_finite", True) or (norm is not None and not math.isfinite(norm)) \
                or (norm is not None and previous is not None and norm > growth * previous):
            break
        sane.append((iteration, norm))
    return sane[::-1]
