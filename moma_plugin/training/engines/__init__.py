"""Data-parallel engines of ``moma-pretrain`` and ``moma-train-aux-routers``, chosen with the flags
their users know: ``ddp`` (default, torch DDP), ``--use-torch-fsdp2``, ``--deepspeed --deepspeed-config
FILE``, ``--use-megatron-ddp`` (GPU). One module each; ``base.Engine`` is the interface the loop sees.
docs/TRAINING.md ("Engines") says which to use when, what each shards and what it costs per GPU."""

import torch

from ...cli import UsageError
from .base import Engine, total_norm

__all__ = ["Engine", "build_engine", "check_engine_flags", "engine_name", "total_norm"]


def engine_name(args) -> str:
    if getattr(args, "deepspeed", False):
        return "deepspeed"
    if getattr(args, "use_torch_fsdp2", False):
        return "fsdp2"
    if getattr(args, "use_megatron_ddp", False):
        return "megatron-ddp"
    return "ddp"


def check_engine_flags(args, fail):
    """Flag combinations no engine can run: one message naming both flags and what to change."""
    chosen = [flag for flag, on in (("--deepspeed", args.deepspeed), ("--use-torch-fsdp2", args.use_torch_fsdp2),
                                    ("--use-megatron-ddp", args.use_megatron_ddp)) if on]
    if len(chosen) > 1:
        fail(f"{chosen[0]} and {chosen[1]} are two data-parallel engines; give one")
    if args.deepspeed and not args.deepspeed_config:
        fail("--deepspeed needs --deepspeed-config FILE.json (examples/deepspeed/zero2.json is one)")
    if args.deepspeed_config and not args.deepspeed:
        fail("--deepspeed-config is read only with --deepspeed; add --deepspeed (or drop the config)")
    if args.deepspeed and args.tensor_model_parallel_size > 1:
        fail(f"--deepspeed with --tensor-model-parallel-size {args.tensor_model_parallel_size} is not "
             "supported (DeepSpeed would need Megatron's groups as its mpu); use the default ddp engine "
             "or --use-torch-fsdp2 with tensor parallelism")
    ep = getattr(args, "expert_model_parallel_size", 1)
    if ep > 1 and args.use_megatron_ddp:
        fail(f"--expert-model-parallel-size {ep} with --use-megatron-ddp is not supported yet (the "
             "experts' gradients must be reduced over the expert-data-parallel group only); use the "
             "default ddp engine, --use-torch-fsdp2 or --deepspeed (ZeRO-1/2) with expert parallelism")
    if ep > 1 and args.deepspeed and args.deepspeed_config:
        from .deepspeed import read_config, zero_stage

        try:
            stage = zero_stage(read_config(args.deepspeed_config))
        except UsageError as e:
            fail(str(e))
        if stage not in (1, 2):
            fail(f"--expert-model-parallel-size {ep} with ZeRO stage {stage} ({args.deepspeed_config}) is "
                 "not supported: DeepSpeed keeps expert parameter groups, reduced over the "
                 "expert-data-parallel group, under ZeRO-1 and ZeRO-2; use examples/deepspeed/zero1.json "
                 "or zero2.json (zero_optimization.stage 1 or 2)")
    if args.bf16 and args.fp16:
        fail("--bf16 and --fp16 exclude each other; give one")
    if args.fp16 and not args.deepspeed:
        fail("--fp16 (dynamic loss scaling) is offered by the DeepSpeed engine only; use --bf16, or "
             "--deepspeed --deepspeed-config FILE with --fp16")
    if args.use_distributed_optimizer and not args.use_megatron_ddp:
        fail("--use-distributed-optimizer shards the optimizer of --use-megatron-ddp; add "
             "--use-megatron-ddp, or use --use-torch-fsdp2 / --deepspeed (ZeRO) to shard the optimizer")
    if args.use_megatron_ddp and not torch.cuda.is_available():
        fail("--use-megatron-ddp needs CUDA (Megatron-Core's DistributedDataParallel and "
             "get_megatron_optimizer allocate on the GPU); on CPU use the default ddp engine, "
             "--use-torch-fsdp2, or --deepspeed --deepspeed-config FILE")


def build_engine(model, args, parallel, num_micro: int, build_optimizer) -> Engine:
    """The engine of ``args`` around ``model`` (its weights final: a checkpoint's are loaded before,
    since FSDP2 and ZeRO-3 shard what they are given)."""
    name = engine_name(args)
    if name == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(model, args, parallel, build_optimizer)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, args, parallel, build_optimizer, num_micro)
    if name == "megatron-ddp":
        raise UsageError("--use-megatron-ddp is not wired into moma-pretrain yet (it needs a GPU to "
                         "test); use the default ddp engine or --use-torch-fsdp2")
    from .ddp import DDPEngine

    return DDPEngine(model, args, parallel, build_optimizer)
