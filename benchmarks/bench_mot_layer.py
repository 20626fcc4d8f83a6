"""Speed of one Mixture-of-Transformers (MoT) layer, forward + backward, against the dense layer and MoMa.

One whole transformer layer (``MoMaTransformerLayer`` from ``moma_plugin.get_moma_layer_spec(config,
use_te=False)``: norms, self-attention, FFN, residuals) in each variant, at the same sizes:

  dense     moma_experts="dense": Megatron's layer with a SwiGLU FFN (the baseline)
  mot       moma_experts="1t1i", mot="all": MoT, attention projections, norms and FFN untied per modality
  mot-ffn   moma_experts="1t1i", mot="ffn": only the FFN untied (one plain FFN per modality, no router)
  4t4i      moma_experts="4t4i": MoMa, 4 text + 4 image experts, expert-choice routing, capacity factor 1
  (optional, --variants: mot-4t1i = 4t1i with mot="all", MoT + text MoE; 1t1i = MoMa 1t1i without MoT)

All do the same matmul FLOPs per token up to 4t4i's routers (the script prints them from
moma_plugin.flops): MoT unties weights, not compute. Hidden states [s, b, d] with modality ids in
interleaved text/image spans (about half image; --span sets the mean span length), the same input, output
gradient and layout for every variant.

A call is the layer's forward (training mode, autograd recording) plus the backward of
``(y * fixed_random).sum()`` (gradients of the input and of every parameter; parameter gradients are kept
and zeroed in place outside the timed region, as training on CPU keeps them). Each round runs every
variant twice: one call at --threads intra-op threads, whose wall time (time.perf_counter) goes into the
wall table, and one at 1 thread, whose CPU time (time.process_time) goes into the 1-thread CPU table,
which waiting for a descheduled thread on a shared machine does not inflate. Variants run in the order
above, reversed in odd rounds; a ratio is variant time / dense time of the same round, and the tables give
the median [quartiles] over the rounds.

    python benchmarks/bench_mot_layer.py                 # default: d 512, ffn 2048, 8 heads, 4,096 tokens
    python benchmarks/bench_mot_layer.py --quick         # smoke run: tiny layer, 1 + 3 rounds, seconds
    python benchmarks/bench_mot_layer.py --json results.json   # also write everything (samples) as JSON

Columns: fwd ms, bwd ms, fwd+bwd ms are medians over the rounds (of the parts and of the whole call
separately, so they need not add up); "fwd vs dense", "bwd vs dense": median per-round ratio to dense of
that part; "fwd+bwd vs dense [q1-q3]": median [quartiles] of the per-round ratio of the whole call (< 1:
faster than dense); tokens/s: tokens per median fwd+bwd (in the CPU table: at 1 thread). The conventions
(interleaving, paired ratios, wall beside 1-thread CPU time) are those of benchmarks/README.md.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tables import init_megatron_single_process, print_markdown_table, source_revision  # beside this script

# Megatron warns at import time that Transformer Engine / Apex are absent; that is expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*not installed.*")
warnings.filterwarnings("ignore", message="Apex is not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated.*")

import moma_plugin as mp  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from moma_plugin.flops import forward_flops_per_token  # noqa: E402

# name -> (moma_experts, mot parts, what it is)
VARIANTS = {
    "dense": ("dense", "", "dense layer (SwiGLU FFN)"),
    "mot": ("1t1i", "all", "MoT: attention projections, norms, FFN untied"),
    "mot-ffn": ("1t1i", "ffn", "MoT, FFN untied only"),
    "4t4i": ("4t4i", "", "MoMa 4t4i, expert choice"),
    "mot-4t1i": ("4t1i", "all", "MoT + text MoE (4 text experts)"),
    "1t1i": ("1t1i", "", "MoMa 1t1i (routed, attention tied)"),
}
DEFAULT_VARIANTS = ("dense", "mot", "mot-ffn", "4t4i")
MODALITIES = ("text", "image")
PASSES = ("wall", "cpu")


# -- arguments --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (dense is always added: the "
                        "ratios need it)")
    p.add_argument("--seq", type=int, default=None, help="sequence length s (default 1024; --quick 128)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size b (default 4; --quick 2)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size d (default 512; --quick 64)")
    p.add_argument("--ffn", type=int, default=None, help="FFN hidden size (default 4 x d)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8; --quick 4)")
    p.add_argument("--image-fraction", type=float, default=0.5,
                   help="expected share of image tokens (modality 1); default half")
    p.add_argument("--span", type=int, default=None,
                   help="mean length of a text or image span in a sequence (spans alternate, lengths "
                        "random; 1 gives nearly per-token alternation); default 64, --quick 16")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default 2; --quick 1); the first allocates the gradients")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the wall-time call (default: the CPUs this process may use)")
    p.add_argument("--no-cpu-pass", dest="cpu_pass", action="store_false",
                   help="skip the 1-thread CPU-time call of each variant (halves the run)")
    p.add_argument("--execution", default="auto",
                   help="moma_expert_execution of the expert layers (default auto, as moma-pretrain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: seq 128 x batch 2, d 64, ffn 256, 4 heads, 1 warm-up + 3 timed rounds")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(seq=(128, 1024), batch=(2, 4), hidden=(64, 512), heads=(4, 8), span=(16, 64),
                    rounds=(3, 10), warmup=(1, 2))
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    args.ffn = args.ffn or 4 * args.hidden
    if min(args.seq, args.batch, args.hidden, args.ffn, args.heads, args.span, args.rounds) < 1 \
            or args.warmup < 0:
        p.error("--seq, --batch, --hidden, --ffn, --heads, --span and --rounds must be >= 1, --warmup >= 0")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if not 0 < args.image_fraction < 1:
        p.error("--image-fraction must be in (0, 1): every variant needs both modalities")
    names = [x.strip() for x in args.variants.split(",") if x.strip()]
    unknown = [x for x in names if x not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    chosen = {"dense", *names}
    args.names = [name for name in VARIANTS if name in chosen]  # the canonical order, dense first
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return args


# -- building ---------------------------------------------------------------------------------------

def make_config(args, name) -> mp.MoMaConfig:
    experts, mot, _ = VARIANTS[name]
    return mp.MoMaConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        normalization="RMSNorm", add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, moma_modalities=MODALITIES, moma_experts=experts, mot=mot,
        moma_capacity_factor=1.0, moma_expert_execution=args.execution,
    )


class Variant:
    """One layer (training mode) built from the local spec, with its config and FLOPs per token."""

    def __init__(self, name, args):
        self.name = name
        self.config = make_config(args, name)
        torch.manual_seed(args.seed)
        self.layer = build_module(mp.get_moma_layer_spec(self.config, use_te=False), config=self.config,
                                  layer_number=1)
        self.layer.train()
        self.params = [p for p in self.layer.parameters() if p.requires_grad]
        flops = forward_flops_per_token(self.config, args.seq, 0)
        self.forward_flops = flops["total"] - flops["logits"]

    @property
    def num_parameters(self):
        return sum(p.numel() for p in self.params)

    def check_structure(self):
        """Stops if the layer is not what the variant's name says (so that no row is mislabelled):
        per-modality (stacked) attention and norm weights exactly under mot='all', the expected number
        of FFN experts, a router exactly when some group has several experts."""
        experts, mot, _ = VARIANTS[self.name]
        named = dict(self.layer.named_parameters())
        untied_attention = named["self_attention.linear_qkv.weight"].dim() == 3
        untied_norms = named["input_layernorm.weight"].dim() == 2
        want_untied = mot == "all"
        num_experts = sum(g.num_experts for g in self.config.moma_expert_groups)
        stacked = named.get("mlp.experts.fc1_weight")
        has_router = any(n.startswith("mlp.router.") for n in named)
        problems = []
        if untied_attention != want_untied or untied_norms != want_untied:
            problems.append(f"attention untied {untied_attention}, norms untied {untied_norms}")
        if experts == "dense" and stacked is not None or experts != "dense" and (
                stacked is None or stacked.shape[0] != num_experts):
            problems.append(f"FFN experts {None if stacked is None else stacked.shape[0]}")
        if has_router != any(g.routed for g in self.config.moma_expert_groups):
            problems.append(f"router {has_router}")
        if problems:
            raise RuntimeError(f"variant {self.name!r} ({experts}, mot={mot or '-'}) built a layer with "
                               f"{'; '.join(problems)}: the benchmark would mislabel it")

    def structure(self):
        named = dict(self.layer.named_parameters())
        attention = "untied" if named["self_attention.linear_qkv.weight"].dim() == 3 else "shared"
        groups = self.config.moma_expert_groups
        ffn = "dense" if not groups else ", ".join(
            f"{g.name} {g.num_experts} expert{'s' if g.num_experts > 1 else ''}"
            + (" (routed)" if g.routed else " (untied, no router)") for g in groups)
        return f"attention/norms {attention}, FFN {ffn}"


def modality_ids(args, generator):
    """[s, b] modality ids: per sequence, alternating text and image spans of random lengths (mean
    --span x 2 x the modality's share, so the image share is about --image-fraction), each sequence
    starting with a random modality."""
    mean = {0: 2 * args.span * (1 - args.image_fraction), 1: 2 * args.span * args.image_fraction}
    columns = []
    for _ in range(args.batch):
        ids, modality = [], int(torch.randint(0, 2, (1,), generator=generator))
        while len(ids) < args.seq:
            high = max(1, round(2 * mean[modality] - 1))
            length = int(torch.randint(1, high + 1, (1,), generator=generator))
            ids += [modality] * length
            modality = 1 - modality
        columns.append(torch.tensor(ids[:args.seq]))
    return torch.stack(columns, dim=1)


# -- timing -----------------------------------------------------------------------------------------
def timed_call(variant, inputs, threads):
    """One forward + backward at ``threads`` intra-op threads: {"wall"/"cpu": {"fwd", "bwd", "total"}}
    in ms. The parameter gradients are zeroed in place first (untimed); a fresh layout object (same
    tensors, new forward_id) per call, as every training forward brings one, so that the expert layers
    record their routing metrics each call as in training."""
    hidden_SBH, grad_SBH, layout = inputs
    torch.set_num_threads(threads)
    for p in variant.params:
        if p.grad is not None:
            p.grad.zero_()
    hidden_SBH.grad = None
    gc.collect()
    fresh = mp.ModalityLayout(layout.modality_ids_T, layout.order_T, layout.counts)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = variant.layer(hidden_SBH, attention_mask=None, modality_layout=fresh)
    out = out[0] if isinstance(out, tuple) else out
    wall1, cpu1 = time.perf_counter(), time.process_time()
    (out * grad_SBH).sum().backward()
    wall2, cpu2 = time.perf_counter(), time.process_time()
    return {"wall": {"fwd": 1e3 * (wall1 - wall0), "bwd": 1e3 * (wall2 - wall1), "total": 1e3 * (wall2 - wall0)},
            "cpu": {"fwd": 1e3 * (cpu1 - cpu0), "bwd": 1e3 * (cpu2 - cpu1), "total": 1e3 * (cpu2 - cpu0)},
            "finite": bool(torch.isfinite(out.detach()).all())}


def one_round(args, variants, inputs, order):
    """{name: {"wall": call at --threads, "cpu": call at 1 thread}} for one round, in ``order``."""
    passes = [("wall", args.threads)] + ([("cpu", 1)] if args.cpu_pass else [])
    return {name: {pass_name: timed_call(variants[name], inputs, threads) for pass_name, threads in passes}
            for name in order}


def run_rounds(args, variants, inputs):
    samples = {name: {p: [] for p in PASSES} for name in variants}
    names = list(variants)
    for index in range(args.warmup):
        start = time.perf_counter()
        one_round(args, variants, inputs, names if index % 2 == 0 else names[::-1])
        print(f"warm-up round {index + 1}/{args.warmup} ({time.perf_counter() - start:.0f} s)", flush=True)
    for index in range(args.rounds):
        start = time.perf_counter()
        order = names if index % 2 == 0 else names[::-1]
        result = one_round(args, variants, inputs, order)
        line = []
        for name in order:
            for pass_name, call in result[name].items():
                samples[name][pass_name].append(call)
                if not call["finite"]:
                    print(f"warning: {name}: the layer's output is not finite", flush=True)
            line.append(f"{name} " + "/".join(f"{result[name][p][p]['total']:.0f}" for p in result[name]))
        print(f"round {index + 1}/{args.rounds} ({time.perf_counter() - start:.0f} s), fwd+bwd ms (wall"
              + ("/1-thread CPU" if args.cpu_pass else "") + f"): {', '.join(line)}", flush=True)
    torch.set_num_threads(args.threads)
    return samples


# -- statistics and printing --------------------------------------------------------------------------
def quartiles(values):
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def collect_results(samples, pass_name):
    """Per variant: median fwd, bwd and total ms, and the paired ratios to dense (median [quartiles]) of
    the total and of each part."""
    results = {}
    for name, by_pass in samples.items():
        calls = [c[pass_name] for c in by_pass[pass_name]]
        dense = [c[pass_name] for c in samples["dense"][pass_name]]
        results[name] = {
            "ms": {part: statistics.median(c[part] for c in calls) for part in ("fwd", "bwd", "total")},
            "ratio": {part: quartiles([a[part] / b[part] for a, b in zip(calls, dense)])
                      for part in ("fwd", "bwd", "total")},
        }
    return results


def format_ratio(r, name):
    return "1.00" if name == "dense" else f"{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}]"


def print_table(title, results, variants, tokens):
    print(f"\n{title}")
    header = ["variant", "params", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd vs dense", "bwd vs dense",
              "fwd+bwd vs dense [q1-q3]", "tokens/s"]
    rows = []
    for name, r in results.items():
        ms, ratio = r["ms"], r["ratio"]
        rows.append([name, f"{variants[name].num_parameters / 1e6:.2f}M", f"{ms['fwd']:.1f}",
                     f"{ms['bwd']:.1f}", f"{ms['total']:.1f}",
                     "1.00" if name == "dense" else f"{ratio['fwd']['median']:.2f}",
                     "1.00" if name == "dense" else f"{ratio['bwd']['median']:.2f}",
                     format_ratio(ratio["total"], name), f"{tokens / ms['total'] * 1e3:,.0f}"])
    print_markdown_table(header, rows)



def print_preamble(args, variants, layout, tokens):
    print(f"bench_mot_layer: one transformer layer, forward + backward | command: "
          f"{' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} | "
          f"python {platform.python_version()} | {platform.machine()} {os.cpu_count()} CPUs | wall call "
          f"{args.threads} threads, CPU-time call {'1 thread' if args.cpu_pass else 'off'} | "
          f"moma_plugin {mp.__file__} ({source_revision()})")
    counts = dict(zip(MODALITIES, layout.counts))
    print(f"layer: d {args.hidden}, ffn {args.ffn} (SwiGLU), {args.heads} heads, RMSNorm, no bias, float32, "
          f"expert execution {args.execution!r}, capacity factor 1 | tokens {tokens:,} ([s={args.seq}, "
          f"b={args.batch}]), modality tokens {counts} ({counts['image'] / tokens:.1%} image, spans of mean "
          f"{args.span}) | {args.warmup} warm-up + {args.rounds} timed rounds")
    dense_flops = variants["dense"].forward_flops
    for name, v in variants.items():
        print(f"  {name:9s} {VARIANTS[name][2]}: {v.structure()}; {v.num_parameters / 1e6:.2f}M params, "
              f"{v.forward_flops / 1e6:.2f} MFLOP/token forward ({v.forward_flops / dense_flops:.3f} x dense)")


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    init_megatron_single_process()

    gen = torch.Generator().manual_seed(args.seed)
    hidden_SBH = torch.randn(args.seq, args.batch, args.hidden, generator=gen).requires_grad_(True)
    grad_SBH = torch.randn(args.seq, args.batch, args.hidden, generator=gen)
    layout = mp.build_modality_layout(modality_ids(args, gen), len(MODALITIES))
    tokens = args.seq * args.batch

    variants = {name: Variant(name, args) for name in args.names}
    for variant in variants.values():
        variant.check_structure()
    print_preamble(args, variants, layout, tokens)
    samples = run_rounds(args, variants, (hidden_SBH, grad_SBH, layout))

    results = {"wall": collect_results(samples, "wall")}
    print_table(f"Wall time, {args.threads} threads: median ms per forward + backward of one layer "
                f"({tokens:,} tokens); vs dense: median of per-round ratios", results["wall"], variants, tokens)
    if args.cpu_pass:
        results["cpu"] = collect_results(samples, "cpu")
        print_table("CPU time, 1 thread (time.process_time): median ms per forward + backward; tokens/s at "
                    "1 thread", results["cpu"], variants, tokens)
    print("fwd+bwd time vs dense (median of paired per-round ratios; < 1: faster than dense): " + ", ".join(
        f"{name} {results['wall'][name]['ratio']['total']['median']:.2f} wall"
        + (f", {results['cpu'][name]['ratio']['total']['median']:.2f} CPU" if args.cpu_pass else "")
        for name in variants if name != "dense"))
    seconds = time.perf_counter() - started
    print(f"(whole run {seconds:.0f} s)")
    if args.json:
        record = {
            "benchmark": "bench_mot_layer", "date": datetime.date.today().isoformat(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "torch": torch.__version__, "revision": source_revision(), "threads": args.threads,
            "cpu_pass": args.cpu_pass,
            "setup": {"seq": args.seq, "batch": args.batch, "hidden": args.hidden, "ffn": args.ffn,
                      "heads": args.heads, "span": args.span, "image_fraction": args.image_fraction,
                      "modality_counts": dict(zip(MODALITIES, layout.counts)), "rounds": args.rounds,
                      "warmup": args.warmup, "execution": args.execution, "seed": args.seed,
                      "quick": args.quick},
            "variants": {name: {"moma_experts": VARIANTS[name][0], "mot": VARIANTS[name][1],
                                "parameters": v.num_parameters, "forward_flops_per_token": v.forward_flops,
                                "results": {p: results[p][name] for p in results},
                                "samples": samples[name]} for name, v in variants.items()},
            "seconds": seconds,
        }
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
