"""Command-line flags of ``moma-pretrain``, in Megatron-LM's spelling, and ``--config file.yaml``.

Precedence: built-in defaults < the YAML file < flags on the command line. A YAML file is a flat
mapping whose keys are flag names with or without the leading dashes, with dashes or underscores
(``hidden-size: 64``, ``moma_experts: 4t4i``); ``--config`` files may not nest other ``--config``s.
The defaults are the tiny CPU demo: ``moma-pretrain`` alone trains a 4t4i model on the bundled corpus.
"""

import argparse
import math
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..args import add_moma_args
from ..config import parse_expert_groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moma-pretrain",
        description="Pretrain a MoMa (modality-aware experts) GPT model with Megatron-Core. With no "
                    "data flags it trains on the bundled text+image corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None,
                        help="YAML file of flags (flag names as keys); command-line flags win")

    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: seq length")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="RMSNorm")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in linear layers")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP size, as Megatron does")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="layer implementation: torch/Megatron local modules or Transformer Engine")
    g.add_argument("--recompute-granularity", choices=("full",), default=None,
                   help="full activation recomputation (selective is not offered with MoMa layers)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    add_moma_args(parser)

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch size x data-parallel size (no accumulation)")
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the decay; default 1%% of --lr (the paper's)")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="linear warm-up from 0 to --lr; default 10%% of --lr-decay-iters")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=("linear", "cosine", "constant"), default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefix, or weight prefix pairs (default: the bundled corpus)")
    g.add_argument("--valid-fraction", type=float, default=0.05,
                   help="share of documents held out for evaluation")
    g.add_argument("--balance-tolerance", type=float, default=0.05,
                   help="largest |modality share - expert share| per micro-batch for the sampler")
    g.add_argument("--no-balanced-sampler", dest="balanced_sampler", action="store_false",
                   help="plain shuffled batches instead of expert-ratio-balanced ones")

    g = parser.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--run-dir", default=None,
                   help="metrics, TensorBoard events and plots (default: runs/<experts>-<time>)")
    g.add_argument("--name", default=None, help="run name in plots and tables (default: run dir name)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=None,
                   help="held-out micro-batches per evaluation (default: the whole held-out split)")
    g.add_argument("--save", default=None, help="checkpoint directory (default: <run dir>/checkpoints)")
    g.add_argument("--load", default=None,
                   help="resume from this checkpoint directory (default: --save if it holds one)")
    g.add_argument("--save-interval", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and stop after an iteration divisible by this")
    g.add_argument("--no-save", action="store_true", help="write no checkpoints")
    g.add_argument("--tensorboard-dir", default=None, help="default: <run dir>/tensorboard")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    return parser


def _flag_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """{dest: action} of every flag, for checking YAML keys."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _yaml_to_argv(path: str, parser: argparse.ArgumentParser) -> List[str]:
    """A YAML file's mapping as command-line tokens, so argparse checks and converts its values."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise SystemExit(f"moma-pretrain: error: --config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"moma-pretrain: error: --config {path} is not valid YAML: {e}") from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise SystemExit(f"moma-pretrain: error: --config {path} must hold a mapping of flag: value, "
                         f"got a {type(values).__name__}")
    actions = _flag_actions(parser)
    by_flag = {flag: a for a in actions.values() for flag in a.option_strings}
    argv: List[str] = []
    for key, value in values.items():
        name = str(key).lstrip("-")
        dest = name.replace("-", "_")
        spelled = by_flag.get("--" + name.replace("_", "-"))  # the flag itself, e.g. no-progress-bar
        action = spelled or actions.get(dest)  # or its destination, e.g. progress_bar
        if action is None or dest == "config":
            close = sorted("--" + d.replace("_", "-") for d in actions
                           if d.split("_")[0] == dest.split("_")[0])
            hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
            raise SystemExit(f"moma-pretrain: error: --config {path}: unknown key {key!r}{hint}")
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise SystemExit(f"moma-pretrain: error: --config {path}: {key} takes true or false, "
                                 f"got {value!r}")
            # `no-progress-bar: true` or `progress-bar: false` both give --no-progress-bar.
            sets_flag = value if spelled is not None else value == action.const
            if sets_flag:
                argv.append(flag)
            continue
        if value is None:
            continue
        if isinstance(value, list) and action.nargs in ("*", "+"):
            argv.append(flag)
            argv.extend(str(v) for v in value)
        elif isinstance(value, list):
            argv.extend([flag, ",".join(str(v) for v in value)])
        elif isinstance(value, dict):
            text = ",".join(f"{k}:{v[0]}:{v[1]}" for k, v in value.items())
            argv.extend([flag, text])
        else:
            argv.extend([flag, str(value)])
    return argv


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults < ``--config`` YAML < command line; then derived values and checks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    file_argv = _yaml_to_argv(known.config, parser) if known.config else []
    args = parser.parse_args(file_argv + argv)
    return finalize_args(args, parser)


def finalize_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fills derived defaults and rejects inconsistent values with messages that say what to change."""

    def fail(message: str):
        parser.error(message)

    positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "train_iters", "log_interval", "eval_interval", "save_interval",
                "tensor_model_parallel_size")
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr must be a positive number, got {args.lr}")
    if args.min_lr is None:
        args.min_lr = 0.01 * args.lr
    if not 0 <= args.min_lr <= args.lr:
        fail(f"--min-lr {args.min_lr} must lie in [0, --lr {args.lr}]")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = args.lr_decay_iters // 10
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
             f"{args.lr_decay_iters} (default --train-iters)")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        fail(f"--max-position-embeddings {args.max_position_embeddings} is below --seq-length "
             f"{args.seq_length}")
    if args.pipeline_model_parallel_size != 1:
        fail("--pipeline-model-parallel-size > 1 is not supported by moma-pretrain yet (Megatron's "
             "pipeline schedules need CUDA); use tensor or data parallelism")
    if args.eval_iters is not None and args.eval_iters < 1:
        fail(f"--eval-iters must be at least 1, got {args.eval_iters}")
    if args.exit_interval is not None and args.exit_interval < 1:
        fail(f"--exit-interval must be at least 1, got {args.exit_interval}")
    try:
        parse_expert_groups(args.moma_experts, args.moma_modalities)
    except ValueError as e:
        fail(f"--moma-experts: {e}")
    if not 0 < args.valid_fraction < 1:
        fail(f"--valid-fraction must lie in (0, 1), got {args.valid_fraction}")
    return args


def batch_sizes(args: argparse.Namespace, data_parallel_size: int) -> int:
    """Fills ``--global-batch-size`` and returns the micro-batches each rank accumulates per step."""
    per_step = args.micro_batch_size * data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise SystemExit(
            f"moma-pretrain: error: --global-batch-size {args.global_batch_size} is not a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {data_parallel_size} "
            f"= {per_step}; use e.g. {per_step * max(1, round(args.global_batch_size / per_step))}")
    return args.global_batch_size // per_step


def args_for_checkpoint(args: argparse.Namespace) -> Dict[str, Any]:
    """Plain values of the arguments (what a checkpoint and run.json record)."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = list(value)
        elif isinstance(value, dict):
            out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    return out
