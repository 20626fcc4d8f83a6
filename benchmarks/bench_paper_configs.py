"""Whole training steps of the MoMa paper's 90M-matched configs against the dense baseline, on CPU.

Six models from examples/configs/paper/*_90m.yaml (8 layers, hidden 512, FFN 2048, 8 heads, RMSNorm, no
bias; the MoD ones: 14 layers at hidden 512, MoD on every 2nd layer from layer 0 at capacity 0.25, the
paper's FLOPs match to dense at sequence 4096):

  dense, 1t1i, 8x, 4t4i, MoD 1t1i (mod_1t1i_90m.yaml), MoD 4t4i (mod_4t4i_90m.yaml)

built the way ``moma-pretrain`` builds them: the YAML parsed by ``moma_plugin.training.arguments``, the
model, AdamW and schedule from ``moma_plugin.training.initialize``, the vocabulary and real batches of the
bundled corpus (``bundled:interleaved``, drawn by the 4t4i config's balanced sampler: text:image 50:50
+- 5% per micro-batch; the same batches for every config within a round). Only the sequence and the
batch are CPU-sized: --seq 512, --micro-batch 2, --micro-batches 4 accumulated, 4,096 tokens per step.

A step is ``moma_plugin.training.step.train_step`` itself, with what it calls wrapped to time four phases:
  forward    the rest of train_step: each micro-batch's forward and loss, the per-modality loss sums
  backward   every Tensor.backward call (one per micro-batch)
  clip       the engine's clip: the global gradient norm and the scaling
  optimizer  optimizer.step, optimizer.zero_grad and the learning-rate schedule's step
Each config runs two steps per round: one at --threads intra-op threads (its wall time, perf_counter:
the "wall" table) and one at 1 thread (its CPU time, time.process_time: the "1-thread CPU" table, which
idle waits and descheduling do not inflate; sharing a core's caches with other jobs still does). Rounds
interleave the configs (dense, 1t1i, 8x, ...; odd rounds in reverse order). Ratios are paired: config
total / dense total in the same round, median and min-max over the rounds.

Untimed, before the rounds: an agreement check (for each MoMa config, the loss of one forward with the
timed expert execution against a twin built with ``moma_expert_execution="loop"`` and the same weights);
a one-micro-batch step per config, which allocates gradients and AdamW state; the aten ops of one
optimizer step per config by phase (a TorchDispatchMode counter over a step of --micro-batches at
--count-seq 64 tokens: the op sequence does not depend on the sequence length); --warmup full steps.

    python benchmarks/bench_paper_configs.py                       # default run (see below)
    python benchmarks/bench_paper_configs.py --quick               # smoke run (tiny models), ~20 s
    python benchmarks/bench_paper_configs.py --configs 4t4i,mod_4t4i --rounds 3   # dense is always added
    python benchmarks/bench_paper_configs.py --json /tmp/bench_paper_configs.json

Default run (2 timed rounds) on the quiet 2-core development machine: about 4 minutes (measured 246 s:
building the six models and their loop twins 30 s, the untimed steps at seq 64 40 s, a round of 12
steps 90 s), and 9-15 minutes when other jobs share the machine. A third round adds 1.5-5 min. It
needs ~17 GB of memory: weights, gradients and AdamW state of all six models (1.0 B parameters) stay
alive; --configs runs a subset.
See benchmarks/README.md for what the columns mean.
"""

import argparse
import collections
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tables import source_revision  # benchmarks/tables.py, beside this script

# Megatron warns at import time that Transformer Engine / Apex are absent; that is expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*not installed.*")
warnings.filterwarnings("ignore", message="Apex is not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated.*")

import moma_plugin  # noqa: E402
import moma_plugin.experts as experts_module  # noqa: E402
from moma_plugin.config import MoMaConfig  # noqa: E402
from moma_plugin.flops import training_flops_per_token  # noqa: E402
from moma_plugin.training import arguments, initialize, step  # noqa: E402
from moma_plugin.training.engines.ddp import DDPEngine  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_DIR = ROOT / "examples" / "configs" / "paper"
# Display name -> YAML file of examples/configs/paper; --configs takes the keys of CONFIG_KEYS.
CONFIGS = {"dense": "dense_90m.yaml", "1t1i": "1t1i_90m.yaml", "8x": "8x_90m.yaml",
           "4t4i": "4t4i_90m.yaml", "MoD 1t1i": "mod_1t1i_90m.yaml", "MoD 4t4i": "mod_4t4i_90m.yaml"}
