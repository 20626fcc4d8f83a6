"""``--deepspeed --deepspeed-config FILE.json``: DeepSpeed's engine with ZeRO stage 0-3 from the JSON.

The JSON is DeepSpeed's own; this adapter fills what the run's flags already say (the batch sizes,
``gradient_clipping`` from --clip-grad, ``bf16``/``fp16`` from --bf16/--fp16) and refuses a JSON that
disagrees with them. Without an ``optimizer`` section the run's AdamW (its parameter groups, no weight
decay on biases and norms) is handed to DeepSpeed; with one, DeepSpeed builds its own. The learning
rate follows Megatron's schedule either way (the scheduler drives the engine's parameter groups).

Gradient accumulation is DeepSpeed's (``gradient_accumulation_steps`` = micro-batches per rank; the
loss is not divided again: ``scale_wrt_gas=False``); the reduction over data-parallel ranks, clipping
and the step happen in ``engine.step()`` at the boundary, so the step is taken before its gradient norm
is known.

ZeRO-3 gathers a module's parameters when the module is entered. A MoE layer whose rank skips an
idle expert's module would gather fewer tensors than the other ranks (a hang under NCCL), which is
why MoE users flag such layers as leaf modules (``set_z3_leaf_modules``). MoMa layers skip nothing:
the experts of every group are one module run on every rank, with zero tokens if need be, and every
aux router runs on every rank. No leaf flags are set, and must not be: the aux routers' losses are
computed after their layer's forward (``aux_router.PendingAuxLoss``), and by then a leaf ``MoMaMLP``
would have released the aux routers' weights. tests/test_engines.py runs a rank without image
tokens (and one without text) under ZeRO-3.

Expert parallelism (ZeRO-1 and ZeRO-2): the expert weights go into DeepSpeed's MoE parameter groups
over Megatron's EP and expert-data-parallel groups (``expert_parallel_groups``, ``marked_as_moe``).
"""

import json
import os
from contextlib import contextmanager, nullcontext
from typing import Dict, Optional

import torch

from ...cli import UsageError
from ...expert_parallel import is_expert_parallel
from .base import Engine


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise UsageError("--deepspeed needs the deepspeed package: pip install moma_plugin[deepspeed]") \
            from None
    return deepspeed


