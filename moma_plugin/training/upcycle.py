"""``moma-upcycle``: a checkpoint with one FFN per expert group (dense, ``1t1i``, ``1x``) turned into
one with several experts per group (``4t4i``, ``8x``, ...) whose experts start as copies of it (MoMa
section 2.5). Training then continues from it with ``moma-pretrain``.

    moma-upcycle --load runs/1t1i/checkpoints --save runs/4t4i-up/checkpoints --moma-experts 4t4i
    moma-pretrain --moma-experts 4t4i --save runs/4t4i-up/checkpoints ...   # the same other flags

What each target group gets, per layer (``upcycle_model_state``):
- experts: every expert of group G is a copy of the FFN that served G's modalities in the source (the
  dense FFN, or the source group's one expert); biases too;
- router: each of its rows a copy of the source group's one row (so at the first step every expert
  scores a token as the source router did), plus ``router_noise`` x N(0, 1) so that experts can pick
  different tokens from the start; from a dense source, a fresh N(0, init_method_std) router;
- aux router: fresh, N(0, init_method_std), marked untrained (its targets changed);
- a group that keeps its one expert (``1t1i`` -> ``4t1i``: the image group) is copied as it is.
Everything else (attention, norms, embeddings, MoD routers and their aux routers) is copied bit for bit.

Mixture-of-Transformers (``--mot``): dense -> MoT (``--moma-experts 1t1i --mot all``) gives every modality a
copy of the dense FFN (an unrouted group: no router), of the attention projections and of the norms, so
the upcycled model computes exactly what its source does; ``4t1i --mot all`` makes the text FFN a 4-expert
MoE at the same time. A part the source unties stays untied.

Any engine's checkpoint upcycles (its whole tensors are read), at its TP size or, with
``tensor_model_parallel_size``, re-split for another (``tp_layout``).

The upcycled checkpoint is iteration 0 of the new phase (``iter_0000000`` in ``--save``) with no optimizer
state and no schedule: ``moma-pretrain`` starts a fresh optimizer and learning-rate schedule (warm-up and
decay restart, ``--train-iters`` counting the new phase) and turns on ``--moma-router-gumbel-noise`` unless
``--no-moma-router-gumbel-noise`` is given. It keeps the source's data position (the sampler continues:
no sample is seen twice) and its token and FLOP counters, so ``moma-compare`` puts both phases on one
FLOPs axis. docs/TRAINING.md, "Upcycling".
"""

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..cli import HelpFormatter, UsageError, run_tool
from ..config import ExpertGroup, parse_expert_groups, parse_mot_parts
from ..experts import per_expert_state
from ..mot import per_modality_state, untied_tensor
from . import checkpointing, tp_layout
from .from_checkpoint import checkpoint_args

TOOL = "moma-upcycle"
# Keys of a layer's MLP in a checkpoint: the dense FFN, an expert of a group, a group's router and aux router.
_DENSE = re.compile(r"(decoder\.layers\.\d+\.mlp)\.(linear_fc[12]\.(?:weight|bias|_extra_state))")
_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp)\.experts\.(\w+)\.(\d+)\.(linear_fc[12]\.(?:weight|bias))")
_ROUTER = re.compile(r"(decoder\.layers\.\d+\.mlp)\.router\.(\w+)\.weight")
_AUX = re.compile(r"(decoder\.layers\.\d+\.mlp)\.aux_router\.(\w+)\.(fc1|fc2|trained)")
DENSE = None  # a target group's source: the dense FFN


