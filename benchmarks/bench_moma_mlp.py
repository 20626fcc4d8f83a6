"""Speed of one MoMa MLP layer (4t4i) in its three expert executions, against a FLOPs-matched dense MLP.

Measured in one run, interleaved round by round so that machine drift hits every path alike:

  loop     MoMaMLP, moma_expert_execution="loop": expert by expert over views of the stacked weights,
           under autograd (the reference)
  chunked  MoMaMLP, moma_expert_execution="chunked": the same with a hand-written backward that
           writes each expert's gradient in place (what "auto" picks on CPU)
  grouped  MoMaMLP, moma_expert_execution="grouped": two torch._grouped_mm calls (when the shapes allow)
  padded   MoMaMLP, moma_expert_execution="padded": scatter to [E, C_max, H], two bmm, gather back
  dense    Megatron's MLP (ColumnParallelLinear + RowParallelLinear, SwiGLU) of the same FFN size

With capacity factor 1 and 4 experts per modality, each expert takes a quarter of its modality's tokens,
so every token passes through one expert FFN on average: the same matmul FLOPs per token as the dense
FFN. Times cover the whole layer (routing, dispatch, experts, combine, metrics) on [s, b, d] hidden states.

    python benchmarks/bench_moma_mlp.py                      # default run, CPU (under a minute on 2 cores)
    python benchmarks/bench_moma_mlp.py --quick              # smoke run, a few seconds
    python benchmarks/bench_moma_mlp.py --device cuda        # bf16 on CUDA (grouped needs Hopper+)
    python benchmarks/bench_moma_mlp.py --json results.json  # also write the results as JSON

See benchmarks/README.md for what the columns mean.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from tables import init_megatron_single_process, print_markdown_table  # benchmarks/tables.py, beside this script

# Megatron warns at import time that Transformer Engine / Apex are absent; that is expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*not installed.*")
warnings.filterwarnings("ignore", message="Apex is not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated.*")

import moma_plugin as mp  # noqa: E402
import moma_plugin.experts as experts_module  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402

PATHS = ("loop", "chunked", "grouped", "padded", "dense")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="parameter/activation dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length s")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size b (tokens = s*b)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size d")
    p.add_argument("--ffn", type=int, default=None, help="FFN hidden size (default 4*d)")
    p.add_argument("--experts", default="4t4i", help="MoMa expert groups (default 4t4i)")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--image-fraction", type=float, default=0.5,
                   help="probability that a token is an image token (modality 1); default half")
    p.add_argument("--balanced", action="store_true",
                   help="moma_force_balanced_routing (every expert the same load; default: learned "
                        "expert choice, whose load is the same anyway: each expert takes k_e tokens)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per path and mode (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repeats per path and mode first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the CPUs this process may use)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma-separated subset of {','.join(PATHS)} (ratios need their baselines)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 warm-up + 3 timed repeats (unless given), same shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 50
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.ffn is None:
        args.ffn = 4 * args.hidden
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = [x for x in args.paths if x not in PATHS]
    if unknown or not args.paths:
        p.error(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False (this torch is "
                f"{torch.__version__}); run on CPU or install a CUDA build of torch")
    return args



def make_config(args, **overrides) -> mp.MoMaConfig:
    dtype = DTYPES[args.dtype]
    values = dict(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=1, ffn_hidden_size=args.ffn,
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, moma_experts=args.experts,
        moma_capacity_factor=args.capacity_factor,
        moma_force_balanced_routing=args.balanced,
    )
    values.update(overrides)
    return mp.MoMaConfig(**values)


def build_moma(args, execution: str):
    """A MoMaMLP from the local spec; the same seed gives every execution the same weights."""
    config = make_config(args, moma_expert_execution=execution)
    torch.manual_seed(args.seed)
    spec = mp.get_moma_layer_spec(config, use_te=False).submodules.mlp
    return build_module(spec, config=config).to(args.device)


def build_dense(args):
    """Megatron's MLP with the experts' FFN: SwiGLU, d -> ffn -> d, no bias."""
    config = make_config(args, moma_experts="dense")
    torch.manual_seed(args.seed)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return MLP(config, submodules, ffn_hidden_size=args.ffn).to(args.device)


class Case:
    """One path: a module and how to call it on the shared input."""

    def __init__(self, name, module, layout=None):
        self.name, self.module, self.layout = name, module, layout
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self, hidden_SBH):
        if self.layout is None:
            out, bias = self.module(hidden_SBH)
        else:
            # A fresh layout object per call (same tensors, new forward_id), as every training step
            # brings one: MoMaMLP then records its routing metrics each call, as it does in training.
            layout = mp.ModalityLayout(self.layout.modality_ids_T, self.layout.order_T,
                                       self.layout.counts)
            with self.module.routing_layout(layout):
                out, bias = self.module(hidden_SBH)
        return out if bias is None else out + bias


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clear_grads(case, hidden_SBH):
    for p in case.params:
        p.grad = None
    hidden_SBH.grad = None


def run_once(case, hidden_SBH, grad_SBH, mode, device):
    """One timed call: "fwd" (autograd recording, as in training) or "fwd+bwd"; returns (wall seconds,
    CPU seconds of the process: all its threads)."""
    clear_grads(case, hidden_SBH)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = case(hidden_SBH)
    if mode == "fwd+bwd":
        # A real loss: (y * fixed random).sum() gives a dense, contiguous gradient (y.sum() would give
        # a stride-0 one, which torch._grouped_mm's backward does not take).
        (out * grad_SBH).sum().backward()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


@contextlib.contextmanager
def record_expert_runners(calls):
    """Appends to ``calls`` the name of every expert runner MoMaMLP.compute calls while open (it looks
    the runners up in moma_plugin.experts at call time), to check which path each case really takes."""
    names = ("run_experts_loop", "run_experts_chunked", "run_experts_grouped", "run_experts_padded")
    originals = {n: getattr(experts_module, n) for n in names}

    def wrap(n):
        def runner(*a, **k):
            calls.append(n.replace("run_experts_", ""))
            return originals[n](*a, **k)
        return runner

    for n in names:
        setattr(experts_module, n, wrap(n))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(experts_module, n, f)


def executed_runners(cases, hidden_SBH):
    """{path: the expert runner its forward called} for the MoMa paths."""
    executed = {}
    with torch.no_grad():
        for name, case in cases.items():
            if case.layout is None:
                continue
            calls = []
            with record_expert_runners(calls):
                case(hidden_SBH)
            executed[name] = ",".join(calls)
    return executed


def check_agreement(cases, hidden_SBH, dtype):
    """Max |out - out_loop| of each path (same weights, same routing): the fast paths must agree."""
    if "loop" not in cases:
        return {}
    with torch.no_grad():
        reference = cases["loop"](hidden_SBH).float()
        diffs = {}
        for name, case in cases.items():
            if name in ("loop", "dense"):
                continue
            diffs[name] = (case(hidden_SBH).float() - reference).abs().max().item()
    return diffs


def median_ms(samples):
    return 1e3 * statistics.median(samples)


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count())
    torch.set_num_threads(threads)
    init_megatron_single_process()
    dtype, device = DTYPES[args.dtype], args.device

    gen = torch.Generator().manual_seed(args.seed)
    hidden_SBH = torch.randn(args.seq, args.batch, args.hidden, generator=gen).to(device, dtype)
    hidden_SBH.requires_grad_(True)
    grad_SBH = torch.randn(args.seq, args.batch, args.hidden, generator=gen).to(device, dtype)
    modality_ids_SB = (torch.rand(args.seq, args.batch, generator=gen) < args.image_fraction).long()
    config = make_config(args)
    num_modalities = config.num_modalities
    modality_ids_SB = modality_ids_SB.clamp(max=num_modalities - 1).to(device)
    layout = mp.build_modality_layout(modality_ids_SB, num_modalities)

    cases = {}
    for name in args.paths:
        if name == "dense":
            cases[name] = Case(name, build_dense(args))
        else:
            cases[name] = Case(name, build_moma(args, name), layout)
    for case in cases.values():
        case.module.train()

    diffs = check_agreement(cases, hidden_SBH.detach(), dtype)
    # Which runner each MoMa path really calls: "grouped" takes torch._grouped_mm only where
    # grouped_mm_supported allows (dtype, device, 16-byte strides), else it falls back to padded.
    executed = executed_runners(cases, hidden_SBH.detach())
    grouped_runs_grouped_mm = executed["grouped"] == "grouped" if "grouped" in executed else None
    allowed = {"loop": ("loop",), "chunked": ("chunked",), "grouped": ("grouped", "padded"),
               "padded": ("padded",)}
    for name, runner in executed.items():
        if runner not in allowed[name]:
            raise RuntimeError(f"path {name!r} ran expert runner {runner!r}, expected one of "
                               f"{allowed[name]}: the benchmark would mislabel it")

    num_tokens = args.seq * args.batch
    capacities = {
        g.name: mp.expert_capacity(layout.token_count(g.modalities), g.num_experts,
                                   args.capacity_factor)
        for g in config.moma_expert_groups
    }
    routed = sum(capacities[g.name] * g.num_experts for g in config.moma_expert_groups)
    # SwiGLU FFN matmul FLOPs per token: fc1 d -> 2F and fc2 F -> d, 2 FLOPs per multiply-add.
    ffn_flops_per_token = 2 * (args.hidden * 2 * args.ffn + args.ffn * args.hidden)

    print(f"MoMa MLP benchmark: {args.experts} vs dense | tokens {num_tokens} "
          f"([s={args.seq}, b={args.batch}, d={args.hidden}]), ffn {args.ffn}, SwiGLU, no bias | "
          f"{device} {args.dtype}, {threads} threads, torch {torch.__version__}")
    print(f"modality tokens {dict(zip(config.moma_modalities, layout.counts))}; tokens per expert "
          f"{capacities}; routed (token, expert) pairs {routed} = {routed / num_tokens:.3f} x tokens "
          f"(dense: 1.000); {'balanced' if args.balanced else 'expert-choice'} routing")
    if grouped_runs_grouped_mm is not None:
        print(f"'grouped' runs torch._grouped_mm here: {grouped_runs_grouped_mm}"
              + ("" if grouped_runs_grouped_mm else " (it falls back to the padded bmm path)"))
    if executed:
        print("expert runner each path called: "
              + ", ".join(f"{k} -> run_experts_{v}" for k, v in executed.items()))
    if diffs:
        print("max |out - out_loop|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print(f"warm-up {args.warmup}, timed repeats {args.repeats} per path and mode (median), "
          "paths interleaved round by round", flush=True)

    modes = ("fwd", "fwd+bwd")
    samples = {name: {mode: [] for mode in modes} for name in cases}
    peak_mib = {name: {} for name in cases}
    wall_start = time.perf_counter()
    for mode in modes:
        for _ in range(args.warmup):
            for case in cases.values():
                run_once(case, hidden_SBH, grad_SBH, mode, device)
        for _ in range(args.repeats):
            for name, case in cases.items():
                samples[name][mode].append(run_once(case, hidden_SBH, grad_SBH, mode, device))
        if device == "cuda":  # one extra call per path with the peak counter reset
            for name, case in cases.items():
                clear_grads(case, hidden_SBH)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run_once(case, hidden_SBH, grad_SBH, mode, device)
                peak_mib[name][mode] = (torch.cuda.max_memory_allocated() - base) / 2**20
    wall_s = time.perf_counter() - wall_start

    results = {}
    for name in cases:
        results[name] = {}
        for mode in modes:
            wall = [w for w, _ in samples[name][mode]]
            cpu = [c for _, c in samples[name][mode]]
            med = statistics.median(wall)
            entry = {
                "median_ms": 1e3 * med,
                "cpu_median_ms": 1e3 * statistics.median(cpu),
                "min_ms": 1e3 * min(wall),
                "max_ms": 1e3 * max(wall),
                "samples_ms": [round(1e3 * x, 4) for x in wall],
                "cpu_samples_ms": [round(1e3 * x, 4) for x in cpu],
                # Matmul throughput counting only the FFN matmuls (fwd: x1, fwd+bwd: x3).
                "ffn_gflops_per_s": (ffn_flops_per_token * num_tokens * (1 if mode == "fwd" else 3)
                                     / med / 1e9),
            }
            if mode in peak_mib[name]:
                entry["peak_extra_mib"] = peak_mib[name][mode]
            results[name][mode] = entry

    def ratio(a, b, mode):
        """Median (and quartiles) of the per-round ratios time(a) / time(b), wall clock."""
        if a not in samples or b not in samples:
            return None
        paired = [wa / wb for (wa, _), (wb, _) in zip(samples[a][mode], samples[b][mode])]
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        return {"median": statistics.median(paired), "q1": quartiles[0], "q3": quartiles[2]}

    ratios = {}
    for mode in modes:
        ratios[mode] = {
            "chunked_speedup_vs_loop": ratio("loop", "chunked", mode),
            "grouped_speedup_vs_loop": ratio("loop", "grouped", mode),
            "padded_speedup_vs_loop": ratio("loop", "padded", mode),
            "loop_time_vs_dense": ratio("loop", "dense", mode),
            "chunked_time_vs_dense": ratio("chunked", "dense", mode),
            "grouped_time_vs_dense": ratio("grouped", "dense", mode),
            "padded_time_vs_dense": ratio("padded", "dense", mode),
        }

    print_table(results, ratios, modes, device, grouped_fell_back=grouped_runs_grouped_mm is False)
    print(f"(timed section {wall_s:.1f} s)")

    if args.json:
        record = {
            "benchmark": "bench_moma_mlp",
            "date": datetime.date.today().isoformat(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": {
                "device": device,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "threads": threads,
                "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "setup": {
                "experts": args.experts, "tokens": num_tokens, "seq": args.seq,
                "batch": args.batch, "hidden": args.hidden, "ffn": args.ffn, "dtype": args.dtype,
                "capacity_factor": args.capacity_factor, "balanced_routing": args.balanced,
                "modality_counts": dict(zip(config.moma_modalities, layout.counts)),
                "tokens_per_expert": capacities, "routed_pairs": routed,
                "warmup": args.warmup, "repeats": args.repeats,
                "grouped_runs_grouped_mm": grouped_runs_grouped_mm,
                "expert_runner_called": executed,
                "max_abs_diff_vs_loop": diffs,
            },
            "results": results,
            "ratios": ratios,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return results, ratios


def print_table(results, ratios, modes, device, grouped_fell_back=False):
    has_peak = device == "cuda"
    header = ["path"]
    for mode in modes:
        header += [f"{mode} ms", f"{mode} cpu ms", f"{mode} vs loop", f"{mode} vs dense"]
        if has_peak:
            header.append(f"{mode} peak MiB")
    versus = {"loop": "loop_time_vs_dense", "chunked": "chunked_time_vs_dense",
              "grouped": "grouped_time_vs_dense",
              "padded": "padded_time_vs_dense"}
    speedup = {"chunked": "chunked_speedup_vs_loop", "grouped": "grouped_speedup_vs_loop",
               "padded": "padded_speedup_vs_loop"}
    rows = []
    for name, res in results.items():
        row = [name + (" (ran padded)" if name == "grouped" and grouped_fell_back else "")]
        for mode in modes:
            row += [f"{res[mode]['median_ms']:.2f}", f"{res[mode]['cpu_median_ms']:.2f}"]
            fast = ratios[mode].get(speedup.get(name, ""))
            row.append("1.00x" if name == "loop" else f"{fast['median']:.2f}x" if fast else "-")
            dense = ratios[mode].get(versus.get(name, ""))
            row.append("1.00" if name == "dense" else
                       f"{dense['median']:.2f} [{dense['q1']:.2f}-{dense['q3']:.2f}]" if dense else "-")
            if has_peak:
                row.append(f"{res[mode].get('peak_extra_mib', float('nan')):.1f}")
        rows.append(row)
    print_markdown_table(header, rows)
    print("ms: median wall time; cpu ms: median CPU time of the process (all threads; run with "
          "--threads 1 for 1-thread CPU time)")
    print("'vs loop' = median of per-round loop time / path time (speed-up over the reference loop);")
    print("'vs dense' = median [quartiles] of per-round path time / dense time (<1 is faster than dense)")
    for mode in modes:
        parts = [f"{k} {v['median']:.2f}" for k, v in ratios[mode].items() if v is not None]
        print(f"{mode}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