def read_config(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--deepspeed-config {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--deepspeed-config {path} is not a readable JSON file: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--deepspeed-config {path} must hold a JSON object")
    return config


def fill_config(config: Dict, args, num_micro: int, dp: int) -> Dict:
    """The JSON with the run's batch sizes, clipping and precision; a UsageError naming both the JSON
    key and the flag where they disagree."""
    config = dict(config)
    path = args.deepspeed_config
    wanted = {"train_batch_size": (args.global_batch_size, "--global-batch-size"),
              "train_micro_batch_size_per_gpu": (args.micro_batch_size, "--micro-batch-size"),
              "gradient_accumulation_steps": (num_micro, f"--global-batch-size / (--micro-batch-size x "
                                                         f"{dp} data-parallel ranks)")}
    for key, (value, flag) in wanted.items():
        if key in config and config[key] != "auto" and int(config[key]) != value:
            raise UsageError(f"--deepspeed-config {path} sets {key} {config[key]} but {flag} makes it "
                             f"{value}; drop {key} from the JSON (the flags fill it) or change {flag}")
        config[key] = value
    clip = config.get("gradient_clipping")
    if clip is not None and "clip_grad" in getattr(args, "explicit", {}) and float(clip) != args.clip_grad:
        raise UsageError(f"--deepspeed-config {path} sets gradient_clipping {clip} but --clip-grad is "
                         f"{args.clip_grad}; give one of them")
    config["gradient_clipping"] = args.clip_grad if clip is None else float(clip)
    for key, flag in (("bf16", "--bf16"), ("fp16", "--fp16")):
        section = dict(config.get(key) or {})
        enabled = bool(section.get("enabled", False))
        wanted_on = getattr(args, key)
        if "enabled" in section and section["enabled"] != "auto" and enabled != wanted_on:
            raise UsageError(f"--deepspeed-config {path} has {key}.enabled {str(enabled).lower()} but "
                             f"{flag} is {'given' if wanted_on else 'not given'}; make them agree "
                             f"(or drop {key} from the JSON: {flag} decides)")
        section["enabled"] = wanted_on
        config[key] = section
    config.setdefault("steps_per_print", 10 ** 9)  # the run logs itself
    config.setdefault("wall_clock_breakdown", False)
    return config


def fp16_supported() -> bool:
    """Whether DeepSpeed's accelerator here takes fp16 (CPUs: only those with fp16 instructions)."""
    return bool(import_deepspeed().get_accelerator().is_fp16_supported())


def zero_stage(config: Dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


# -- expert parallelism: DeepSpeed's MoE parameter groups over Megatron's process groups ------------
def expert_parallel_groups(model, parallel) -> Optional[Dict]:
    """With expert parallelism, the keys of the optimizer's expert parameter groups (``moe``, and the
    group ``name`` DeepSpeed looks its process groups up by), after flagging the expert parameters
    as DeepSpeed's (``allreduce=False``, ``group_name``) and registering Megatron's EP and
    expert-data-parallel groups under that name; None without EP."""
    experts = [p for p in model.parameters() if is_expert_parallel(p)]
    if not experts:
        return None
    from deepspeed.utils import groups

    name, ep, rank = f"ep_size_{parallel.ep}", parallel.ep, torch.distributed.get_rank()
    ep_ranks = torch.distributed.get_process_group_ranks(parallel.ep_group)
    expert_dp_ranks = torch.distributed.get_process_group_ranks(parallel.expert_dp_group)
    # DeepSpeed's checkpoints assume its own layout (get_ep_ranks): EP ranks consecutive, expert-DP
    # ranks strided by EP. Megatron's is the same at TP 1, which the DeepSpeed engine requires.
    first = rank - rank % ep
    if (ep_ranks, expert_dp_ranks) != (list(range(first, first + ep)), list(range(rank % ep, parallel.world, ep))):
        raise UsageError(f"the EP group {ep_ranks} and expert-data-parallel group {expert_dp_ranks} are "
                         "not DeepSpeed's layout (EP ranks consecutive, expert-DP ranks strided by EP); "
                         "run --deepspeed with Megatron's default rank order and TP 1")
    groups._EXPERT_PARALLEL_GROUP[name] = parallel.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = parallel.expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = expert_dp_ranks
    for p in experts:
        p.allreduce, p.group_name = False, name
    return {"moe": True, "name": name}


MARKER = "deepspeed_expert_groups"


@contextmanager
def marked_as_moe(model, expert_group: Optional[Dict]):
    """While open (around ``deepspeed.initialize``), ``model`` holds a parameterless module that
    DeepSpeed takes for one of its MoE layers: DeepSpeed sets its ZeRO optimizer up with expert
    parameter groups only for models holding one (``has_moe_layers``). It holds no experts, so
    DeepSpeed's checkpoints write no per-expert files; the experts are the rank file's."""
    if expert_group is None:
        yield
        return
    from deepspeed.moe.layer import MoE

    class ExpertGroups(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)  # not MoE's: it builds a gate and experts
            self.expert_group_name, self.num_experts, self.num_local_experts = expert_group["name"], 0, 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
            pass  # the groups are Megatron's, registered by expert_parallel_groups

    model.add_module(MARKER, ExpertGroups())
    try:
        yield
    finally:
        delattr(model, MARKER)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, args, parallel, build_optimizer, num_micro: int):
        super().__init__(model, args, parallel)
        deepspeed = import_deepspeed()
        config = fill_config(read_config(args.deepspeed_config), args, num_micro, parallel.dp)
        self.stage, self.config = zero_stage(config), config
        self.accounting = f"zero{self.stage}" if self.stage else "ddp"
        if parallel.world == 1:  # a lone process (no launcher): DeepSpeed still asks for LOCAL_RANK
            os.environ.setdefault("LOCAL_RANK", "0")
        if args.fp16 and not fp16_supported():
            raise UsageError(f"--fp16: DeepSpeed does not train fp16 on this {parallel.device.type} "
                             "(on CPU it needs AVX-512 FP16 or AMX-FP16); use --bf16 instead")
        expert_group = expert_parallel_groups(model, parallel)
        optimizer = None if "optimizer" in config else build_optimizer(model, args, expert_group)
        with marked_as_moe(model, expert_group):
            self.module, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config,
                model_parameters=None if optimizer is not None else model.parameters(),
                mpu=None, dist_init_required=False)
        self.num_micro, self.micro = num_micro, 0

    def backward(self, loss):
        self.module.backward(loss, scale_wrt_gas=False)
        self.micro += 1
        if self.micro < self.num_micro:  # DeepSpeed counts micro-steps in step()
            self.module.step()

    def zero_grad(self):
        self.micro = 0  # DeepSpeed zeroes its gradients itself after each boundary step

    @property
    def clips_itself(self) -> bool:
        return True

    def step(self):
        self.module.step()

    def skipped_for_loss_scale(self) -> bool:
        """True when --fp16's dynamic loss scaling skipped this step (an overflow)."""
        return self.config["fp16"]["enabled"] and not self.module.was_step_applied()

    def grad_norm_after_step(self) -> float:
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_model_state_dict(self):
        """Full weights: gathered from the partitions under ZeRO-3 and over the EP ranks (every rank
        calls it)."""
        with self.gathered():
            return {k: v.detach().clone() if torch.is_tensor(v) else v
                    for k, v in super().full_model_state_dict().items()}

    def gathered(self):
        """Under ZeRO-3 the full parameters while open (a collective), else nothing to do."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def parameter_norm(self) -> float:
        with self.gathered():
            return super().parameter_norm()

    # -- checkpoints: DeepSpeed's own directory (its partitioned optimizer and master weights) inside
    # the iteration directory, beside the full weights of the usual rank file ------------------------
    SUBDIR = "deepspeed"

    def optimizer_state_dict(self):
        """The parameter groups' values only (the schedule's reconciliation reads them); the state
        itself is DeepSpeed's, in SUBDIR."""
        return {"state": None, "param_groups": [{k: v for k, v in group.items() if k != "params"}
                                                for group in self.optimizer.param_groups]}

    def save_engine_files(self, staging):
        self.module.save_checkpoint(str(staging), tag=self.SUBDIR, save_latest=False)
        return self.SUBDIR

    def load_checkpoint(self, state, directory):
        if not (directory / self.SUBDIR).is_dir():
            raise UsageError(f"{directory} was written by the {state.get('engine', 'ddp')} engine: it holds no "
                             f"DeepSpeed state ({self.SUBDIR}/) to resume --deepspeed from; resume it with "
                             "the engine that wrote it (docs/TRAINING.md, \"Engines\")")
        self._check_same_expert_layout(state, directory)
        path, _ = self.module.load_checkpoint(str(directory), tag=self.SUBDIR, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise UsageError(f"DeepSpeed could not read its state in {directory / self.SUBDIR}")

    def _check_same_expert_layout(self, state, directory):
        """DeepSpeed's partitions of expert parameter groups follow the EP and data-parallel sizes
        that wrote them: with EP on either side, both must be the same."""
        saved_ep = int((state.get("args") or {}).get("expert_model_parallel_size") or 1)
        # One file per data-parallel rank ("bf16_zero_pp_rank_0_..." under bf16).
        saved_dp = len(list((directory / self.SUBDIR).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if max(saved_ep, self.parallel.ep) > 1 and (saved_ep, saved_dp) != (self.parallel.ep, self.parallel.dp):
            raise UsageError(
                f"{directory} was written by DeepSpeed at EP {saved_ep} on {saved_dp} data-parallel ranks; "
                f"this run has EP {self.parallel.ep} on {self.parallel.dp}. DeepSpeed's optimizer state of "
                "expert-parallel runs resumes only at the sizes that wrote it. Resume with "
                f"--expert-model-parallel-size {saved_ep} on {saved_dp} ranks, or take the weights alone "
                "elsewhere: moma-convert-checkpoint (docs/TRAINING.md, \"Expert parallelism\")")

    def describe(self) -> str:
        precision = "bf16" if self.config["bf16"]["enabled"] else "fp16" if self.config["fp16"]["enabled"] \
            else "fp32"
        return f"deepspeed (ZeRO stage {self.stage}, {precision}, {os.path.basename(self.args.deepspeed_config)})"
