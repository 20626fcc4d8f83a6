"""``moma-pretrain``: pretraining a MoMaGPTModel with Megatron-Core, on CPU or GPU.

What comes from megatron-core: parallel state (tensor/data-parallel groups), the model (GPTModel with
MoMa layer specs, tensor-parallel linears, vocab-parallel embedding and cross entropy) and the learning-
rate schedule (``OptimizerParamScheduler``). What is plain torch here, because megatron-core 0.16 cannot
run it on CPU: the forward/backward loop over micro-batches (``forward_backward_no_pipelining`` allocates
its token counter on CUDA), the optimizer (``get_megatron_optimizer`` and Megatron's DDP assert CUDA),
the data-parallel gradient all-reduce and the tensor-parallel-aware gradient clipping. They do what
Megatron's do for pipeline size 1: loss averaged over every unmasked token of the global batch, gradients
summed over data-parallel ranks, one global gradient norm over all shards.

Per-modality losses: a token's loss counts for the modality of the token being predicted (its label).
"""

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from ..args import moma_config_from_args
from ..aux_router import (
    aux_owners,
    aux_router_parameters,
    collect_aux_metrics,
    has_trained_aux_routers,
    mark_aux_routers_trained,
    pop_aux_loss,
    set_aux_router_training,
    set_routing_mode,
)
from ..data.corpus import bundled_dataset_prefix
from ..data.dataset import build_datasets
from ..data.sampler import BalancedSampler, target_shares_from_experts
from ..flops import training_flops_per_token
from ..metrics import collect_routing_metrics
from ..model import MoMaGPTModel
from ..specs import get_moma_layer_spec, transformer_engine_available
from . import checkpointing
from .arguments import args_for_checkpoint, batch_sizes, parse_args
from .metrics_log import MetricsWriter


@dataclass
class Parallel:
    """This process's place in the job."""

    rank: int
    world: int
    tp_rank: int
    tp: int
    dp_rank: int
    dp: int
    device: torch.device
    tp_group: object = None
    dp_group: object = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0


@dataclass
class RunResult:
    """What ``pretrain`` returns (tests and scripts read it; the CLI prints it)."""

    status: str  # "completed", "exit-interval", "signal", "nan"
    iteration: int
    run_dir: Path
    checkpoint: Optional[Path]
    train_losses: Dict[int, float] = field(default_factory=dict)  # every iteration run here
    eval: Dict[str, float] = field(default_factory=dict)


class ExitSignal:
    """Remembers a SIGTERM (what SLURM sends before preemption) so the loop can save and stop."""

    def __init__(self, signum=signal.SIGTERM):
        self.received = False
        self.signum = signum
        self.previous = None
        try:
            self.previous = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread (e.g. run from a test thread): no handler
            self.previous = None

    def _handle(self, signum, frame):
        self.received = True

    def restore(self):
        if self.previous is not None:
            signal.signal(self.signum, self.previous)


# -- setup ------------------------------------------------------------------------------------------
def setup_parallel(args) -> Parallel:
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        else:  # a single process: no rendezvous needed
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    tp = args.tensor_model_parallel_size
    if world % tp:
        raise SystemExit(f"moma-pretrain: error: --tensor-model-parallel-size {tp} does not divide "
                         f"the {world} processes of this job")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Parallel(rank=rank, world=world, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    tp=tp, dp_rank=parallel_state.get_data_parallel_rank(),
                    dp=parallel_state.get_data_parallel_world_size(), device=device,
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                    dp_group=parallel_state.get_data_parallel_group())


