"""``moma-train-aux-routers``: stage 2 of MoMa's causal inference (paper section 2.4).

Loads a ``moma-pretrain`` checkpoint, freezes the model, and trains only the auxiliary routers with
binary cross-entropy against the expert-choice (and MoD top-k) assignments of each training batch.
Logs the aux loss and accuracy (every router's accuracy, precision and recall per layer and modality go to
``<save>/metrics.jsonl`` and TensorBoard at each log interval); at the end reports, on the held-out split,
accuracy, precision and recall of every aux router per layer and modality, and the held-out loss per modality with ``train`` routing
(expert choice over the batch) and ``causal`` routing (aux routers decide). Saves a checkpoint in the
same format, same iteration, with the trained routers (optimizer and data state kept, so
``moma-pretrain --load`` can continue from it) and ``aux_routers.json`` inside it (published with it).

    moma-train-aux-routers --load runs/x/checkpoints --save runs/x/checkpoints-aux
"""

import argparse
import json
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..aux_router import (
    aux_router_parameters,
    collect_aux_metrics,
    mark_aux_routers_trained,
    pop_aux_loss,
    set_aux_router_training,
)
from ..cli import HelpFormatter, UsageError, run_tool
from . import checkpointing
from .from_checkpoint import args_from_checkpoint, build_from_checkpoint, checkpoint_args, load_state
from .engines.ddp import DDPEngine
from .evaluation import evaluate, held_out_batches
from .initialize import build_sampler, load_datasets, seed_everything, setup_parallel
from .run_lock import lock_directories
from .step import collate, forward_loss, to_device
from .metrics_log import MetricsWriter

TOOL = "moma-train-aux-routers"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL, formatter_class=HelpFormatter,
        description="Train the auxiliary routers of a pretrained MoMa checkpoint (the model frozen), "
                    "so that it can route causally (moma-generate, causal evaluation).")
    parser.add_argument("--load", required=True, help="moma-pretrain checkpoint directory")
    parser.add_argument("--save", required=True, help="where to write the checkpoint with trained routers")
    parser.add_argument("--train-iters", type=int, default=300, help="aux-router training steps")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (the paper: 1e-4 over a few thousand steps)")
    parser.add_argument("--min-lr", type=float, default=None,
                        help="learning rate at the end; default: 1%% of --lr")
    parser.add_argument("--lr-warmup-iters", type=int, default=None,
                        help="linear warm-up; default: 10%% of --train-iters")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="samples per rank per step; default: the checkpoint's")
    parser.add_argument("--clip-grad", type=float, default=1.0,
                        help="max gradient norm of the aux routers (0: off)")
    parser.add_argument("--aux-threshold", type=float, default=None,
                        help="decision threshold on aux scores (default: the checkpoint's, 0.5)")
    parser.add_argument("--data-path", nargs="*", default=None,
                        help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="held-out micro-batches for the final report (default: all)")
    parser.add_argument("--log-interval", type=int, default=25, help="iterations per log line")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampler")
    return parser


