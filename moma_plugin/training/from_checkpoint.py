"""Rebuilding a model from a ``moma-pretrain`` checkpoint, for the tools that come after pretraining
(``moma-train-aux-routers``, ``moma-generate``): the checkpoint's own flags shape the model."""

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..data.corpus import bundled_dataset_prefix
from ..data.dataset import parse_data_path
from ..data.vocab import VocabularyLayout
from . import checkpointing
from .arguments import build_parser


def args_from_checkpoint(saved: Dict[str, Any], **overrides) -> argparse.Namespace:
    """The run's arguments: today's defaults, overwritten by what the checkpoint recorded, then
    ``overrides`` (None values are ignored)."""
    args = build_parser().parse_args([])
    for key, value in saved.items():
        setattr(args, key, tuple(value) if key == "moma_modalities" else value)
    for key, value in overrides.items():
        if value is not None:
            setattr(args, key, value)
    return args


def data_prefix(args: argparse.Namespace) -> str:
    """The (first) dataset prefix of the run: its vocabulary and tokenizers sit beside it."""
    if not args.data_path:
        return bundled_dataset_prefix()
    return parse_data_path(args.data_path)[0][1]


def load_checkpoint_state(load: str, tool: str, tp_rank: int = 0,
                          iteration: Optional[int] = None) -> Dict[str, Any]:
    try:
        return checkpointing.load_checkpoint(load, tp_rank, iteration)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{tool}: error: {e}") from None


def build_from_checkpoint(state: Dict[str, Any], args: argparse.Namespace, parallel, tool: str
                          ) -> Tuple[Any, Any, VocabularyLayout]:
    """(model with the checkpoint's weights, its config, the vocabulary layout)."""
    from .loop import build_model

    prefix = data_prefix(args)
    vocab_file = Path(f"{prefix}.vocab.json")
    if not vocab_file.exists():
        raise SystemExit(f"{tool}: error: the checkpoint was trained on {prefix}, but {vocab_file} is "
                         "missing; pass --data-path to the dataset it was trained on")
    layout = VocabularyLayout.load(vocab_file)
    model, config = build_model(args, layout, parallel)
    try:
        missing = checkpointing.load_model_state(model, state["model"])
    except ValueError as e:
        raise SystemExit(f"{tool}: error: {e}") from None
    if missing and parallel.is_first:
        print(f"note: the checkpoint has no auxiliary-router weights ({len(missing)} tensors); they "
              "start untrained", flush=True)
    return model, config, layout