CONFIG_KEYS = {"dense": "dense", "1t1i": "1t1i", "8x": "8x", "4t4i": "4t4i",
               "mod_1t1i": "MoD 1t1i", "mod_4t4i": "MoD 4t4i"}
PHASES = ("forward", "backward", "clip", "optimizer")
# ../shared/PAPER_NOTES.md section 7: training throughput of the 435M-matched models (256 A100s, seq 4096,
# words/s/GPU). Time ratio vs dense = dense words/s / config words/s.
PAPER_WORDS_PER_S = {"dense": 31970, "8x": 28990, "1t1i": 30196, "4t4i": 26424,
                     "MoD 1t1i": 25367, "MoD 4t4i": 22114}
TARGETS = {"1t1i": 1.03, "8x": 1.10, "4t4i": 1.15, "MoD 4t4i": 1.35}
EXECUTION_CANDIDATES = ("auto", "loop", "chunked", "grouped", "padded")
QUICK_MODEL_FLAGS = ["--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "2"]


# -- arguments --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIG_KEYS),
                   help=f"comma-separated subset of {','.join(CONFIG_KEYS)} (dense is always added: "
                        "the ratios need it)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512; --quick 64)")
    p.add_argument("--micro-batch", type=int, default=2, help="samples per micro-batch")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches accumulated per optimizer step (default 4; --quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2; --quick 1)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed full-size steps per config before the rounds (default 0: the untimed "
                        "steps at --count-seq, which allocate gradients and AdamW state, come first anyway)")
    p.add_argument("--count-seq", type=int, default=64,
                   help="sequence length of the untimed allocation and op-count steps (default 64, at most "
                        "--seq; the op count does not depend on it)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the wall-time step (default: the CPUs this process may use)")
    p.add_argument("--no-cpu-pass", dest="cpu_pass", action="store_false",
                   help="skip the 1-thread CPU-time step of each config (halves the run)")
    p.add_argument("--execution", default=None,
                   help="moma_expert_execution of the timed MoMa models (default: moma-pretrain's "
                        "default); the agreement check compares it with 'loop'")
    p.add_argument("--seed", type=int, default=1234, help="seed of every model and of the sampler")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: hidden 64, FFN 256, 2 heads, a quarter of the layers (at least 2), "
                        "seq 64, 2 micro-batches, 1 round")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = p.parse_args(argv)
    fill_defaults(args, p)
    return args