def _check(args, parser):
    for name in ("train_iters", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.min_lr is not None and not (math.isfinite(args.min_lr) and 0 <= args.min_lr <= args.lr):
        parser.error(f"--min-lr {args.min_lr} must lie in [0, --lr {args.lr}]")
    if args.lr_warmup_iters is not None and not 0 <= args.lr_warmup_iters < args.train_iters:
        parser.error(f"--lr-warmup-iters {args.lr_warmup_iters} must lie in [0, --train-iters "
                     f"{args.train_iters})")
    if not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        parser.error(f"--clip-grad must be a finite number >= 0, got {args.clip_grad}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2**32), got {args.seed}")
    if args.eval_iters is not None and args.eval_iters < 1:
        parser.error("--eval-iters must be at least 1")
    if args.aux_threshold is not None and not 0 < args.aux_threshold < 1:
        parser.error(f"--aux-threshold must lie in (0, 1), got {args.aux_threshold}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error("--micro-batch-size must be at least 1")
    if Path(args.save).resolve() == Path(args.load).resolve():
        parser.error("--save must differ from --load (the pretrained checkpoint is kept as it was)")


def per_layer_table(metrics: Dict[str, float], modalities) -> List[str]:
    """Lines 'layer 1 experts: text acc 0.95 (P 0.80 R 0.70), image ...' from collect_aux_metrics."""
    rows: Dict[tuple, List[str]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 4 or not parts[3].endswith("_accuracy"):
            continue
        layer, modality, kind = int(parts[1][5:]), parts[2], parts[3][: -len("_accuracy")]
        prefix = f"aux/{parts[1]}/{modality}/{kind}"
        rows.setdefault((layer, kind), []).append(
            f"{modality} acc {value:.3f} (P {metrics[prefix + '_precision']:.2f} "
            f"R {metrics[prefix + '_recall']:.2f}, positives {metrics[prefix + '_positive_frac']:.2f})")
    return [f"layer {layer} {kind:>7}: " + ", ".join(cells) for (layer, kind), cells in sorted(rows.items())]


@torch.no_grad()
def held_out_aux_metrics(model, dataset, args, parallel) -> Dict[str, float]:
    """Aux-router decisions against expert choice on the held-out split (nothing is trained)."""
    collect_aux_metrics(model, reset=True)
    set_aux_router_training(model, True)
    model.eval()
    for batch in held_out_batches(dataset, args, parallel):
        forward_loss(model, to_device(batch, parallel.device))
        pop_aux_loss(model)
    model.train()
    set_aux_router_training(model, False)
    for _, buffer in ((n, b) for n, b in model.named_buffers() if n.endswith("confusion_M4")):
        torch.distributed.all_reduce(buffer, group=parallel.dp_group)
    return collect_aux_metrics(model, reset=True)


def train_aux_routers(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    options = parser.parse_args(argv)
    _check(options, parser)
    _, saved_args = checkpoint_args(options.load)
    args = args_from_checkpoint(saved_args, micro_batch_size=options.micro_batch_size,
                                data_path=options.data_path, moma_aux_threshold=options.aux_threshold,
                                eval_iters=options.eval_iters, aux_router_joint=False,
                                # every rank holds every expert and every token of its sequences
                                expert_model_parallel_size=1, sequence_parallel=False)
    parallel = setup_parallel(args)
    with ExitStack() as stack:
        lock_directories(stack, [options.save], parallel, TOOL, checkpoints=options.save)
        return _train(options, args, parallel)


def _train(options, args, parallel) -> Dict[str, object]:
    state = load_state(options.load, parallel).state  # every TP rank reads its own shard
    seed_everything(options.seed)
    # Before the model: the vocabulary beside the data must exist (the bundled corpus built once).
    train_set, valid_set = load_datasets(args, parallel)
    model, config, layout = build_from_checkpoint(state, args, parallel)
    routers = aux_router_parameters(model)
    if not routers:
        raise UsageError(f"this model (experts {args.moma_experts}, no MoD layers) has no routing to "
                         "predict: a dense model generates causally as it is")
    for p in model.parameters():
        p.requires_grad_(False)
    set_aux_router_training(model, True)  # the aux routers (only) require gradients again

    held_out_batches(valid_set, args, parallel)  # too small for the final report: say so now
    sampler, _, _ = build_sampler(train_set, args, parallel, layout, seed=options.seed,
                                  announce=lambda m: print(m, flush=True))
    # The model is frozen: DDP averages the aux routers' gradients only (the loss is each rank's mean).
    engine = DDPEngine(model, args, parallel,
                       lambda model, args: torch.optim.AdamW(routers, lr=options.lr, weight_decay=0.0))
    optimizer = engine.optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    min_lr = 0.01 * options.lr if options.min_lr is None else options.min_lr
    warmup = options.train_iters // 10 if options.lr_warmup_iters is None else options.lr_warmup_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=options.lr, min_lr=min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=options.train_iters, lr_decay_style="linear", start_wd=0.0, end_wd=0.0,
        wd_incr_steps=options.train_iters, wd_incr_style="constant")

    first = parallel.is_first
    if first:
        Path(options.save).mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(Path(options.save), Path(options.save) / "tensorboard", enabled=first)
    if first:
        print(f"{TOOL}: {sum(p.numel() for p in routers) / 1e3:.1f}K aux-router parameters of a "
              f"{args.moma_experts} model ({config.num_mod_layers} MoD layers), checkpoint "
              f"{options.load} at iteration {state['iteration']}; {options.train_iters} iterations of "
              f"{args.micro_batch_size} x {parallel.dp} samples", flush=True)
    model.train()
    collect_aux_metrics(model, reset=True)
    losses, start, history = [], time.perf_counter(), []
    for iteration in range(1, options.train_iters + 1):
        batch = collate([train_set[i] for i in sampler.next_step()[parallel.dp_rank]])
        engine.zero_grad()
        with engine.autocast():
            forward_loss(engine.module, to_device(batch, parallel.device))
        loss = pop_aux_loss(model)
        engine.backward(loss)
        engine.clip(options.clip_grad, routers)
        engine.step()
        scheduler.step(increment=1)
        losses.append(float(loss.detach()))
        if iteration % options.log_interval == 0 or iteration == options.train_iters:
            metrics = collect_aux_metrics(model, reset=True)
            record = {"iteration": iteration, "aux_loss": sum(losses) / len(losses),
                      "accuracy": metrics.get("aux/accuracy"),
                      "all_zeros_accuracy": metrics.get("aux/all_zeros_accuracy"),
                      "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            writer.write("aux_train", iteration, dict(record, **metrics))
            if first:
                print(f"iteration {iteration:>5d}/{options.train_iters} | lr {record['lr']:.3E} | aux loss "
                      f"{record['aux_loss']:.4f} | accuracy {record['accuracy']:.4f} (all-zeros "
                      f"{record['all_zeros_accuracy']:.4f}) | {time.perf_counter() - start:.1f} s",
                      flush=True)
            losses = []
    set_aux_router_training(model, False)
    mark_aux_routers_trained(model)

    held_out = held_out_aux_metrics(model, valid_set, args, parallel)
    loss_train = evaluate(model, valid_set, args, layout, parallel, routing_mode="train")
    loss_causal = evaluate(model, valid_set, args, layout, parallel, routing_mode="causal")
    writer.write("aux_eval", state["iteration"], dict(
        held_out, **{f"train_routing_{k}": v for k, v in loss_train.items()},
        **{f"causal_routing_{k}": v for k, v in loss_causal.items()}))
    writer.close()
    report = {"checkpoint": str(options.load), "iteration": state["iteration"],
              "train_iters": options.train_iters, "held_out_aux": held_out,
              "held_out_loss_train_routing": loss_train, "held_out_loss_causal_routing": loss_causal,
              "history": history, "threshold": config.moma_aux_threshold}
    state["model"] = model.state_dict()
    state["moma"] = dict(state["moma"], aux_routers=report)
    saved = checkpointing.save_checkpoint(options.save, state["iteration"], state, parallel.tp_rank,
                                          writes=parallel.dp_rank == 0,
                                          extra_files={"aux_routers.json": json.dumps(report, indent=1)})
    if first:
        print("held-out aux-router accuracy against expert choice (P precision, R recall):")
        for line in per_layer_table(held_out, layout.modalities):
            print("  " + line)
        print(f"  all routers: accuracy {held_out['aux/accuracy']:.4f}, all-zeros baseline "
              f"{held_out['aux/all_zeros_accuracy']:.4f}")
        for name, values in (("train (expert choice)", loss_train), ("causal (aux routers)", loss_causal)):
            print(f"held-out loss, {name} routing: " + ", ".join(
                f"{m} {values[f'loss_{m}']:.4f}" for m in layout.modalities)
                + f"; overall {values['loss']:.4f}")
        print(f"checkpoint: {saved}\nreport: {saved / 'aux_routers.json'}", flush=True)
    report["checkpoint_saved"] = str(saved)
    return report


def _main(argv):
    report = train_aux_routers(argv)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return report


def main(argv: Optional[List[str]] = None):
    run_tool(TOOL, _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
