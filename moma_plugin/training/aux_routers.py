"""``moma-train-aux-routers``: stage 2 of MoMa's causal inference (paper section 2.4).

Loads a ``moma-pretrain`` checkpoint, freezes the model, and trains only the auxiliary routers with
binary cross-entropy against the expert-choice (and MoD top-k) assignments of each training batch.
Logs the aux loss and accuracy (every router's accuracy, precision and recall per layer and modality go to
``<save>/metrics.jsonl`` and TensorBoard at each log interval); at the end reports, on the held-out split,
accuracy, precision and recall of every aux router per layer and modality, and the held-out loss per modality with ``train`` routing
(expert choice over the batch) and ``causal`` routing (aux routers decide). Saves a checkpoint in the
same format, same iteration, with the trained routers (optimizer and data state kept, so
``moma-pretrain --load`` can continue from it) and ``aux_routers.json`` beside it.

    moma-train-aux-routers --load runs/x/checkpoints --save runs/x/checkpoints-aux
"""

import argparse
import json
import math
import sys
import time
import warnings
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
from ..data.sampler import BalancedSampler, target_shares_from_experts
from . import checkpointing
from .from_checkpoint import (
    args_from_checkpoint,
    build_from_checkpoint,
    load_checkpoint_state,
)
from .metrics_log import MetricsWriter
from .loop import (
    allreduce_gradients,
    clip_gradients,
    collate,
    evaluate,
    forward_loss,
    held_out_batches,
    load_datasets,
    seed_everything,
    setup_parallel,
    to_device,
)

TOOL = "moma-train-aux-routers"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the auxiliary routers of a pretrained MoMa checkpoint (the model frozen), "
                    "so that it can route causally (moma-generate, causal evaluation).")
    parser.add_argument("--load", required=True, help="moma-pretrain checkpoint directory")
    parser.add_argument("--save", required=True, help="where to write the checkpoint with trained routers")
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (the paper: 1e-4 over a few thousand steps)")
    parser.add_argument("--min-lr", type=float, default=None, help="default: 1%% of --lr")
    parser.add_argument("--lr-warmup-iters", type=int, default=None, help="default: 10%% of iterations")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--aux-threshold", type=float, default=None,
                        help="decision threshold on aux scores (default: the checkpoint's, 0.5)")
    parser.add_argument("--data-path", nargs="*", default=None,
                        help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="held-out micro-batches for the final report (default: all)")
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def _check(args, parser):
    for name in ("train_iters", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
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
    state = load_checkpoint_state(options.load, TOOL)
    args = args_from_checkpoint(state["args"], micro_batch_size=options.micro_batch_size,
                                data_path=options.data_path, moma_aux_threshold=options.aux_threshold,
                                eval_iters=options.eval_iters, aux_router_joint=False)
    parallel = setup_parallel(args)
    if parallel.tp_rank != 0:  # every TP rank reads its own shard
        state = load_checkpoint_state(options.load, TOOL, parallel.tp_rank)
    seed_everything(options.seed)
    # Before the model: the vocabulary beside the data must exist (the bundled corpus built once).
    train_set, valid_set = load_datasets(args, parallel, TOOL)
    model, config, layout = build_from_checkpoint(state, args, parallel, TOOL)
    routers = aux_router_parameters(model)
    if not routers:
        raise SystemExit(f"{TOOL}: error: this model (experts {args.moma_experts}, no MoD layers) has "
                         "no routing to predict: a dense model generates causally as it is")
    for p in model.parameters():
        p.requires_grad_(False)
    set_aux_router_training(model, True)  # the aux routers (only) require gradients again

    counts = train_set.modality_counts()
    sampler = BalancedSampler(counts, args.micro_batch_size, parallel.dp,
                              target_shares_from_experts(args.moma_experts, layout.modalities),
                              tolerance=args.balance_tolerance, seed=options.seed, strict=False)
    optimizer = torch.optim.AdamW(routers, lr=options.lr, weight_decay=0.0)
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
        optimizer.zero_grad(set_to_none=True)
        forward_loss(model, to_device(batch, parallel.device))
        loss = pop_aux_loss(model)
        loss.backward()
        allreduce_gradients(model, parallel)
        for p in routers:
            if p.grad is not None:
                p.grad.div_(parallel.dp)
        clip_gradients(model, options.clip_grad, parallel, routers)
        optimizer.step()
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
                                          writes=parallel.dp_rank == 0)
    if first:
        Path(options.save, "aux_routers.json").write_text(json.dumps(report, indent=1))
        print("held-out aux-router accuracy against expert choice (P precision, R recall):")
        for line in per_layer_table(held_out, layout.modalities):
            print("  " + line)
        print(f"  all routers: accuracy {held_out['aux/accuracy']:.4f}, all-zeros baseline "
              f"{held_out['aux/all_zeros_accuracy']:.4f}")
        for name, values in (("train (expert choice)", loss_train), ("causal (aux routers)", loss_causal)):
            print(f"held-out loss, {name} routing: " + ", ".join(
                f"{m} {values[f'loss_{m}']:.4f}" for m in layout.modalities)
                + f"; overall {values['loss']:.4f}")
        print(f"checkpoint: {saved}\nreport: {Path(options.save, 'aux_routers.json')}", flush=True)
    report["checkpoint_saved"] = str(saved)
    return report


def main(argv: Optional[List[str]] = None):
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    train_aux_routers(argv)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
