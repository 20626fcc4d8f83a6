"""Command-line flags of ``moma-pretrain``, in Megatron-LM's spelling, and ``--config file.yaml``.

Precedence: built-in defaults < the YAML file < flags on the command line. A YAML file is a flat
mapping whose keys are flag names with or without the leading dashes, with dashes or underscores
(``hidden-size: 64``, ``moma_experts: 4t4i``); ``--config`` files may not nest other ``--config``s.
The defaults are the tiny CPU demo: ``moma-pretrain`` alone trains a 4t4i model on the bundled corpus.
"""

import argparse
import copy
import math
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..args import add_moma_args
from ..cli import HelpFormatter, UsageError
from ..config import parse_expert_groups
from ..expert_parallel import check_expert_parallel
from .engines import check_engine_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moma-pretrain",
        description="Pretrain a MoMa (modality-aware experts) GPT model with Megatron-Core. With no "
                    "data flags it trains on the bundled text+image corpus.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", default=None,
                        help="YAML file of flags (flag names as keys); command-line flags win")

    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    g.add_argument("--hidden-size", type=int, default=128, help="model width d")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="FFN (and each expert's) width; default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4, help="attention heads")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads for grouped-query attention; default: one per head")
    g.add_argument("--seq-length", type=int, default=128, help="tokens per training sample")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="positions the model learns; default: the sequence length")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="RMSNorm",
                   help="norm layers")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in linear layers")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout after attention and FFN")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on attention weights")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the weight init")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate input embedding and output layer weights")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP size, as Megatron does")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="layer implementation: torch/Megatron local modules or Transformer Engine")
    g.add_argument("--recompute-granularity", choices=("full",), default=None,
                   help="full activation recomputation (selective is not offered with MoMa layers)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform",
                   help="with --recompute-granularity full: how layers are grouped")
    g.add_argument("--recompute-num-layers", type=int, default=1,
                   help="with --recompute-granularity full: layers per recomputed chunk")
    add_moma_args(parser)

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8, help="samples per rank per forward")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per step; default: micro batch size x data-parallel size (no "
                        "accumulation)")
    g.add_argument("--train-iters", type=int, default=300, help="optimizer steps of the whole run")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the decay; default: 1%% of --lr (the paper's)")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="linear warm-up from 0 to --lr over this many iterations; default: "
                        "--lr-warmup-fraction of --lr-decay-iters")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of --lr-decay-iters; default: 0.1 unless "
                        "--lr-warmup-iters is given")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations until the learning rate reaches --min-lr; default: --train-iters")
    g.add_argument("--lr-decay-style", choices=("linear", "cosine", "constant"), default="linear",
                   help="shape of the decay after the warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (not on biases and norm weights)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=1234, help="seed of every random generator and the sampler")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="ranks each layer is split over (launch with torchrun)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="ranks the experts of every modality group are split over (each holds a block "
                        "of every group; they are data-parallel ranks for the rest of the model)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with TP > 1: split the sequence over the TP ranks between sublayers (norms, "
                        "dropout, residuals), as Megatron does; MoMa and MoD layers gather it to route "
                        "every token, so results equal TP without it (needs CUDA)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages, each holding --num-layers / PP layers, run by Megatron-Core's 1F1B "
                        "schedule (default ddp engine; needs CUDA)")

    g = parser.add_argument_group("data-parallel engine and precision (docs/TRAINING.md, \"Engines\")")
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="shard parameters, gradients and optimizer state with torch FSDP2 (fully_shard per "
                        "layer); default engine: torch DistributedDataParallel")
    g.add_argument("--torch-fsdp2-no-reshard-after-forward", dest="torch_fsdp2_reshard_after_forward",
                   action="store_false",
                   help="FSDP2: keep each layer's gathered weights from forward to backward")
    g.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed (ZeRO stage from the JSON)")
    g.add_argument("--deepspeed-config", default=None, metavar="FILE.json",
                   help="DeepSpeed's JSON config (examples/deepspeed/zero{1,2,3}.json)")
    g.add_argument("--use-megatron-ddp", action="store_true",
                   help="Megatron-Core's DistributedDataParallel (GPU only)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="with --use-megatron-ddp: Megatron's sharded optimizer")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="ddp: gradients per all-reduce bucket, in elements (default: 25 MiB of fp32)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 compute with fp32 master weights and optimizer state (routers, losses fp32)")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling (DeepSpeed only)")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefix, or weight prefix pairs; bundled:interleaved and "
                        "bundled:text name the bundled datasets (default: bundled:interleaved)")
    g.add_argument("--valid-fraction", type=float, default=0.05,
                   help="share of documents held out for evaluation")
    g.add_argument("--balance-tolerance", type=float, default=0.05,
                   help="largest |modality share - expert share| per micro-batch for the sampler")
    g.add_argument("--no-balanced-sampler", dest="balanced_sampler", action="store_false",
                   help="plain shuffled batches instead of expert-ratio-balanced ones")

    g = parser.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--run-dir", default=None,
                   help="metrics, TensorBoard events and plots; default: runs/<experts>-<time>")
    g.add_argument("--name", default=None,
                   help="run name in plots and tables; default: the run directory's name")
    g.add_argument("--log-interval", type=int, default=10, help="iterations per log line")
    g.add_argument("--eval-interval", type=int, default=100, help="iterations between evaluations")
    g.add_argument("--eval-iters", type=int, default=None,
                   help="held-out micro-batches per evaluation; default: the whole held-out split")
    g.add_argument("--save", default=None, help="checkpoint directory; default: <run dir>/checkpoints")
    g.add_argument("--load", default=None,
                   help="resume from this checkpoint directory; default: --save if it holds one")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="resume from this iteration of --load instead of the newest")
    g.add_argument("--save-interval", type=int, default=100, help="iterations between checkpoints")
    g.add_argument("--keep-last", type=int, default=None,
                   help="keep only the newest N checkpoints in --save; default: keep all")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and stop after an iteration divisible by this")
    g.add_argument("--no-save", action="store_true", help="write no checkpoints")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, the learning-rate/optimizer flags win over the checkpoint's values")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, the checkpoint's learning-rate/optimizer values win over the flags")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard events; default: <run dir>/tensorboard")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false",
                   help="no progress bar (log lines only)")
    return parser


