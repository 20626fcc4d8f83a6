"""Megatron-style command-line flags for MoMa (``--moma-experts 4t4i`` ...) and the config they build.

``add_moma_args(parser)`` suits Megatron-LM's ``extra_args_provider``; ``moma_config_from_args(args)``
fills every MoMaConfig field whose name matches an argument, as Megatron-LM's
``core_transformer_config_from_args(args, config_class=MoMaConfig)`` does.
"""

import argparse
import dataclasses
from typing import Dict, Optional, Tuple

from .config import MoMaConfig
from .experts import EXECUTIONS


def parse_vocab_ranges(text: Optional[str]) -> Optional[Dict[str, Tuple[int, int]]]:
    """``"image:8192:16384,speech:16384:17408"`` -> {"image": (8192, 16384), ...}."""
    if not text:
        return None
    ranges = {}
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise argparse.ArgumentTypeError(
                f"--moma-vocab-ranges item {item!r} is not NAME:START:END, e.g. image:8192:16384."
            )
        ranges[parts[0]] = (int(parts[1]), int(parts[2]))
    return ranges


def add_moma_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("MoMa", "modality-aware experts (moma_plugin)")
    group.add_argument("--moma-experts", default="4t4i",
                       help="expert groups: 4t4i, 7t1i, 4t4i2s, 8x (shared) or dense")
    group.add_argument("--moma-modalities", default="text,image",
                       type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                       help="comma-separated modality names; a token's modality id indexes them")
    group.add_argument("--moma-capacity-factor", type=float, default=1.0,
                       help="each expert takes ceil(tokens * factor / experts) tokens of its modality")
    group.add_argument("--no-moma-router-fp32", dest="moma_router_fp32", action="store_false",
                       help="compute router scores in the model dtype instead of float32")
    group.add_argument("--moma-router-gumbel-noise", action=argparse.BooleanOptionalAction, default=False,
                       help="Gumbel-sigmoid noise on router logits while training (on by default in the "
                            "phase after moma-upcycle)")
    group.add_argument("--moma-force-balanced-routing", action="store_true",
                       help="debug: ignore scores when choosing tokens; every expert gets the same load")
    group.add_argument("--moma-vocab-ranges", type=parse_vocab_ranges, default=None,
                       help="token-id ranges per modality, NAME:START:END[,...]; moma-pretrain checks "
                            "them against the data (default: the data's, from its .vocab.json)")
    group.add_argument("--moma-post-norm", action="store_true",
                       help="Chameleon-style norm after each sublayer instead of before")
    group.add_argument("--moma-expert-execution",
                       choices=EXECUTIONS,
                       default="auto",
                       help="how experts run: auto (by device and dtype; see benchmarks/README.md), "
                            "loop (expert by expert; the reference), chunked (expert by expert, "
                            "hand-written backward), grouped (torch._grouped_mm) or padded (bmm)")
    group.add_argument("--mot", default="", metavar="PARTS",
                       help="Mixture-of-Transformers: untie these parts per modality, comma-separated: "
                            "ffn, attention (Q/K/V and output projections), norms; or all. With ffn, "
                            "--moma-experts gives each modality its FFN group: 1t1i (untied FFNs) or 4t1i "
                            "(a 4-expert text MoE). docs/MOT.md")
    group.add_argument("--mod-interval", type=int, default=0,
                       help="Mixture-of-Depths on every N-th layer from --mod-start-layer (0: off; "
                            "paper: 2)")
    group.add_argument("--mod-capacity", type=float, default=0.25,
                       help="share of a micro-batch's tokens each MoD layer processes (paper: 0.25)")
    group.add_argument("--mod-start-layer", type=int, default=0,
                       help="0-based index of the first MoD layer (paper: 0)")
    group.add_argument("--moma-aux-threshold", type=float, default=0.5,
                       help="causal routing: a token is routed iff its aux-router score > this")
    group.add_argument("--aux-router-joint", action="store_true",
                       help="train the auxiliary routers during pretraining (stop-gradient on their "
                            "input) instead of in a second stage")
    return parser


def moma_config_from_args(args: argparse.Namespace, **overrides) -> MoMaConfig:
    """A MoMaConfig from every argument named like one of its fields; ``overrides`` win."""
    names = {f.name for f in dataclasses.fields(MoMaConfig) if f.init}
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    values.update(overrides)
    return MoMaConfig(**values)