def fill_defaults(args, p):
    quick = args.quick
    args.seq = args.seq or (64 if quick else 512)
    args.micro_batches = args.micro_batches or (2 if quick else 4)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 2)
    args.count_seq = min(args.count_seq, args.seq)
    if args.rounds < 1 or args.warmup < 0 or min(args.seq, args.count_seq, args.micro_batch,
                                                 args.micro_batches) < 1:
        p.error("--rounds, --seq, --count-seq, --micro-batch and --micro-batches must be >= 1, "
                "--warmup >= 0")
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIG_KEYS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIG_KEYS)}")
    chosen = {"dense", *(CONFIG_KEYS[k] for k in keys)}
    args.names = [name for name in CONFIGS if name in chosen]  # the canonical order, dense first
    supported = supported_executions()
    args.supported_executions = supported
    if args.execution is None:  # what moma-pretrain runs when the flag is not given
        args.execution = arguments.parse_args(pretrain_argv("dense", args)).moma_expert_execution
    if not execution_accepted(args.execution):
        p.error(f"--execution {args.execution!r}: this moma_plugin accepts {', '.join(supported)}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def execution_accepted(value) -> bool:
    """Whether this moma_plugin's MoMaConfig takes moma_expert_execution=value (found by trying)."""
    try:
        MoMaConfig(num_layers=1, hidden_size=8, num_attention_heads=1, moma_experts="1t1i",
                   moma_expert_execution=value)
    except ValueError:
        return False
    return True


def supported_executions():
    """The moma_expert_execution values MoMaConfig accepts, of the known names and those that
    moma_plugin.experts lists (an older moma_plugin has no such list)."""
    listed = tuple(getattr(experts_module, "EXECUTIONS", ()))
    return [value for value in dict.fromkeys(EXECUTION_CANDIDATES + listed) if execution_accepted(value)]


def pretrain_argv(name, args):
    """moma-pretrain's command line for config ``name`` at the benchmark's sizes."""
    argv = ["--config", str(PAPER_DIR / CONFIGS[name]), "--seq-length", str(args.seq),
            "--micro-batch-size", str(args.micro_batch),
            "--global-batch-size", str(args.micro_batch * args.micro_batches),
            "--seed", str(args.seed), "--no-save", "--no-progress-bar"]
    if args.quick:
        layers = arguments.parse_args(argv).num_layers
        argv += QUICK_MODEL_FLAGS + ["--num-layers", str(max(2, layers // 4))]
    return argv


def pretrain_args(name, args, execution=None):
    """The parsed moma-pretrain arguments of config ``name``. The expert execution is set after parsing:
    the flag's choices may lag behind what MoMaConfig accepts."""
    targs = arguments.parse_args(pretrain_argv(name, args))
    targs.moma_expert_execution = execution or args.execution
    return targs


# -- building ---------------------------------------------------------------------------------------
class Variant:
    """One config: its arguments, model (train mode), its ddp engine (one process: the bare model and
    AdamW), schedule and MoMaConfig."""

    def __init__(self, name, targs, layout, parallel):
        initialize.seed_everything(targs.seed)
        self.name, self.targs = name, targs
        self.model, self.config = initialize.build_model(targs, layout, parallel)
        self.model.train()
        self.engine = DDPEngine(self.model, targs, parallel, initialize.build_optimizer)
        self.optimizer = self.engine.optimizer
        self.scheduler = initialize.build_scheduler(self.optimizer, targs)

    @property
    def num_parameters(self):
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_tensors(self):
        return sum(1 for _ in self.model.parameters())


def data_source(args, parallel, seq):
    """(train split, layout, sampler) of the bundled corpus in samples of ``seq`` tokens, as
    moma-pretrain builds them for 4t4i."""
    data_args = pretrain_args("4t4i", args)
    data_args.seq_length = seq
    train_set, _ = initialize.load_datasets(data_args, parallel)
    sampler, _, _ = initialize.build_sampler(train_set, data_args, parallel, train_set.layout,
                                             announce=lambda message: print(f"note: {message}"))
    return train_set, train_set.layout, sampler


def draw_micro_batches(train_set, sampler, num_micro, parallel):
    """One optimizer step's collated micro-batches (dicts of [b, s] tensors)."""
    return [step.collate([train_set[i] for i in sampler.next_step()[parallel.dp_rank]])
            for _ in range(num_micro)]


def image_share(micro_batches):
    modality_ids = torch.cat([b["modality_ids"].reshape(-1) for b in micro_batches])
    return float((modality_ids == 1).double().mean())


# -- one training step, timed by phase ----------------------------------------------------------------
class PhaseClock:
    """Wall (perf_counter) and CPU (process_time) seconds of the backward, clip and optimizer phases,
    summed over a step's calls; forward is the rest of the step. Tells an op counter, when given, which
    phase is running."""

    def __init__(self, counter=None):
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.counter, self.active = counter, None

    def timed(self, function, phase):
        def wrapper(*args, **kwargs):
            if self.active is not None:  # a phase inside another one: counted there
                return function(*args, **kwargs)
            self.active = phase
            if self.counter is not None:
                self.counter.phase = phase
            wall0, cpu0 = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.wall[phase] += time.perf_counter() - wall0
                self.cpu[phase] += time.process_time() - cpu0
                self.active = None
                if self.counter is not None:
                    self.counter.phase = "forward"
        return wrapper


@contextlib.contextmanager
def phases_of_train_step(variant, clock):
    """While open, what a step calls for its phases runs through ``clock``: Tensor.backward
    (backward), the engine's clip (clip), the optimizer's step and zero_grad and the schedule's step
    (optimizer). Everything else train_step does is its forward phase: the forwards, the loss, the
    per-modality loss sums and the (one-process) all-reduces."""
    targets = [(torch.Tensor, "backward", "backward"), (variant.engine, "clip", "clip"),
               (variant.optimizer, "step", "optimizer"), (variant.optimizer, "zero_grad", "optimizer"),
               (variant.scheduler, "step", "optimizer")]
    saved = []
    for owner, attribute, phase in targets:
        own = attribute in vars(owner)  # an instance attribute to restore, or a class one to unshadow
        saved.append((owner, attribute, own, vars(owner).get(attribute)))
        setattr(owner, attribute, clock.timed(getattr(owner, attribute), phase))
    try:
        yield
    finally:
        for owner, attribute, own, original in reversed(saved):
            if own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)


def instrumented_train_step(variant, micro_batches, layout, parallel, clock):
    """step.train_step itself and the schedule's step, with their phases timed by ``clock``; returns
    (wall s, CPU s, finite)."""
    with phases_of_train_step(variant, clock):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        _, _, finite = step.train_step(variant.engine, micro_batches, layout, variant.targs, parallel)
        variant.scheduler.step(increment=1)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    clock.wall["forward"] = wall - sum(clock.wall.values())
    clock.cpu["forward"] = cpu - sum(clock.cpu.values())
    return wall, cpu, finite


def timed_step(variant, micro_batches, layout, parallel, threads):
    """One step at ``threads`` intra-op threads: {"wall"/"cpu": {phase: ms, "total": ms}, "finite"}."""
    torch.set_num_threads(threads)
    gc.collect()
    clock = PhaseClock()
    wall, cpu, finite = instrumented_train_step(variant, micro_batches, layout, parallel, clock)
    result = {"wall": {phase: 1e3 * clock.wall[phase] for phase in PHASES},
              "cpu": {phase: 1e3 * clock.cpu[phase] for phase in PHASES}, "finite": finite}
    result["wall"]["total"], result["cpu"]["total"] = 1e3 * wall, 1e3 * cpu
    return result


# -- checks outside the timed rounds ------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher (forward and backward alike), per phase."""

    def __init__(self):
        super().__init__()
        self.phase = PHASES[0]
        self.counts = {phase: collections.Counter() for phase in PHASES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(variant, micro_batches, layout, parallel, threads):
    """{phase: aten ops, "total": ..., "top": the 8 most frequent} of one optimizer step."""
    torch.set_num_threads(threads)
    counter = OpCounter()
    clock = PhaseClock(counter)
    with counter:
        instrumented_train_step(variant, micro_batches, layout, parallel, clock)
    result = {phase: sum(counter.counts[phase].values()) for phase in PHASES}
    result["total"] = sum(result.values())
    everything = sum(counter.counts.values(), collections.Counter())
    result["top"] = dict(everything.most_common(8))
    return result


@torch.no_grad()
def forward_mean_loss(model, batch, parallel):
    """The masked mean loss of one forward (train mode, no autograd)."""
    batch = step.to_device(batch, parallel.device)
    loss_BS = step.forward_loss(model, batch)
    return float((loss_BS * batch["loss_mask"]).sum() / batch["loss_mask"].sum())


def loop_agreement(variant, batch, layout, parallel, args):
    """(loss, loss with moma_expert_execution='loop', note) on the same weights, or None for dense
    and when the timed execution is 'loop' itself."""
    if variant.config.is_dense or args.execution == "loop":
        return None
    reference = Variant(variant.name, pretrain_args(variant.name, args, "loop"), layout, parallel)
    note = "same weights (state dict copied)"
    try:
        reference.model.load_state_dict(variant.model.state_dict())
    except (RuntimeError, KeyError) as e:  # other parameter layouts: the same seed must do
        note = f"state dicts differ ({str(e).splitlines()[0][:80]}); same seed instead"
    loss = forward_mean_loss(variant.model, batch, parallel)
    loss_loop = forward_mean_loss(reference.model, batch, parallel)
    del reference
    gc.collect()
    return loss, loss_loop, note


# -- statistics and printing --------------------------------------------------------------------------
def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratios(samples, name, pass_name, clock):
    """Config total / dense total of the same round, over the timed rounds."""
    totals = [s[clock]["total"] for s in samples[name][pass_name]]
    dense = [s[clock]["total"] for s in samples["dense"][pass_name]]
    return [a / b for a, b in zip(totals, dense)]


def phase_medians(samples, name, pass_name, clock):
    steps = samples[name][pass_name]
    return {key: statistics.median(s[clock][key] for s in steps) for key in (*PHASES, "total")}


def paper_ratio(name):
    return PAPER_WORDS_PER_S["dense"] / PAPER_WORDS_PER_S[name]


def print_phase_table(title, results, key, ratio_key, tokens_per_step):
    print(f"\n{title}")
    print("| config | forward | backward | clip | optimizer | total | vs dense [min-max] | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        m, ratio = r[key], r[ratio_key]
        print(f"| {name} | " + " | ".join(f"{m[p]:.1f}" for p in (*PHASES, "total"))
              + f" | {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]"
              + f" | {tokens_per_step / m['total'] * 1e3:,.0f} |")


def print_paper_table(results, cpu_pass):
    print("\nAgainst the paper (time per token vs dense; paper: 435M-matched, 256 A100s, seq 4096)")
    print("| config | ours wall | ours 1-thread CPU | paper | target | within target (wall, CPU) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "dense":
            continue
        wall = r["wall_ratio"]["median"]
        cpu = r["cpu_ratio"]["median"] if cpu_pass else None
        target = TARGETS.get(name)
        within = "-" if target is None else ", ".join(
            "-" if v is None else ("yes" if v <= target else "no") for v in (wall, cpu))
        print(f"| {name} | {wall:.3f} | {'-' if cpu is None else f'{cpu:.3f}'} | "
              f"{paper_ratio(name):.2f} | {'-' if target is None else f'<= {target:.2f}'} | {within} |")


def print_ops_table(ops, args):
    print(f"\naten ops per optimizer step (TorchDispatchMode count of one step of {args.micro_batches} "
          f"micro-batches, at seq {args.count_seq})")
    print("| config | forward | backward | clip | optimizer | total | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for name, o in ops.items():
        print(f"| {name} | " + " | ".join(f"{o[p]:,}" for p in (*PHASES, "total"))
              + f" | {o['total'] / ops['dense']['total']:.2f} |")


def print_preamble(args, tokens_per_step):
    print(f"MoMa paper configs (90M-matched), whole training steps | command: "
          f"{' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} | "
          f"python {platform.python_version()} | {platform.machine()} {os.cpu_count()} CPUs | wall step "
          f"{args.threads} threads, CPU-time step {'1 thread' if args.cpu_pass else 'off'}")
    print(f"moma_plugin {moma_plugin.__file__} ({source_revision()}); expert execution timed: "
          f"{args.execution!r} (MoMaConfig accepts {', '.join(args.supported_executions)})")
    print(f"step: {args.micro_batches} micro-batches x {args.micro_batch} x {args.seq} tokens = "
          f"{tokens_per_step:,} tokens (bundled:interleaved, the 4t4i config's balanced sampler); untimed "
          f"allocation and op-count steps at seq {args.count_seq}, {args.warmup} full-size warm-up step(s), "
          f"{args.rounds} timed round(s); seed {args.seed}", flush=True)


def print_models(variants, flops, share):
    print(f"models (FLOPs at the timed batches' image share {share:.1%}):")
    for name, v in variants.items():
        c = v.config
        print(f"  {name:9s} {c.num_layers} layers, hidden {c.hidden_size}, FFN {c.ffn_hidden_size}, "
              f"experts {c.moma_experts}, MoD layers {c.num_mod_layers}: {v.num_parameters / 1e6:.1f}M "
              f"params in {v.num_tensors} tensors, vocab {v.model.vocab_size}, "
              f"{flops[name] / 1e6:.1f} MFLOP/token ({flops[name] / flops['dense']:.3f} x dense)")



# -- the run ----------------------------------------------------------------------------------------
def build_variants(args, layout, parallel, first_batch):
    """Every config's Variant, each checked against its loop execution right after building (same
    initial weights)."""
    variants, agreement = {}, {}
    for name in args.names:
        start = time.perf_counter()
        variants[name] = Variant(name, pretrain_args(name, args), layout, parallel)
        checked = loop_agreement(variants[name], first_batch, layout, parallel, args)
        if checked is not None:
            agreement[name] = checked
        print(f"built {name} ({time.perf_counter() - start:.0f} s"
              + (", and its loop twin" if checked else "") + ")", flush=True)
    return variants, agreement


def print_agreement(agreement, execution):
    if not agreement:
        print("agreement with the loop execution: nothing to compare (dense only, or 'loop' timed)")
        return 0.0
    diffs = {name: abs(loss - loss_loop) for name, (loss, loss_loop, _) in agreement.items()}
    relative = max(diffs[name] / abs(agreement[name][1]) for name in diffs)
    notes = sorted({note for _, _, note in agreement.values()})
    print(f"max |loss - loss_loop| ({execution!r} vs 'loop', one forward, {'; '.join(notes)}): "
          f"{max(diffs.values()):.3e}, relative {relative:.3e} | "
          + ", ".join(f"{name} {agreement[name][1]:.5f} ({d:.1e})" for name, d in diffs.items()))
    return relative


def untimed_round(args, variants, micro_batches, layout, parallel, count=False):
    """One untimed step per config at --threads; with ``count``: {name: aten op counts} of it."""
    start, ops = time.perf_counter(), {}
    for name, variant in variants.items():
        if count:
            ops[name] = count_ops(variant, micro_batches, layout, parallel, args.threads)
        else:
            timed_step(variant, micro_batches, layout, parallel, args.threads)
    return ops, time.perf_counter() - start


def warm_up(args, variants, data, short_data, layout, parallel):
    """Untimed, interleaved, at --threads: a one-micro-batch step per config (it allocates gradients and
    AdamW state, so that no timed step or op count pays for that), a step of --micro-batches under the
    op counter, both on --count-seq samples (the aten ops a step issues do not depend on the sequence
    length), then --warmup full-size steps. Returns the op counts."""
    short_set, short_sampler = short_data
    _, seconds = untimed_round(args, variants, draw_micro_batches(short_set, short_sampler, 1, parallel),
                               layout, parallel)
    print(f"warm-up: a one-micro-batch step per config at seq {args.count_seq} ({seconds:.0f} s)",
          flush=True)
    ops, seconds = untimed_round(args, variants, draw_micro_batches(
        short_set, short_sampler, args.micro_batches, parallel), layout, parallel, count=True)
    print(f"aten ops counted: a step of {args.micro_batches} micro-batches at seq {args.count_seq} per "
          f"config ({seconds:.0f} s)", flush=True)
    for index in range(args.warmup):
        micro_batches = draw_micro_batches(*data, args.micro_batches, parallel)
        _, seconds = untimed_round(args, variants, micro_batches, layout, parallel)
        print(f"warm-up step {index + 1}/{args.warmup} ({seconds:.0f} s)", flush=True)
    return ops


def run_rounds(args, variants, train_set, sampler, layout, parallel):
    """The timed rounds; samples[name][pass] is a list of timed_step results."""
    passes = [("wall", args.threads)] + ([("cpu", 1)] if args.cpu_pass else [])
    samples = {name: {p: [] for p, _ in passes} for name in variants}
    for r in range(args.rounds):
        micro_batches = draw_micro_batches(train_set, sampler, args.micro_batches, parallel)
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        start, line = time.perf_counter(), []
        for name in order:
            totals = []
            for pass_name, threads in passes:
                result = timed_step(variants[name], micro_batches, layout, parallel, threads)
                samples[name][pass_name].append(result)
                if not result["finite"]:
                    print(f"warning: {name}: train_step found a non-finite loss or gradient norm and "
                          "skipped the optimizer step", flush=True)
                totals.append(f"{result[pass_name]['total']:.0f}")
            line.append(f"{name} {'/'.join(totals)}")
        torch.set_num_threads(args.threads)
        print(f"round {r + 1}/{args.rounds} ({time.perf_counter() - start:.0f} s), step ms (wall"
              + ("/1-thread CPU" if args.cpu_pass else "") + f"): {', '.join(line)}", flush=True)
    return samples


def collect_results(samples, args):
    results = {}
    for name in samples:
        r = {"wall_ms": phase_medians(samples, name, "wall", "wall"),
             "wall_ratio": summary(paired_ratios(samples, name, "wall", "wall"))}
        if args.cpu_pass:
            r["cpu_ms"] = phase_medians(samples, name, "cpu", "cpu")
            r["cpu_ratio"] = summary(paired_ratios(samples, name, "cpu", "cpu"))
        results[name] = r
    return results


def write_json(path, args, variants, flops, results, samples, ops, agreement, relative, seconds):
    record = {
        "benchmark": "bench_paper_configs", "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__, "moma_plugin": moma_plugin.__file__, "revision": source_revision(),
        "threads": args.threads, "cpu_pass": args.cpu_pass, "execution": args.execution,
        "setup": {"seq": args.seq, "micro_batch": args.micro_batch, "micro_batches": args.micro_batches,
                  "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed, "quick": args.quick},
        "configs": {name: {"parameters": v.num_parameters, "tensors": v.num_tensors,
                           "flops_per_token": flops[name], "results": results[name],
                           "ops": ops[name], "samples": samples[name],
                           "paper_ratio": None if name == "dense" else paper_ratio(name),
                           "target": TARGETS.get(name)} for name, v in variants.items()},
        "agreement": {name: {"loss": a[0], "loss_loop": a[1], "note": a[2]}
                      for name, a in agreement.items()},
        "max_relative_loss_difference": relative, "seconds": seconds,
    }
    Path(path).write_text(json.dumps(record, indent=1))


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parallel = initialize.setup_parallel(pretrain_args("dense", args))
    train_set, layout, sampler = data_source(args, parallel, args.seq)
    short_set, short_sampler = train_set, sampler
    if args.count_seq != args.seq:
        short_set, _, short_sampler = data_source(args, parallel, args.count_seq)
    first_batches = draw_micro_batches(train_set, sampler, args.micro_batches, parallel)
    tokens_per_step = args.micro_batches * args.micro_batch * args.seq
    print_preamble(args, tokens_per_step)
    variants, agreement = build_variants(args, layout, parallel, first_batches[0])
    share = image_share(first_batches)
    flops = {name: training_flops_per_token(v.config, args.seq, v.model.vocab_size, [1 - share, share])
             for name, v in variants.items()}
    print_models(variants, flops, share)
    relative = print_agreement(agreement, args.execution)
    ops = warm_up(args, variants, (train_set, sampler), (short_set, short_sampler), layout, parallel)
    print(f"timed rounds (each config: a {args.threads}-thread step"
          + (", then a 1-thread step" if args.cpu_pass else "") + "; odd rounds in reverse order):",
          flush=True)
    samples = run_rounds(args, variants, train_set, sampler, layout, parallel)
    results = collect_results(samples, args)
    print_phase_table(f"Wall time, {args.threads} threads: median ms per optimizer step "
                      f"({tokens_per_step:,} tokens), ratio paired by round", results, "wall_ms",
                      "wall_ratio", tokens_per_step)
    if args.cpu_pass:
        print_phase_table("CPU time, 1 thread (time.process_time): median ms per optimizer step; "
                          "tokens/s at 1 thread", results, "cpu_ms", "cpu_ratio", tokens_per_step)
    print_paper_table(results, args.cpu_pass)
    print_ops_table(ops, args)
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n(whole run {seconds:.0f} s, peak memory {peak_gb:.1f} GB)")
    if args.json:
        write_json(args.json, args, variants, flops, results, samples, ops, agreement, relative, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