def group_sources(source: str, target: str, modalities: Tuple[str, ...],
                  untying: bool = False) -> Dict[str, Optional[str]]:
    """{target group: the source group whose one expert its experts copy (``DENSE``: the dense FFN)};
    a UsageError saying why when ``source`` cannot be upcycled to ``target``. ``untying``: the
    upcycling unties MoT parts, so the same layout is not "nothing to upcycle"."""
    try:
        sources, targets = (parse_expert_groups(spec, modalities) for spec in (source, target))
    except ValueError as e:
        raise UsageError(f"{e}") from None
    if not targets and not untying:
        raise UsageError(f"--moma-experts {target}: upcycling makes expert groups; name them, e.g. 1t1i, 4t4i or 8x")
    if [(g.name, g.num_experts) for g in sources] == [(g.name, g.num_experts) for g in targets] and not untying:
        raise UsageError(f"the checkpoint is {source} already: nothing to upcycle")
    several = [g for g in sources if g.num_experts != 1]
    if several:
        raise UsageError(f"the checkpoint is {source}: its group '{several[0].name}' has {several[0].num_experts} "
                         "experts, and upcycling copies one FFN per group into several experts; upcycle from a "
                         "dense, 1t1i (one expert per modality) or 1x checkpoint")
    plan = {}
    for group in targets:
        if not sources:
            plan[group.name] = DENSE
            continue
        serving = [g for g in sources if set(group.modalities) <= set(g.modalities)]
        if not serving:
            names = ", ".join(g.name for g in sources if set(g.modalities) & set(group.modalities))
            raise UsageError(f"{source} -> {target}: the target group '{group.name}' (modalities "
                             f"{', '.join(modalities[m] for m in group.modalities)}) would start from several different FFNs of the "
                             f"checkpoint (groups {names}); upcycle to a layout whose groups each take the "
                             f"modalities of one source group (e.g. {_example(sources)})")
        plan[group.name] = serving[0].name
    return plan


def _example(sources: List[ExpertGroup]) -> str:
    letters = {"shared": "x"}
    return "".join(f"4{letters.get(g.name, g.name[0])}" for g in sources)


