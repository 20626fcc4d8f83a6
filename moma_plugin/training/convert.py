"""``moma-convert-checkpoint``: a checkpoint of any engine in the single-file torch layout.

    moma-convert-checkpoint --load runs/x/checkpoints --save runs/x/checkpoints-torch

Every engine writes the same ``iter_X/mp_rank_NN/model_optim_rng.pt`` layout (docs/TRAINING.md,
"Engines"); what differs is where the tensors are. An FSDP2 checkpoint keeps its weights and Adam
moments in ``dcp/`` (sharded): converted, each rank file holds them whole (the stacked expert weights
under their stacked names), as a ddp checkpoint does. A DeepSpeed checkpoint's rank files hold the
whole weights already; its optimizer state stays in DeepSpeed's format and is not carried over, so the
converted one generates and trains aux routers, and pretraining resumes from the original (under
``--deepspeed``). A ddp checkpoint is copied as it is. The tools after pretraining read every engine's
checkpoint directly; the conversion is for readers outside this package (one torch.load per file).

A checkpoint of pipeline parallelism (``mp_rank_TT_PPP``, one file per stage) is merged into one file
per tensor-parallel rank: the layers numbered over the whole model, the last stage's copy of tied
embeddings dropped. Its optimizer state (per stage) is not carried over: the merged checkpoint is for
generation, aux-router training and readers outside this package; pretraining resumes from the
original, with its --pipeline-model-parallel-size.
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..cli import HelpFormatter, UsageError, run_tool
from ..pipeline import whole_model_name
from . import checkpointing

TOOL = "moma-convert-checkpoint"
_MANIFEST_ONLY = ("format", "iteration", "files", "written", "args")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL, formatter_class=HelpFormatter,
        description="Write a moma-pretrain checkpoint of any engine (FSDP2's sharded DCP, DeepSpeed's) "
                    "in the single-file torch layout: whole tensors in each mp_rank_NN file.")
    parser.add_argument("--load", required=True, help="checkpoint directory (a --save of moma-pretrain)")
    parser.add_argument("--save", required=True, help="where the converted checkpoint goes (another directory)")
    parser.add_argument("--ckpt-step", type=int, default=None,
                        help="the iteration to convert (default: the newest intact one)")
    return parser


def convert(load, save, iteration: Optional[int] = None) -> Path:
    """Converts iteration ``iteration`` (default: the newest intact) of ``load`` into ``save``;
    returns the new iteration directory. One process reads every tensor-parallel rank's part."""
    load, save = Path(load), Path(save)
    if save.resolve() == load.resolve():
        raise UsageError(f"--save {save} is --load: give another directory (the checkpoint is read while "
                         "the converted one is written)")
    found_iteration, args = checkpointing.read_checkpoint_args(load, iteration)
    tp, pp = int(args.get("tensor_model_parallel_size", 1)), int(args.get("pipeline_model_parallel_size", 1))
    ranks, directory = checkpointing.whole_rank_states(load, found_iteration, tp, pp)
    engine = ranks[0][0].get("engine", "ddp")
    states = {}
    for tp_rank, stages in enumerate(ranks):
        state = stages[0] if pp == 1 else merge_stages(stages, load)
        states[tp_rank] = dict(state, moma=dict(state["moma"], converted_from=str(directory)))
    manifest = checkpointing.read_manifest(directory) or {}
    summary = {k: v for k, v in manifest.items() if k not in _MANIFEST_ONLY}
    summary["converted_from"] = str(directory)
    extra = {f.name: f.read_text() for f in sorted(directory.glob("*.json"))  # aux_routers.json
             if f.name != checkpointing.MANIFEST}
    path = checkpointing.save_offline(save, found_iteration, states, summary, extra)
    kept = ("the weights (its optimizer state stays in DeepSpeed's format: resume pretraining from "
            f"{load} under --deepspeed)" if states[0]["optimizer"].get("state") is None and pp == 1
            else "the weights (the stages' optimizer states are not merged: resume pretraining from "
            f"{load})" if pp > 1 else "the weights and the optimizer state")
    stages = f", {pp} pipeline stages merged" if pp > 1 else ""
    print(f"{TOOL}: iteration {found_iteration} of {load} ({engine} engine, TP {tp}{stages}) written to {path} "
          f"in the single-file torch layout: {kept}", flush=True)
    return path


def merge_stages(stages: List[Dict[str, Any]], load) -> Dict[str, Any]:
    """One tensor-parallel rank's states of every pipeline stage, in order, as one single-stage state
    (see the module docstring); the rest (schedule, sampler, random state) is the first stage's."""
    args = stages[0]["args"]
    per_stage = args["num_layers"] // len(stages)
    tied = not args.get("untie_embeddings_and_output_weights", False)
    model = {}
    for index, stage in enumerate(stages):
        for name, value in stage["model"].items():
            if tied and name == "output_layer.weight":  # the last stage's copy of the embedding
                continue
            model[whole_model_name(name, index * per_stage)] = value
    why = (f"it was merged from the {len(stages)} pipeline stages of {load}, whose optimizer states are "
           f"per stage; resume pretraining from {load} with --pipeline-model-parallel-size {len(stages)}")
    return dict(stages[0], model=model, args=dict(args, pipeline_model_parallel_size=1),
                optimizer=dict(stages[0]["optimizer"], state=None),
                moma=dict(stages[0]["moma"], optimizer_not_kept=why))


def main(argv: Optional[List[str]] = None):
    def _run(argv):
        options = build_parser().parse_args(argv)
        return convert(options.load, options.save, options.ckpt_step)

    run_tool(TOOL, _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
