"""What a training job builds before its first step: process groups, datasets, model, optimizer and
schedule, sampler. Shared by ``moma-pretrain``, ``moma-train-aux-routers`` and ``moma-generate``; every
bad input ends in a UsageError that names the flag and what to do."""

import os
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ..args import moma_config_from_args
from ..cli import UsageError
from ..data.corpus import BUNDLED, resolve_data_path
from ..data.dataset import build_datasets
from ..data.sampler import BalancedSampler, target_shares_from_experts, unmet_bound
from ..expert_parallel import is_expert_parallel
from ..model import MoMaGPTModel
from ..specs import get_moma_layer_spec, transformer_engine_available
from .checkpointing import from_rank0
from .engines.base import counted


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
    # Expert parallelism: the experts' ranks (a subset of the data-parallel group) and the group
    # over which each expert's gradient is reduced (data-parallel size / EP).
    ep: int = 1
    ep_group: object = None
    expert_dp_group: object = None
    # Pipeline parallelism: this rank's stage of ``pp`` (its layers; the first embeds, the last
    # computes the loss) and the group of the stages holding this rank's data-parallel replica.
    pp: int = 1
    pp_rank: int = 0
    pp_group: object = None

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def model_parallel_rank(self):
        """This rank's checkpoint file: its TP rank, and its stage under pipeline parallelism."""
        return self.tp_rank if self.pp == 1 else (self.tp_rank, self.pp_rank)

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def _torchrun_command(processes: int) -> str:
    module = {"moma-train-aux-routers": "moma_plugin.training.aux_routers"}.get(
        os.path.basename(sys.argv[0]), "moma_plugin.pretrain")
    return f"torchrun --nproc-per-node {processes} -m {module} " + shlex.join(sys.argv[1:])


def setup_parallel(args) -> Parallel:
    """Megatron's parallel state over every process of the job (torchrun/srun set RANK and
    WORLD_SIZE; a lone process gets a one-process gloo group)."""
    from megatron.core import parallel_state

    tp, pp = args.tensor_model_parallel_size, getattr(args, "pipeline_model_parallel_size", 1)
    if getattr(args, "sequence_parallel", False) and tp > 1:
        _check_sequence_parallel_device()
    if pp > 1:
        _check_pipeline_device()
    if torch.cuda.is_available():  # before the process group: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        else:  # a single process: no rendezvous needed
            if tp * pp > 1:
                flags = " x ".join(f"--{name}-model-parallel-size {size}"
                                   for name, size in (("tensor", tp), ("pipeline", pp)) if size > 1)
                raise UsageError(f"{flags} needs {tp * pp} processes (one per rank); launch it with "
                                 f"torchrun:\n  {_torchrun_command(tp * pp)}")
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world % (tp * pp):
        sizes = f"--tensor-model-parallel-size {tp}" + (f" x --pipeline-model-parallel-size {pp}" if pp > 1 else "")
        raise UsageError(f"{sizes} does not divide the {world} processes of this job")
    ep = getattr(args, "expert_model_parallel_size", 1)
    if (world // (tp * pp)) % ep:
        raise UsageError(f"--expert-model-parallel-size {ep} does not divide the {world // (tp * pp)} "
                         f"data-parallel ranks of this job ({world} processes / TP {tp} / PP {pp}); the "
                         "experts are split over data-parallel ranks: launch a multiple of TP x PP x EP "
                         "processes")
    _initialize_model_parallel(tp, ep, pp)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    return Parallel(rank=rank, world=world, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    tp=tp, dp_rank=parallel_state.get_data_parallel_rank(),
                    dp=parallel_state.get_data_parallel_world_size(), device=device,
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                    dp_group=parallel_state.get_data_parallel_group(), ep=ep,
                    ep_group=parallel_state.get_expert_model_parallel_group(),
                    expert_dp_group=parallel_state.get_expert_data_parallel_group(), pp=pp,
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                    pp_group=parallel_state.get_pipeline_model_parallel_group())


def _check_cuda_device(flag: str, why: str):
    """Refuses ``flag`` without a CUDA device: Megatron-Core allocates some of its communication
    buffers on ``torch.cuda.current_device()``; ``why`` says which, and what to do instead."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as e:  # a CPU build, or no GPU
        raise UsageError(f"{flag} needs CUDA: {why} ({e})") from None


def _check_sequence_parallel_device():
    _check_cuda_device("--sequence-parallel", "Megatron-Core's sequence-parallel communication allocates "
                       "its buffers on the current CUDA device. It saves activation memory and does not "
                       "change the results; train without it on this machine")


def _check_pipeline_device():
    _check_cuda_device("--pipeline-model-parallel-size", "Megatron-Core's pipeline schedules allocate the "
                       "activations they pass between stages on the current CUDA device; on this machine "
                       "use tensor or data parallelism")


_MODEL_PARALLEL = {}  # the (world group, TP, EP, PP) Megatron's groups were built for, in this process


def _initialize_model_parallel(tp: int, ep: int, pp: int = 1):
    """Megatron's process groups for TP x PP x EP, built once per process and layout: a process that runs
    several jobs (the tests) reuses them while the layout stays, instead of building new ones each
    time (each gloo group keeps threads alive until destroyed). The groups of another layout are
    not destroyed: FSDP2's meshes resolve groups by name, and a destroyed name gets reused."""
    from megatron.core import parallel_state

    wanted = (id(torch.distributed.group.WORLD), tp, ep, pp)
    if parallel_state.model_parallel_is_initialized():
        if _MODEL_PARALLEL.get("built") == wanted:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             pipeline_model_parallel_size=pp)
    _MODEL_PARALLEL["built"] = wanted