def upcycle_model_state(model: Dict[str, Any], plan: Dict[str, Optional[str]], targets: List[ExpertGroup],
                        init_std: float, router_noise: float = 0.0, seed: int = 0) -> Dict[str, Any]:
    """The upcycled model state of one tensor-parallel rank's ``model`` state (whole tensors; see the
    module docstring). Routers and aux routers are replicated over TP ranks: every rank's call with the
    same ``seed`` draws the same fresh values."""
    if not targets:  # a dense target (only MoT parts untied): the FFN stays as it is
        return dict(model)
    generator = torch.Generator().manual_seed(seed)
    out: Dict[str, Any] = {}
    ffns: Dict[Tuple[str, Optional[str]], Dict[str, torch.Tensor]] = {}
    routers: Dict[Tuple[str, str], torch.Tensor] = {}
    aux: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in model.items():
        if match := _DENSE.fullmatch(key):
            if not match.group(2).endswith("_extra_state"):
                ffns.setdefault((match.group(1), DENSE), {})[match.group(2)] = value
        elif match := _EXPERT.fullmatch(key):
            if match.group(3) == "0":  # the group's one expert (group_sources checked it)
                ffns.setdefault((match.group(1), match.group(2)), {})[match.group(4)] = value
        elif match := _ROUTER.fullmatch(key):
            routers[(match.group(1), match.group(2))] = value
        elif match := _AUX.fullmatch(key):
            aux.setdefault((match.group(1), match.group(2)), {})[match.group(3)] = value
        else:
            out[key] = value
    hidden = next(iter(ffns.values()))["linear_fc1.weight"].shape[1] if ffns else 0
    for prefix in sorted({prefix for prefix, _ in ffns}, key=_layer_index):
        for group in targets:
            source = plan[group.name]
            if (prefix, source) not in ffns:
                raise UsageError(f"the checkpoint has no FFN of {prefix} for group '{group.name}' "
                                 f"(expected {'the dense FFN' if source is DENSE else f'group {source}'})")
            for expert in range(group.num_experts):
                for part, value in ffns[(prefix, source)].items():
                    out[f"{prefix}.experts.{group.name}.{expert}.{part}"] = value.clone()
            if not group.routed:  # a MoT modality's untied FFN: no router, no aux router
                continue
            kept = source == group.name and group.num_experts == 1
            router = routers.get((prefix, source)) if source is not DENSE else None
            if kept and router is not None:
                out[f"{prefix}.router.{group.name}.weight"] = router.clone()
                parts = aux[(prefix, source)]
            else:
                dtype = next(iter(ffns[(prefix, source)].values())).dtype
                if router is None:
                    router = _normal((group.num_experts, hidden), init_std, generator, dtype)
                else:
                    router = router.repeat(group.num_experts, 1)
                    if router_noise:
                        router = router + _normal(router.shape, router_noise, generator, router.dtype)
                out[f"{prefix}.router.{group.name}.weight"] = router
                half = max(hidden // 2, 1)
                parts = {"fc1": _normal((half, hidden), init_std, generator, dtype),
                         "fc2": _normal((group.num_experts, half), init_std, generator, dtype),
                         "trained": torch.zeros((), dtype=torch.bool)}
            for part, value in parts.items():
                out[f"{prefix}.aux_router.{group.name}.{part}"] = value.clone()
    return out


def untie_per_modality(model: Dict[str, Any], parts, modalities: Tuple[str, ...]) -> Dict[str, Any]:
    """``model`` with the tied tensors of the MoT ``parts`` ('attention', 'norms') copied into each
    modality's (``linear_qkv.weight`` -> ``linear_qkv.<modality>.weight`` for every modality): at the
    first step every modality computes what the tied model did. (The FFN is untied by the expert
    groups: ``upcycle_model_state``.)"""
    out = {}
    for key, value in model.items():
        found = untied_tensor(key, parts)
        if found is None:
            out[key] = value
        elif found[2] != "_extra_state":  # a Megatron linear's FP8 state: no untied counterpart
            _, module, name = found
            out.update({f"{module}.{modality}.{name}": value.clone() for modality in modalities})
    return out


def _layer_index(prefix: str) -> int:
    return int(prefix.split(".")[2])


def _normal(shape, std: float, generator: torch.Generator, dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def upcycle(load, save, experts: str, iteration: Optional[int] = None, router_noise: float = 0.0,
            seed: int = 0, tensor_model_parallel_size: Optional[int] = None, mot: Optional[str] = None) -> Path:
    """Upcycles iteration ``iteration`` (default: the newest intact) of ``load`` to ``experts`` into
    ``save`` (iteration 0 there), at ``tensor_model_parallel_size`` (default: the source's); returns the
    new iteration directory. ``mot``: the Mixture-of-Transformers parts of the target (default: the
    source's); newly untied parts start as copies of the tied ones. One process reads every
    tensor-parallel rank's file (any engine's checkpoint: whole tensors, ``checkpointing.full_state``)."""
    load, save = Path(load), Path(save)
    if save.resolve() == load.resolve():
        raise UsageError(f"--save {save} is --load: give the upcycled run its own directory")
    if checkpointing.has_checkpoints(save):
        raise UsageError(f"--save {save} holds checkpoints already; give the upcycled run a new directory")
    found_iteration, args = checkpoint_args(str(load), iteration)
    modalities = tuple(args["moma_modalities"])
    try:
        source_mot = parse_mot_parts(args.get("mot") or "")
        target_mot = source_mot if mot is None else parse_mot_parts(mot)
    except ValueError as e:
        raise UsageError(f"--mot: {e}") from None
    tied_again = [part for part in source_mot if part not in target_mot]
    if tied_again:
        raise UsageError(f"the checkpoint unties {', '.join(source_mot)} per modality and --mot {mot!r} would tie "
                         f"{', '.join(tied_again)} again; upcycling only unties: keep --mot {','.join(source_mot)}")
    untying = [part for part in target_mot if part not in source_mot]
    plan = group_sources(args["moma_experts"], experts, modalities, untying=bool(untying))
    targets = parse_expert_groups(experts, modalities)
    if "ffn" in target_mot:
        if any(len(g.modalities) > 1 for g in targets):
            raise UsageError(f"--mot {','.join(target_mot)} unties the FFN per modality; --moma-experts {experts} "
                             "shares a group between modalities: give each modality its group (e.g. 1t1i or 4t1i)")
        targets = [replace(g, routed=g.num_experts > 1) for g in targets]
    if router_noise < 0:
        raise UsageError(f"--router-noise must be at least 0, got {router_noise}")
    tp = int(args.get("tensor_model_parallel_size", 1))
    target_tp = tensor_model_parallel_size or tp
    if target_tp < 1:
        raise UsageError(f"--tensor-model-parallel-size must be at least 1, got {target_tp}")
    target_args = dict(args, moma_experts=experts, moma_router_gumbel_noise=True, tensor_model_parallel_size=target_tp,
                       mot=",".join(target_mot))
    ranks, directory = checkpointing.whole_rank_states(load, found_iteration, tp)
    source_groups = parse_expert_groups(args["moma_experts"], modalities)
    states = {}
    for tp_rank, (state,) in enumerate(ranks):
        source = per_modality_state(per_expert_state(state["model"], source_groups), modalities)
        model = upcycle_model_state(source, plan, targets, args.get("init_method_std", 0.02), router_noise, seed)
        model = untie_per_modality(model, untying, modalities)
        moma = {key: state["moma"][key] for key in ("sampler", "consumed_tokens", "train_seconds", "data_fingerprint")
                if key in state["moma"]}
        moma["upcycled"] = {"from": str(directory), "iteration": found_iteration,
                            "moma_experts": args["moma_experts"], "router_noise": router_noise}
        states[tp_rank] = {
            "checkpoint_version": checkpointing.CHECKPOINT_VERSION, "iteration": 0, "args": target_args,
            "engine": "upcycled", "model": model, "optimizer": {"state": None, "param_groups": []},
            "opt_param_scheduler": None, "rng_state": state["rng_state"],
            "num_floating_point_operations_so_far": state["num_floating_point_operations_so_far"],
            "moma": moma}
    if target_tp != tp:
        states = _at_tensor_parallel_size(states, target_tp, args)
    summary = {"upcycled_from": str(directory), "source_iteration": found_iteration}
    path = checkpointing.save_offline(save, 0, states, summary)
    mot_flag = f" --mot {','.join(target_mot)}" if target_mot else ""
    print(f"{TOOL}: iteration {found_iteration} of {load} ({args['moma_experts']}) upcycled to {experts}{mot_flag} in "
          f"{path}; continue with moma-pretrain --moma-experts {experts}{mot_flag} --save {save} and the run's other flags "
          "(a fresh optimizer and schedule; the data continues where it stopped)", flush=True)
    return path


def _at_tensor_parallel_size(states: Dict[int, Dict[str, Any]], tp: int, args: Dict[str, Any]) -> Dict[int, Dict]:
    """The upcycled states of every TP rank, re-split for ``tp`` ranks (``tp_layout``; the
    vocabulary padded as that size pads it)."""
    from ..data.vocab import VocabularyLayout
    from .from_checkpoint import args_from_checkpoint, data_prefix
    from .initialize import padded_vocab_size

    vocab = VocabularyLayout.load(f"{data_prefix(args_from_checkpoint(args))}.vocab.json").vocab_size
    rows = padded_vocab_size(vocab, tp, args.get("make_vocab_size_divisible_by", 128))
    shards = tp_layout.split(tp_layout.merge([states[rank]["model"] for rank in sorted(states)]), tp, rows)
    return {rank: dict(states[0], model=shard) for rank, shard in enumerate(shards)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL, formatter_class=HelpFormatter,
        description="Turn a checkpoint with one FFN per expert group (dense, 1t1i, 1x) into one with several "
                    "experts per group, each a copy of it; continue training with moma-pretrain.")
    parser.add_argument("--load", required=True, help="checkpoint directory of the source run (its --save)")
    parser.add_argument("--save", required=True, help="new checkpoint directory for the upcycled run")
    parser.add_argument("--moma-experts", required=True, help="the target layout, e.g. 4t4i or 8x")
    parser.add_argument("--ckpt-step", type=int, default=None,
                        help="the source iteration (default: the newest intact one)")
    parser.add_argument("--router-noise", type=float, default=0.0,
                        help="std of the Gaussian noise added to each copied router row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh routers and of the noise")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None,
                        help="TP size of the upcycled checkpoint (default: the source's)")
    parser.add_argument("--mot", default=None, metavar="PARTS",
                        help="Mixture-of-Transformers parts of the target (ffn, attention, norms or all; default: "
                             "the source's): each newly untied part starts, for every modality, as a copy of the "
                             "tied one, e.g. dense -> --moma-experts 1t1i --mot all")
    return parser


def main(argv: Optional[List[str]] = None):
    def _run(argv):
        options = build_parser().parse_args(argv)
        return upcycle(options.load, options.save, options.moma_experts, options.ckpt_step,
                       options.router_noise, options.seed, options.tensor_model_parallel_size, options.mot)

    run_tool(TOOL, _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