def load_datasets(args, parallel: Parallel, tool: str):
    """(train, held-out) datasets of ``--data-path``, or of the bundled corpus without it (built once,
    by rank 0, while the other ranks wait). Bad paths stop the job with ``<tool>: error: ...``."""
    if args.data_path:
        data_path = args.data_path
    else:
        if parallel.is_first:
            bundled_dataset_prefix()
        torch.distributed.barrier()
        data_path = [bundled_dataset_prefix()]
    try:
        return build_datasets(data_path, args.seq_length, args.valid_fraction, args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{tool}: error: {e}") from None


def seed_everything(seed: int):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of 128 x TP, so every TP rank holds an equal vocabulary slice."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def build_model(args, layout, parallel: Parallel):
    overrides = dict(
        moma_vocab_ranges=layout.vocab_ranges(),
        add_bias_linear=not args.disable_bias_linear,
        use_cpu_initialization=True,
        recompute_method=args.recompute_method if args.recompute_granularity else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity else None,
    )
    try:
        config = moma_config_from_args(args, **overrides)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"moma-pretrain: error: {e}") from None
    use_te = args.transformer_impl == "transformer_engine"
    if use_te and not (transformer_engine_available() and torch.cuda.is_available()):
        raise SystemExit("moma-pretrain: error: --transformer-impl transformer_engine needs a GPU and "
                         "`pip install moma_plugin[te]`; use --transformer-impl local")
    model = MoMaGPTModel(
        config, get_moma_layer_spec(config, use_te=use_te),
        vocab_size=padded_vocab_size(layout.vocab_size, parallel.tp, args.make_vocab_size_divisible_by),
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    return model.to(parallel.device), config


def build_optimizer(model, args):
    """AdamW with Megatron's parameter groups: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_eps, weight_decay=args.weight_decay)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )
    return optimizer, scheduler


def count_parameters(model, parallel: Parallel) -> int:
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.numel() for p in model.parameters()
                     if not getattr(p, "tensor_model_parallel", False))
    total = torch.tensor([float(sharded)])
    torch.distributed.all_reduce(total, group=parallel.tp_group)
    return int(total.item()) + replicated


# -- one step ---------------------------------------------------------------------------------------
def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def collate(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def label_modalities(batch, layout) -> torch.Tensor:
    """[b, s] modality id of each label (the token being predicted)."""
    return torch.from_numpy(layout.modality_ids(batch["labels"].numpy()).astype(np.int64))


def modality_loss_sums(loss_BS: torch.Tensor, loss_mask_BS: torch.Tensor, label_modality_BS: torch.Tensor,
                       num_modalities: int) -> torch.Tensor:
    """[2, M]: summed masked loss and token count of each label modality (float64)."""
    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=loss_BS.device)
    weights = loss_mask_BS.reshape(-1).double()
    index = label_modality_BS.reshape(-1).to(loss_BS.device)
    sums[0].index_add_(0, index, loss_BS.detach().reshape(-1).double() * weights)
    sums[1].index_add_(0, index, weights)
    return sums


def forward_loss(model, batch) -> torch.Tensor:
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 modality_ids=batch["modality_ids"])


def clip_gradients(model, max_norm: float, parallel: Parallel, parameters=None) -> float:
    """Global gradient norm over every TP shard (replicated parameters counted once); scales the
    gradients down to ``max_norm`` when above it. Returns the norm before clipping. ``parameters``:
    a subset to clip (default: all of the model's)."""
    sharded, replicated = [], []
    for p in (model.parameters() if parameters is None else parameters):
        if p.grad is not None:
            (sharded if getattr(p, "tensor_model_parallel", False) else replicated).append(p.grad)
    squares = torch.zeros(2, dtype=torch.float64, device=parallel.device)
    for i, grads in enumerate((sharded, replicated)):
        if grads:
            squares[i] = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
    torch.distributed.all_reduce(squares[:1], group=parallel.tp_group)
    norm = float(squares.sum().sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in sharded + replicated:
            g.mul_(scale)
    return norm


def allreduce_gradients(model, parallel: Parallel):
    """Sums gradients over data-parallel ranks (one flat buffer)."""
    if parallel.dp == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=parallel.dp_group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def train_step(model, optimizer, scheduler, micro_batches, layout, args, parallel: Parallel):
    """Forward/backward over this rank's micro-batches, gradient sync, clip, optimizer step.
    Returns ([2, M] loss sums of the global batch, grad norm, finite?). The step is skipped when the
    loss or gradient norm is not finite."""
    num_modalities = len(layout.modalities)
    label_mods = [label_modalities(b, layout) for b in micro_batches]
    tokens = torch.tensor([float(sum(b["loss_mask"].sum() for b in micro_batches))])
    torch.distributed.all_reduce(tokens, group=parallel.dp_group)
    denominator = tokens.item()

    optimizer.zero_grad(set_to_none=False)
    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=parallel.device)
    for batch, label_mod in zip(micro_batches, label_mods):
        batch = to_device(batch, parallel.device)
        loss_BS = forward_loss(model, batch)
        loss = (loss_BS * batch["loss_mask"]).sum().div(denominator)
        aux_loss = pop_aux_loss(model)  # --aux-router-joint: BCE of the aux routers (own gradients)
        if aux_loss is not None:
            loss = loss + aux_loss / (len(micro_batches) * parallel.dp)
        loss.backward()
        sums += modality_loss_sums(loss_BS, batch["loss_mask"], label_mod, num_modalities)
    torch.distributed.all_reduce(sums, group=parallel.dp_group)
    allreduce_gradients(model, parallel)
    if not math.isfinite(mean_loss(sums)):
        return sums, float("nan"), False
    # The aux routers' gradients come from their own loss; they are clipped apart so that they never
    # scale the model's gradients.
    aux = {id(p) for p in aux_router_parameters(model)}
    grad_norm = clip_gradients(model, args.clip_grad, parallel,
                               [p for p in model.parameters() if id(p) not in aux])
    if not math.isfinite(grad_norm):
        return sums, grad_norm, False
    if getattr(args, "aux_router_joint", False):
        clip_gradients(model, args.clip_grad, parallel, aux_router_parameters(model))
    optimizer.step()
    scheduler.step(increment=1)
    return sums, grad_norm, True


METRIC_BUFFERS = ("tokens_per_expert_ME", "selection_histogram_M3", "mod_tokens_M2", "confusion_M4")


def metric_buffers(model) -> Dict[str, torch.Tensor]:
    return {name: buffer for name, buffer in model.named_buffers()
            if name.rsplit(".", 1)[-1] in METRIC_BUFFERS}


def held_out_batches(dataset, args, parallel: Parallel) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's collated micro-batches of ``--eval-iters`` evaluation steps (default: the whole
    held-out split, each step split over the data-parallel ranks), built one at a time. Checks the
    split is large enough when called, not when first iterated."""
    per_step = args.micro_batch_size * parallel.dp
    steps = len(dataset) // per_step
    if args.eval_iters is not None:
        steps = min(steps, args.eval_iters)
    if steps == 0:
        raise SystemExit(f"moma-pretrain: error: the held-out split has {len(dataset)} samples, fewer "
                         f"than one evaluation step of {per_step}; raise --valid-fraction or lower "
                         "--micro-batch-size")
    starts = (step * per_step + parallel.dp_rank * args.micro_batch_size for step in range(steps))
    return (collate([dataset[i] for i in range(start, start + args.micro_batch_size)])
            for start in starts)


@torch.no_grad()
def evaluate(model, dataset, args, layout, parallel: Parallel,
             routing_mode: str = "train") -> Dict[str, float]:
    """Held-out loss and perplexity per modality (and overall) over ``--eval-iters`` micro-batches
    per rank (default: the whole held-out split, split over data-parallel ranks), with the given
    routing mode (``causal``: aux routers decide). Draws no random numbers and leaves the routing
    statistics of training untouched."""
    num_modalities = len(layout.modalities)
    batches = held_out_batches(dataset, args, parallel)
    saved_metrics = {name: buffer.clone() for name, buffer in metric_buffers(model).items()}
    aux_training = any(owner.aux_training for owner in aux_owners(model))
    set_aux_router_training(model, False)
    model.eval()
    set_routing_mode(model, routing_mode)
    sums = torch.zeros(2, num_modalities, dtype=torch.float64, device=parallel.device)
    for batch in batches:
        label_mod = label_modalities(batch, layout)
        batch = to_device(batch, parallel.device)
        sums += modality_loss_sums(forward_loss(model, batch), batch["loss_mask"], label_mod,
                                   num_modalities)
    model.train()
    set_routing_mode(model, "train")
    set_aux_router_training(model, aux_training)
    for name, buffer in metric_buffers(model).items():
        buffer.copy_(saved_metrics[name])
    torch.distributed.all_reduce(sums, group=parallel.dp_group)
    return losses_from_sums(sums, layout.modalities, with_ppl=True)


def mean_loss(sums: torch.Tensor) -> float:
    """Mean loss over all modalities from [2, M] loss sums and token counts."""
    return float(sums[0].sum() / sums[1].sum().clamp(min=1))


def losses_from_sums(sums: torch.Tensor, modalities, with_ppl: bool = False) -> Dict[str, float]:
    out = {"loss": mean_loss(sums)}
    for m, name in enumerate(modalities):
        out[f"loss_{name}"] = float(sums[0, m] / sums[1, m]) if sums[1, m] > 0 else float("nan")
    if with_ppl:
        for key in list(out):
            out[key.replace("loss", "ppl")] = math.exp(min(out[key], 700.0))
    return out


# -- logging helpers --------------------------------------------------------------------------------
def routing_summary(metrics: Dict[str, float], micro_batches: int, modalities=()) -> Dict[str, float]:
    """Expert load over all MoMa layers per micro-batch: min/max tokens per expert, the share of
    tokens no expert picked, and the mean share of each modality's tokens the MoD layers process."""
    summary = {}
    for name in modalities:
        shares = [v for k, v in metrics.items()
                  if k.startswith("mod/") and k.endswith(f"/{name}/processed_frac")]
        if shares:
            summary[f"mod_processed_{name}"] = sum(shares) / len(shares)
    loads = [v for k, v in metrics.items() if k.endswith("/tokens_per_expert_min")
             or k.endswith("/tokens_per_expert_max")]
    if not loads:
        return summary
    tokens = {k.rsplit("/", 1)[0]: v for k, v in metrics.items() if k.endswith("/tokens")}
    unpicked = sum(metrics[f"{prefix}/picked_by_0_frac"] * count for prefix, count in tokens.items())
    return dict(summary, **{
        "expert_load_min": min(loads) / max(micro_batches, 1),
        "expert_load_max": max(loads) / max(micro_batches, 1),
        "unpicked_frac": unpicked / max(sum(tokens.values()), 1),
    })


def format_log_line(iteration: int, args, values: Dict[str, float], modalities) -> str:
    per_modality = ", ".join(f"{m} {values[f'loss_{m}']:.3f}" for m in modalities)
    parts = [
        f"iteration {iteration:>6d}/{args.train_iters:<6d}",
        f"lr {values['lr']:.3E}",
        f"loss {values['loss']:.4f} ({per_modality})",
        f"grad norm {values['grad_norm']:.3f}",
        f"{values['tokens_per_s']:,.0f} tokens/s",
        f"{values['tflops_per_s']:.4f} TFLOP/s per rank",
    ]
    if "expert_load_min" in values:
        parts.append(f"tokens/expert {values['expert_load_min']:.0f}-{values['expert_load_max']:.0f}, "
                     f"unpicked {values['unpicked_frac']:.3f}")
    if f"mod_processed_{modalities[0]}" in values:
        parts.append("MoD processed " + ", ".join(
            f"{m} {values[f'mod_processed_{m}']:.2f}" for m in modalities
            if f"mod_processed_{m}" in values))
    if "aux/accuracy" in values:
        parts.append(f"aux acc {values['aux/accuracy']:.3f}")
    share = values.get(f"sampler_share_{modalities[-1]}")
    if share is not None:
        target = values.get(f"sampler_target_{modalities[-1]}")
        parts.append(f"{modalities[-1]} share {share:.3f}"
                     + (f" (target {target:.3f})" if target is not None else ""))
    return " | ".join(parts)


# -- the job ----------------------------------------------------------------------------------------
def default_run_dir(args) -> Path:
    return Path("runs") / f"{args.moma_experts}-{time.strftime('%Y%m%d-%H%M%S')}"


def pretrain(argv: Optional[List[str]] = None, args: Optional[argparse.Namespace] = None) -> RunResult:
    """Runs the job described by ``argv`` (or parsed ``args``); see ``moma-pretrain --help``."""
    args = args or parse_args(argv)
    parallel = setup_parallel(args)
    num_micro = batch_sizes(args, parallel.dp)
    seed_everything(args.seed)

    # Run directory, checkpoint directories (every rank agrees on rank 0's choice).
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args)
    shared = [str(run_dir)]
    torch.distributed.broadcast_object_list(shared, src=0)
    run_dir = Path(shared[0])
    save_dir = None if args.no_save else Path(args.save or run_dir / "checkpoints")
    load_dir = args.load
    if load_dir is None and save_dir is not None and checkpointing.read_tracker(save_dir) is not None:
        load_dir = str(save_dir)  # the same command again resumes (SLURM requeue)
    if parallel.is_first:
        run_dir.mkdir(parents=True, exist_ok=True)

    train_set, valid_set = load_datasets(args, parallel, "moma-pretrain")
    layout = train_set.layout
    if tuple(layout.modalities) != tuple(args.moma_modalities):
        raise SystemExit(f"moma-pretrain: error: the data holds modalities {layout.modalities} but "
                         f"--moma-modalities is {','.join(args.moma_modalities)}; make them equal")

    model, config = build_model(args, layout, parallel)
    if args.aux_router_joint:
        set_aux_router_training(model, True)
    optimizer, scheduler = build_optimizer(model, args)
    shares_target = target_shares_from_experts(args.moma_experts, layout.modalities)
    counts = train_set.modality_counts()
    sampler = BalancedSampler(counts, args.micro_batch_size, parallel.dp,
                              shares_target if args.balanced_sampler else None,
                              tolerance=args.balance_tolerance, seed=args.seed, strict=False)
    data_shares = (counts.sum(0) / counts.sum()).tolist()
    flops_per_token = training_flops_per_token(config, args.seq_length, model.vocab_size, data_shares,
                                               aux_routers=args.aux_router_joint)
    tokens_per_iteration = args.global_batch_size * args.seq_length
    num_parameters = count_parameters(model, parallel)

    # Resume.
    iteration, consumed_tokens, flops_so_far, train_seconds = 0, 0, 0.0, 0.0
    if load_dir is not None:
        try:
            state = checkpointing.load_checkpoint(load_dir, parallel.tp_rank)
            checkpointing.check_compatible(state["args"], args)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"moma-pretrain: error: {e}") from None
        try:
            checkpointing.load_model_state(model, state["model"])
        except ValueError as e:
            raise SystemExit(f"moma-pretrain: error: --load {load_dir}: {e}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["opt_param_scheduler"])
        sampler.load_state_dict(state["moma"]["sampler"])
        checkpointing.set_rng_state(state["rng_state"])
        iteration = state["iteration"]
        consumed_tokens = state["moma"]["consumed_tokens"]
        flops_so_far = state["num_floating_point_operations_so_far"]
        train_seconds = state["moma"]["train_seconds"]
        if parallel.is_first:
            print(f"resumed from {checkpointing.iteration_dir(load_dir, iteration)} at iteration "
                  f"{iteration} ({consumed_tokens:,} tokens seen)", flush=True)

    name = args.name or run_dir.name
    writer = MetricsWriter(run_dir, Path(args.tensorboard_dir or run_dir / "tensorboard"),
                           enabled=parallel.is_first)
    if parallel.is_first:
        (run_dir / "run.json").write_text(json.dumps({
            "name": name, "moma_experts": args.moma_experts, "modalities": list(layout.modalities),
            "flops_per_token": flops_per_token, "num_parameters": num_parameters,
            "tokens_per_iteration": tokens_per_iteration, "args": args_for_checkpoint(args),
        }, indent=1))
        print(f"moma-pretrain {args.moma_experts}: {num_parameters / 1e6:.2f}M parameters, "
              f"{args.num_layers} layers, hidden {args.hidden_size}; {parallel.world} process(es) "
              f"(TP {parallel.tp} x DP {parallel.dp}) on {parallel.device.type}; {len(train_set)} "
              f"training / {len(valid_set)} held-out samples of {args.seq_length} tokens; global batch "
              f"{args.global_batch_size} ({num_micro} micro-batch(es) of {args.micro_batch_size} per "
              f"rank); {flops_per_token / 1e6:.2f} MFLOP per token; run dir {run_dir}", flush=True)

    # The checkpoint of the newest saved iteration in --save: (iteration, directory).
    last_saved = None
    if load_dir is not None and save_dir is not None and Path(load_dir).resolve() == save_dir.resolve():
        last_saved = (iteration, checkpointing.iteration_dir(save_dir, iteration))

    def save(at: int) -> Optional[Path]:
        """Checkpoints iteration ``at`` into --save unless it is there already; its directory
        (None with --no-save)."""
        nonlocal last_saved
        if args.aux_router_joint and at > 0:  # the aux routers have trained alongside since step 1
            mark_aux_routers_trained(model)
        if save_dir is None:
            return None
        if last_saved is not None and last_saved[0] == at:
            return last_saved[1]
        state = {
            "checkpoint_version": checkpointing.CHECKPOINT_VERSION,
            "iteration": at,
            "args": args_for_checkpoint(args),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": checkpointing.rng_state(),
            "num_floating_point_operations_so_far": flops_so_far,
            "moma": {"sampler": sampler.state_dict(), "consumed_tokens": consumed_tokens,
                     "train_seconds": train_seconds},
        }
        path = checkpointing.save_checkpoint(str(save_dir), at, state, parallel.tp_rank,
                                             writes=parallel.dp_rank == 0)
        writer.flush()
        last_saved = (at, path)
        return path

    result = RunResult("completed", iteration, run_dir, None)
    exit_signal = ExitSignal()
    from tqdm import tqdm

    bar = tqdm(total=args.train_iters, initial=iteration, unit="it", dynamic_ncols=True,
               disable=(not args.progress_bar) or (not parallel.is_first) or None)
    interval = _Interval(len(layout.modalities))
    try:
        while iteration < args.train_iters:
            start = time.perf_counter()
            micro_batches = [collate([train_set[i] for i in sampler.next_step()[parallel.dp_rank]])
                             for _ in range(num_micro)]
            sums, grad_norm, finite = train_step(model, optimizer, scheduler, micro_batches, layout,
                                                 args, parallel)
            if not finite:
                losses = losses_from_sums(sums, layout.modalities)
                what = "gradient norm" if math.isfinite(losses["loss"]) else "loss"
                saved = save(iteration)
                message = (
                    f"moma-pretrain: stopping: non-finite {what} at iteration {iteration + 1} "
                    f"(loss {losses['loss']}, "
                    + ", ".join(f"{m} {losses[f'loss_{m}']}" for m in layout.modalities)
                    + f", grad norm {grad_norm}). The step was not applied. "
                    + (f"The last good state (iteration {iteration}) is in {saved}. " if saved else "")
                    + "Lower --lr, raise --lr-warmup-iters or lower --clip-grad, then resume with --load."
                )
                if parallel.is_first:
                    print(message, file=sys.stderr, flush=True)
                result.status, result.checkpoint = "nan", saved
                break
            elapsed = time.perf_counter() - start
            iteration += 1
            consumed_tokens += tokens_per_iteration
            flops_so_far += flops_per_token * tokens_per_iteration
            train_seconds += elapsed
            result.train_losses[iteration] = mean_loss(sums)
            interval.add(sums, elapsed, micro_batches, grad_norm)
            bar.update(1)

            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                values = interval.summary(layout.modalities, shares_target, tokens_per_iteration,
                                          flops_per_token, parallel.world)
                routing = collect_routing_metrics(model)
                values.update(routing_summary(routing, interval.micro_batches, layout.modalities))
                values.update(routing)
                if args.aux_router_joint:
                    values.update(collect_aux_metrics(model))
                values.update(lr=optimizer.param_groups[0]["lr"], tokens=consumed_tokens,
                              flops=flops_so_far)
                writer.write("train", iteration, values)
                if parallel.is_first:
                    bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
                    tqdm.write(format_log_line(iteration, args, values, layout.modalities))
                interval = _Interval(len(layout.modalities))

            if iteration % args.eval_interval == 0 and iteration < args.train_iters:
                values = evaluate(model, valid_set, args, layout, parallel)
                writer.write("eval", iteration, dict(values, tokens=consumed_tokens, flops=flops_so_far))
                if parallel.is_first:
                    tqdm.write(f"evaluation at iteration {iteration}: " + ", ".join(
                        f"{m} loss {values[f'loss_{m}']:.4f} (ppl {values[f'ppl_{m}']:.2f})"
                        for m in layout.modalities))

            stop = torch.tensor([float(exit_signal.received)])
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
            if stop.item() > 0:
                result.status, result.checkpoint = "signal", save(iteration)
                if parallel.is_first:
                    tqdm.write(f"received SIGTERM: saved iteration {iteration} to {result.checkpoint}; "
                               "run the same command again (or pass --load) to resume")
                break
            if args.exit_interval and iteration % args.exit_interval == 0:
                result.status, result.checkpoint = "exit-interval", save(iteration)
                if parallel.is_first:
                    tqdm.write(f"--exit-interval {args.exit_interval}: saved iteration {iteration} to "
                               f"{result.checkpoint} and stopped")
                break
            if iteration % args.save_interval == 0 and iteration < args.train_iters:
                result.checkpoint = save(iteration)
    finally:
        bar.close()
        exit_signal.restore()

    result.iteration = iteration
    if result.status == "completed":
        result.checkpoint = save(iteration)
        result.eval = evaluate(model, valid_set, args, layout, parallel)
        if has_trained_aux_routers(model):
            causal = evaluate(model, valid_set, args, layout, parallel, routing_mode="causal")
            result.eval.update({f"causal_{key}": value for key, value in causal.items()})
        writer.write("eval", iteration, dict(result.eval, tokens=consumed_tokens, flops=flops_so_far))
        writer.flush()
        plot = None
        if parallel.is_first:
            plot = _plot(run_dir)
            print(f"done: {iteration} iterations, {consumed_tokens:,} tokens, "
                  f"{flops_so_far / 1e12:.3f} TFLOP in {train_seconds:.1f} s of training", flush=True)
            print("held-out loss: " + ", ".join(
                f"{m} {result.eval[f'loss_{m}']:.4f} (ppl {result.eval[f'ppl_{m}']:.2f})"
                for m in layout.modalities) + f"; overall {result.eval['loss']:.4f}", flush=True)
            if "causal_loss" in result.eval:
                print("held-out loss, causal routing (aux routers): " + ", ".join(
                    f"{m} {result.eval[f'causal_loss_{m}']:.4f}" for m in layout.modalities)
                    + f"; overall {result.eval['causal_loss']:.4f}", flush=True)
            print(f"checkpoint: {result.checkpoint}\nmetrics: {writer.path}\nTensorBoard: "
                  f"{args.tensorboard_dir or run_dir / 'tensorboard'}\nplot: {plot}", flush=True)
    writer.close()
    return result


def _plot(run_dir: Path) -> Optional[Path]:
    """Loss-vs-FLOPs plot of this run (``moma-compare`` draws several runs)."""
    try:
        from ..compare import load_run, plot_runs

        output = run_dir / "loss_vs_flops.png"
        plot_runs([load_run(run_dir)], output)
        return output
    except Exception as e:  # a plot must never cost the run
        warnings.warn(f"could not draw the loss plot: {e}")
        return None


class _Interval:
    """Sums over the iterations between two log lines."""

    def __init__(self, num_modalities: int):
        self.sums = torch.zeros(2, num_modalities, dtype=torch.float64)
        self.seconds = 0.0
        self.iterations = 0
        self.micro_batches = 0
        self.grad_norms = []
        self.modality_tokens = torch.zeros(num_modalities, dtype=torch.float64)

    def add(self, sums, seconds, micro_batches, grad_norm):
        self.sums += sums.cpu()
        self.seconds += seconds
        self.iterations += 1
        self.micro_batches += len(micro_batches)
        self.grad_norms.append(grad_norm)
        for batch in micro_batches:
            ids = batch["modality_ids"].reshape(-1)
            self.modality_tokens += torch.bincount(ids, minlength=len(self.modality_tokens)).double()

    def summary(self, modalities, target, tokens_per_iteration, flops_per_token, world):
        values = losses_from_sums(self.sums, modalities)
        seconds_per_iteration = self.seconds / max(self.iterations, 1)
        tokens_per_s = tokens_per_iteration / max(seconds_per_iteration, 1e-9)
        shares = (self.modality_tokens / self.modality_tokens.sum().clamp(min=1)).tolist()
        values.update(
            grad_norm=sum(self.grad_norms) / len(self.grad_norms),
            seconds_per_iteration=seconds_per_iteration,
            tokens_per_s=tokens_per_s,
            tflops_per_s=tokens_per_s * flops_per_token / 1e12 / world,
        )
        for name, share in zip(modalities, shares):
            values[f"sampler_share_{name}"] = share
        if target is not None:
            for name, share in zip(modalities, target):
                values[f"sampler_target_{name}"] = share
        return values


def main(argv: Optional[List[str]] = None):
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    args = parse_args(argv)
    result = pretrain(args=args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if result.status == "nan":
        sys.exit(1)