def _flag_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """{dest: action} of every flag, for checking YAML keys."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _yaml_to_argv(path: str, parser: argparse.ArgumentParser) -> List[str]:
    """A YAML file's mapping as command-line tokens, so argparse checks and converts its values."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise SystemExit(f"moma-pretrain: error: --config {path}: no such file") from None
    except IsADirectoryError:
        raise SystemExit(f"moma-pretrain: error: --config {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"moma-pretrain: error: --config {path} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    except OSError as e:
        raise SystemExit(f"moma-pretrain: error: --config {path} cannot be read ({e.strerror})") from None
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
            pairs_ok = dest == "moma_vocab_ranges" and all(
                isinstance(v, (list, tuple)) and len(v) == 2 for v in value.values())
            if not pairs_ok:
                raise SystemExit(f"moma-pretrain: error: --config {path}: {key} takes "
                                 + ("a mapping of modality: [start, end]" if dest == "moma_vocab_ranges"
                                    else "a single value or a list, not a mapping"))
            text = ",".join(f"{k}:{v[0]}:{v[1]}" for k, v in value.items())
            argv.extend([flag, text])
        else:
            argv.extend([flag, str(value)])
    return argv


def _given(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """Destinations of the flags that ``argv`` sets."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    known, _ = quiet.parse_known_args(argv)
    return list(vars(known))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults < ``--config`` YAML < command line; then derived values and checks. ``args.explicit``
    maps each flag that was given to where it came from (the YAML file or "the command line")."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    file_argv = _yaml_to_argv(known.config, parser) if known.config else []
    args = parser.parse_args(file_argv + argv)
    args.explicit = {dest: known.config for dest in _given(parser, file_argv)}
    args.explicit.update({dest: "the command line" for dest in _given(parser, argv)})
    return finalize_args(args, parser)


def _source(args, dest: str) -> str:
    """' (from FILE)' when a flag's value came from the YAML file, else ''."""
    where = getattr(args, "explicit", {}).get(dest)
    return f" (from {where})" if where and where != "the command line" else ""


def _check_moma_flags(args, fail):
    """The MoMa flags first: later, derived checks would otherwise report their consequences."""
    try:
        groups = parse_expert_groups(args.moma_experts, args.moma_modalities)
    except ValueError as e:
        fail(f"--moma-experts: {e}")
    ep = args.expert_model_parallel_size
    if ep > 1 and not groups:
        fail(f"--expert-model-parallel-size {ep} with --moma-experts {args.moma_experts}: a dense model "
             "has no experts to split; drop --expert-model-parallel-size")
    if ep > 1:
        try:
            check_expert_parallel(groups, ep)
        except ValueError as e:
            fail(f"--expert-model-parallel-size {ep} with --moma-experts {args.moma_experts}: {e}")
    if not (math.isfinite(args.moma_capacity_factor) and args.moma_capacity_factor > 0):
        fail(f"--moma-capacity-factor must be a positive finite number (paper: 1.0), got "
             f"{args.moma_capacity_factor}")
    if args.mod_interval < 0 or args.mod_start_layer < 0:
        fail(f"--mod-interval {args.mod_interval} and --mod-start-layer {args.mod_start_layer} must be "
             ">= 0 (0 turns Mixture-of-Depths off)")
    if not 0 < args.mod_capacity <= 1:
        fail(f"--mod-capacity must lie in (0, 1] (paper: 0.25), got {args.mod_capacity}")
    if args.mod_interval and args.mod_start_layer >= args.num_layers:
        fail(f"--mod-start-layer {args.mod_start_layer} leaves no MoD layer among --num-layers "
             f"{args.num_layers}")
    if not 0 < args.moma_aux_threshold < 1:
        fail(f"--moma-aux-threshold must lie in (0, 1), got {args.moma_aux_threshold}")


def _check_ranges(args, fail):
    def in_range(name, low, high, closed_high=False, what=""):
        value = getattr(args, name)
        inside = math.isfinite(value) and low <= value and (value <= high if closed_high else value < high)
        if not inside:
            bracket = "]" if closed_high else ")"
            fail(f"--{name.replace('_', '-')} must lie in [{low}, {high}{bracket}{what}, got {value}"
                 f"{_source(args, name)}")

    if not 0 <= args.seed < 2 ** 32:
        fail(f"--seed must lie in [0, 2**32) (numpy's range), got {args.seed}")
    for name in ("hidden_dropout", "attention_dropout"):
        in_range(name, 0.0, 1.0)
    in_range("adam_beta1", 0.0, 1.0)
    in_range("adam_beta2", 0.0, 1.0)
    if not (math.isfinite(args.adam_eps) and args.adam_eps > 0):
        fail(f"--adam-eps must be a positive number, got {args.adam_eps}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        fail(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        fail(f"--clip-grad must be a finite number >= 0 (0 turns clipping off), got {args.clip_grad}")
    if not (math.isfinite(args.init_method_std) and args.init_method_std > 0):
        fail(f"--init-method-std must be a positive number, got {args.init_method_std}")
    if not (math.isfinite(args.balance_tolerance) and 0 < args.balance_tolerance < 1):
        fail(f"--balance-tolerance must lie in (0, 1) (a share of the micro-batch's tokens), got "
             f"{args.balance_tolerance}; --no-balanced-sampler turns balancing off")
    if not 0 < args.valid_fraction < 1:
        fail(f"--valid-fraction must lie in (0, 1), got {args.valid_fraction}")
    if args.make_vocab_size_divisible_by < 1:
        fail(f"--make-vocab-size-divisible-by must be at least 1 (Megatron: 128), got "
             f"{args.make_vocab_size_divisible_by}")
    if args.hidden_size % args.num_attention_heads:
        fail(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
             f"{args.num_attention_heads}")
    groups = args.num_query_groups
    if groups is not None and not (groups >= 1 and args.num_attention_heads % groups == 0):
        fail(f"--num-query-groups {groups} must be at least 1 and divide --num-attention-heads "
             f"{args.num_attention_heads}")
    for name in ("eval_iters", "exit_interval", "keep_last"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.ckpt_step is not None and args.ckpt_step < 0:
        fail(f"--ckpt-step must be >= 0, got {args.ckpt_step}")


def _derive_schedule(args, fail):
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr must be a positive number, got {args.lr}")
    if args.min_lr is None:
        args.min_lr = 0.01 * args.lr
    if not (math.isfinite(args.min_lr) and 0 <= args.min_lr <= args.lr):
        fail(f"--min-lr {args.min_lr}{_source(args, 'min_lr')} must lie in [0, --lr {args.lr}]")
    decay_source = _source(args, "lr_decay_iters")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
        decay_source = " (= --train-iters)"
    if args.lr_decay_iters < 1:
        fail(f"--lr-decay-iters must be at least 1, got {args.lr_decay_iters}")
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        fail("--lr-warmup-iters and --lr-warmup-fraction exclude each other; give one")
    if args.lr_warmup_iters is None:
        fraction = 0.1 if args.lr_warmup_fraction is None else args.lr_warmup_fraction
        if not (math.isfinite(fraction) and 0 <= fraction < 1):
            fail(f"--lr-warmup-fraction must lie in [0, 1), got {fraction}")
        args.lr_warmup_iters = int(args.lr_decay_iters * fraction)
        args.lr_warmup_fraction = fraction
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        fail(f"--lr-warmup-iters {args.lr_warmup_iters}{_source(args, 'lr_warmup_iters')} must be "
             f"below --lr-decay-iters {args.lr_decay_iters}{decay_source}; pass --lr-warmup-iters "
             f"{max(args.lr_decay_iters // 10, 0)} or --lr-warmup-fraction 0.1 with it")


def finalize_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fills derived defaults and rejects inconsistent values with messages that say what to change."""

    def fail(message: str):
        parser.error(message)

    positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "train_iters", "log_interval", "eval_interval", "save_interval",
                "tensor_model_parallel_size", "expert_model_parallel_size", "recompute_num_layers")
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    _check_moma_flags(args, fail)
    check_engine_flags(args, fail)
    _check_ranges(args, fail)
    _derive_schedule(args, fail)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.ffn_hidden_size < 1:
        fail(f"--ffn-hidden-size must be at least 1, got {args.ffn_hidden_size}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        fail(f"--max-position-embeddings {args.max_position_embeddings} is below --seq-length "
             f"{args.seq_length}")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        print("note: --sequence-parallel does nothing without tensor parallelism; turned off",
              file=sys.stderr)
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        fail(f"--sequence-parallel splits each sequence over the TP ranks: --seq-length "
             f"{args.seq_length} is not a multiple of --tensor-model-parallel-size "
             f"{args.tensor_model_parallel_size}")
    _check_pipeline(args, fail)
    if args.global_batch_size is not None and args.global_batch_size < 1:
        fail(f"--global-batch-size must be at least 1, got {args.global_batch_size}")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        fail("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each "
             "other; pass one")
    return args


def _check_pipeline(args, fail):
    """Pipeline parallelism runs under the default ddp engine, each stage holding as many layers."""
    pp = args.pipeline_model_parallel_size
    if pp < 1:
        fail(f"--pipeline-model-parallel-size must be at least 1, got {pp}")
    if pp == 1:
        return
    if args.num_layers % pp:
        fail(f"--pipeline-model-parallel-size {pp} splits the layers evenly over the stages: --num-layers "
             f"{args.num_layers} is not a multiple of it")
    engine = next((flag for flag, on in (("--use-torch-fsdp2", args.use_torch_fsdp2), ("--deepspeed", args.deepspeed),
                                         ("--use-megatron-ddp", args.use_megatron_ddp)) if on), None)
    if engine:
        fail(f"--pipeline-model-parallel-size {pp} runs under the default ddp engine only, not {engine}; "
             "drop one of the two")
    if getattr(args, "expert_model_parallel_size", 1) > 1:
        fail(f"--pipeline-model-parallel-size {pp} with --expert-model-parallel-size "
             f"{args.expert_model_parallel_size} is not supported yet; use one of the two")


def batch_sizes(args: argparse.Namespace, data_parallel_size: int) -> int:
    """Fills ``--global-batch-size`` and returns the micro-batches each rank accumulates per step."""
    per_step = args.micro_batch_size * data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {data_parallel_size} "
            f"= {per_step}; use e.g. {per_step * max(1, round(args.global_batch_size / per_step))}")
    return args.global_batch_size // per_step


def args_for_checkpoint(args: argparse.Namespace) -> Dict[str, Any]:
    """Plain values of the arguments (what a checkpoint and run.json record)."""
    out = {}
    for key, value in vars(args).items():
        if key == "explicit":  # where each flag came from: not a setting
            continue
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = list(value)
        elif isinstance(value, dict):
            out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    return out