def any_rank(flag: bool, parallel: Parallel) -> bool:
    """True on every rank when ``flag`` is true on any (a collective)."""
    value = torch.tensor([float(flag)], device=parallel.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def data_path_items(args):
    return list(args.data_path) if args.data_path else ["bundled:interleaved"]


def load_datasets(args, parallel: Parallel):
    """(train, held-out) datasets of ``--data-path`` (bundled ones built once, by rank 0, while the
    other ranks wait)."""
    items = data_path_items(args)
    from ..data.dataset import parse_data_path

    try:
        parse_data_path(items)  # the weights, before any dataset is built
    except ValueError as e:
        raise UsageError(f"{e}") from None
    if any(item in BUNDLED for item in items):
        error = None
        if parallel.is_first:  # built once; a failure is every rank's
            try:
                resolve_data_path(items)
            except (OSError, ValueError) as e:
                error = f"cannot build the bundled datasets: {e}"
        error = from_rank0(error)
        if error is not None:
            raise UsageError(error)
    try:
        return build_datasets(resolve_data_path(items), args.seq_length, args.valid_fraction, args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{e}") from None


def data_fingerprint(args) -> str:
    """One digest of every dataset of --data-path (tokens and vocabulary, not paths) with its weight."""
    import hashlib

    from ..data.dataset import dataset_fingerprint, parse_data_path

    pairs = parse_data_path(resolve_data_path(data_path_items(args)))
    text = "\n".join(f"{weight}:{dataset_fingerprint(prefix)}" for weight, prefix in pairs)
    return hashlib.sha256(text.encode()).hexdigest()


def check_vocab_ranges(args, layout, items):
    """--moma-vocab-ranges, when given, must name the ranges the data was written with."""
    given = args.moma_vocab_ranges
    if given is None:
        return
    data = layout.vocab_ranges()
    if {k: tuple(v) for k, v in given.items()} != data:
        spelled = ",".join(f"{name}:{start}:{end}" for name, (start, end) in data.items())
        raise UsageError(f"--moma-vocab-ranges {','.join(f'{k}:{v[0]}:{v[1]}' for k, v in given.items())} "
                         f"disagrees with the data ({' '.join(items)}: {spelled} in its .vocab.json, "
                         f"{layout.vocab_size} ids); drop the flag (the data's ranges are used) or "
                         f"pass --moma-vocab-ranges {spelled}")


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
    if parallel.pp > 1:
        # The activations passed between stages are the fp32 residual stream. Under gloo, batched
        # isend/irecv handed the interleaved schedule stale activations (tests/test_pipeline_parallel.py):
        # separate sends there.
        # A stage's output is freed once sent (Megatron-LM's default too).
        overrides.update(pipeline_dtype=torch.float32, batch_p2p_comm=parallel.device.type == "cuda",
                         deallocate_pipeline_outputs=True)
    try:
        config = moma_config_from_args(args, **overrides)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"{e}") from None
    use_te = args.transformer_impl == "transformer_engine"
    if use_te and not (transformer_engine_available() and torch.cuda.is_available()):
        raise UsageError("--transformer-impl transformer_engine needs a GPU and "
                         "`pip install moma_plugin[te]`; use --transformer-impl local")
    model = MoMaGPTModel(
        config, get_moma_layer_spec(config, use_te=use_te),
        vocab_size=padded_vocab_size(layout.vocab_size, parallel.tp, args.make_vocab_size_divisible_by),
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        pre_process=parallel.first_stage, post_process=parallel.last_stage,
    )
    return model.to(parallel.device), config


def build_optimizer(model, args, expert_group: Optional[Dict] = None):
    """AdamW with Megatron's parameter groups (no weight decay on biases and norm weights), with
    torch's fused kernel where it has one for the parameters' device (CPU and CUDA), else foreach.
    Groups carry the parameters' names, which checkpoints keep (``checkpointing.load_optimizer_state``).
    With ``expert_group``, the expert-parallel parameters form groups of their own carrying its keys
    (DeepSpeed's MoE groups; FSDP2's experts, whose DTensors are on another mesh than the others'
    and cannot share a fused call with them)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.dim() == 1 or name.endswith("bias") else decay).append((name, param))
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    if expert_group is not None:
        groups = [{**group, "params": [(n, p) for n, p in group["params"] if is_expert_parallel(p) == experts],
                   **(expert_group if experts else {})} for group in groups for experts in (False, True)]
        groups = [group for group in groups if group["params"]]
    params = [p for _, p in decay + no_decay]
    if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        implementation = {"fused": True}
    else:
        implementation = {"foreach": True}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_eps, weight_decay=args.weight_decay, **implementation)


def build_scheduler(optimizer, args):
    """Megatron-Core's scheduler of the paper's schedule. On resume it takes only the step count
    from a checkpoint: which values win is decided before (``resume.reconcile_schedule``)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.lr_decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


def blend_hint(target, layout) -> str:
    """The --data-path that serves ``target`` shares from the bundled datasets (text + image only)."""
    if len(layout.modalities) != 2:
        return ""
    from ..data.corpus import bundled_dataset_prefix

    counts = np.load(f"{bundled_dataset_prefix('bundled:interleaved')}.counts.npy").sum(0)
    image_share = counts[1] / counts.sum()
    if target[1] >= image_share:
        return ""
    weight = round(target[1] / image_share, 2)
    return (f"; on the bundled data, blend in its text-only documents: --data-path {weight} "
            f"bundled:interleaved {round(1 - weight, 2)} bundled:text")


def token_counts(dataset):
    """[samples, modalities] token counts of a split; reading them checks every token id."""
    try:
        return dataset.modality_counts()
    except ValueError as e:
        raise UsageError(f"{e}") from None


def build_sampler(train_set, args, parallel: Parallel, layout, seed: Optional[int] = None,
                  announce=print):
    """The balanced sampler of ``--moma-experts``' ratio. Data that cannot meet the bound at all is
    refused; data that cannot meet it for long is announced (misses are counted and logged)."""
    target = target_shares_from_experts(args.moma_experts, layout.modalities) \
        if args.balanced_sampler else None
    counts = token_counts(train_set)
    fix = (f"widen --balance-tolerance (now {args.balance_tolerance}), give data closer to the experts' "
           "ratio, or pass --no-balanced-sampler")
    bundled = all(item in BUNDLED for item in data_path_items(args))
    try:
        sampler = BalancedSampler(counts, args.micro_batch_size, parallel.dp, target,
                                  tolerance=args.balance_tolerance,
                                  seed=args.seed if seed is None else seed, strict=False,
                                  modalities=layout.modalities)
    except ValueError as e:
        hint = blend_hint(target, layout) if bundled and target is not None else ""
        raise UsageError(f"the balanced sampler cannot serve {args.moma_experts}: {e} "
                         f"({fix}{hint})") from None
    if target is not None:
        unmet = unmet_bound(counts, target, args.balance_tolerance, layout.modalities)
        if unmet and parallel.is_first:
            hint = blend_hint(target, layout) if bundled else ""
            announce(f"warning: {unmet} (tolerance {args.balance_tolerance}): the sampler's micro-batches "
                     f"will miss the ratio bound once its pool runs short; each miss is counted and "
                     f"logged. To keep the bound, {fix}{hint}")
    return sampler, target, counts


def count_parameters(model, parallel: Parallel) -> int:
    """The model's parameters: tensor-parallel shards summed over the TP group, replicated ones once,
    under expert parallelism every EP rank's experts (each holds an equal block), and under pipeline
    parallelism every stage's (the last stage's copy of tied embeddings not counted again)."""
    def numel(sharded: bool, expert: bool) -> float:
        return float(sum(p.numel() for p in model.parameters()
                         if getattr(p, "tensor_model_parallel", False) == sharded
                         and is_expert_parallel(p) == expert and counted(p)))

    sums = torch.tensor([numel(True, False), numel(True, True)], dtype=torch.float64, device=parallel.device)
    torch.distributed.all_reduce(sums, group=parallel.tp_group)
    experts = sums[1].item() + numel(False, True)
    count = torch.tensor([sums[0].item() + numel(False, False) + experts * parallel.ep], dtype=torch.float64,
                         device=parallel.device)
    if parallel.pp > 1:
        torch.distributed.all_reduce(count, group=parallel.pp_group)
    return int(count.item())
