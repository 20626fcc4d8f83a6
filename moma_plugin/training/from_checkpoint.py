"""Rebuilding a model from a ``moma-pretrain`` checkpoint, for the tools that come after pretraining
(``moma-train-aux-routers``, ``moma-generate``): the checkpoint's own flags shape the model."""

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..cli import UsageError
from ..data.corpus import BUNDLED, bundled_dataset_prefix
from ..data.dataset import parse_data_path
from ..data.vocab import VocabularyLayout
from . import checkpointing
from .arguments import build_parser


def args_from_checkpoint(saved: Dict[str, Any], **overrides) -> argparse.Namespace:
    """The run's arguments: today's defaults, overwritten by what the checkpoint recorded, then
    ``overrides`` (None values are ignored)."""
    args = build_parser().parse_args([])
    args.explicit = {}
    for key, value in saved.items():
        setattr(args, key, tuple(value) if key == "moma_modalities" else value)
    for key, value in overrides.items():
        if value is not None:
            setattr(args, key, value)
    return args


def data_prefix(args: argparse.Namespace) -> str:
    """The (first) dataset prefix of the run: its vocabulary and tokenizers sit beside it."""
    first = parse_data_path(args.data_path)[0][1] if args.data_path else "bundled:interleaved"
    return bundled_dataset_prefix(first) if first in BUNDLED else first


def checkpoint_args(load: str, iteration: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
    """(iteration, flags) of the checkpoint to use, from its manifest (no weights read). A checkpoint
    of pipeline stages is refused: these tools run the whole model in each process."""
    found, args = checkpointing.read_checkpoint_args(load, iteration)
    pp = args.get("pipeline_model_parallel_size", 1)
    if pp > 1:
        raise UsageError(f"--load {load}: the checkpoint holds {pp} pipeline stages "
                         f"(--pipeline-model-parallel-size {pp}), and this tool runs the whole model in each "
                         f"process; merge them first:\n  moma-convert-checkpoint --load {load} --save "
                         f"{str(load).rstrip('/')}-merged\nand pass that directory to --load")
    return found, args


def load_state(load: str, parallel, iteration: Optional[int] = None) -> checkpointing.Found:
    """This rank's verified state of the newest intact checkpoint of ``load`` (notes printed), with
    whole tensors (an FSDP2 checkpoint's read from its DCP directory)."""
    found = checkpointing.find_checkpoint(load, parallel.tp_rank, iteration, parallel.tp)
    if parallel.is_first:
        for note in found.notes:
            print(f"note: {note}", flush=True)
    found.state = checkpointing.full_state(found.state, found.directory, parallel.tp_rank)
    return found


def build_from_checkpoint(state: Dict[str, Any], args: argparse.Namespace, parallel
                          ) -> Tuple[Any, Any, VocabularyLayout]:
    """(model with the checkpoint's weights, its config, the vocabulary layout)."""
    from .initialize import build_model

    prefix = data_prefix(args)
    vocab_file = Path(f"{prefix}.vocab.json")
    if not vocab_file.exists():
        raise UsageError(f"the checkpoint was trained on {prefix}, but {vocab_file} is missing; pass "
                         "--data-path to the dataset it was trained on")
    try:
        layout = VocabularyLayout.load(vocab_file)
    except ValueError as e:
        raise UsageError(f"{e}") from None
    model, config = build_model(args, layout, parallel)
    missing = checkpointing.load_model_state(model, state["model"])
    if missing and parallel.is_first:
        print(f"note: the checkpoint has no auxiliary-router weights ({len(missing)} tensors); they "
              "start untrained", flush=True)
    return model, config, layout
