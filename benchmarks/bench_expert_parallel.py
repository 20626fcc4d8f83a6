"""Expert parallelism (EP) for one MoMa MLP layer on CPU: EP=2 against EP=1, two gloo processes.

Two processes (gloo over loopback, one intra-op thread each, Megatron's groups at EP 2) each run
their own micro-batch of T tokens (default 4,096 = seq 1024 x batch 4, half text, half image, a
different draw per rank) through two copies of one 4t4i ``MoMaMLP`` (4 text + 4 image SwiGLU experts,
hidden 256, FFN 1024, capacity factor 1, ``moma_expert_execution="chunked"``, float32), built from the
same seed, hence the same weights:

  EP=1  ``expert_model_parallel_size=1``: each rank holds all 8 experts; nothing is exchanged
  EP=2  ``expert_model_parallel_size=2``: each rank holds its block of every group (text 0-1 and
        image 0-1 on rank 0, text 2-3 and image 2-3 on rank 1); the chosen rows travel to their
        expert's rank and back (``moma_plugin.expert_parallel.ExpertParallel.run``)

Both do the same expert FLOPs per rank (at EP=2 each local expert takes the rows of both ranks). A call
is the layer's forward and the backward of ``(y * fixed_random).sum()`` (gradients of the input and of
every parameter; parameter gradients kept and zeroed in place between calls, as the CPU training loop
does). Before each call both ranks meet at a barrier; a call's wall time is the slower rank's (the
time until both micro-batches are through), its CPU time the mean over ranks of ``time.process_time``
(the whole process: the compute thread and gloo's). EP=1 and EP=2 calls alternate round by round (the
order swapped every round); ratios are medians of the per-round ratios, with quartiles.

Also measured, from inside the benchmark's processes only (wrappers on the layer instances and on
``torch.distributed``; the package is not changed):

- where the time goes, per rank: the local experts (``MoMaMLP.compute``: forward, and in backward from
  the gradient reaching the experts' output to it leaving their input, via autograd tensor hooks), at
  EP=2 the dispatch/combine below, and the rest of the layer (routing, gating, the combine
  ``index_add``, the routing metrics).
- EP=2 dispatch/combine share: the time spent in ``ExpertParallel.run`` outside the local ``compute`` call
  (the count all-gather, the index bookkeeping, the row gathers and both ``all_to_all_single``),
  forward, plus in backward the time between the gradient reaching ``run``'s output and reaching the
  local experts' output, and between the gradient leaving the local experts' input and reaching
  ``run``'s input (autograd tensor hooks). Waiting for the other rank inside a collective counts as
  dispatch. Also the time inside the collectives alone (``torch.distributed.all_gather`` and
  ``all_to_all_single``, wrapped). Both as a percentage of the rank's fwd+bwd wall time of that call.
- bytes per token: the model (each chosen (token, expert) row whose expert lives on another rank
  crosses once to the expert and once back in forward, and the same two ways in backward: 4 x H x
  element size; with capacity factor c about c rows per token, (P-1)/P of them remote; plus the count
  all-gather, E x 8 bytes to each other rank) against what the ``all_to_all_single`` / ``all_gather``
  calls really sent (the send splits to other ranks x row bytes), per token of one rank's micro-batch.

Before timing, the EP=1 and EP=2 outputs and input gradients are compared on the same inputs; the
script stops with an error if they differ by more than 1e-4.

    python benchmarks/bench_expert_parallel.py               # default: 4,096 tokens per rank, < 1 min on 2 cores
    python benchmarks/bench_expert_parallel.py --quick       # smoke run (tests/test_benchmarks.py), ~10-15 s
    python benchmarks/bench_expert_parallel.py --tokens 8192 --hidden 512 --rounds 10

See benchmarks/README.md for the results and what they mean.
"""

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tables import print_markdown_table  # benchmarks/tables.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", message=".*Transformer Engine.*not installed.*")
warnings.filterwarnings("ignore", message="Apex is not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated.*")

WORLD = 2  # processes = EP size of the EP=2 layer
TOLERANCE = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=None, help="sequence length s (default 1024; --quick 64)")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch size b per rank (tokens per rank = s*b; default 4; --quick 2)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per rank's micro-batch (sets --seq to TOKENS / --batch)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H (default 256; --quick 64)")
    p.add_argument("--ffn", type=int, default=None, help="FFN size of each expert (default 4*H)")
    p.add_argument("--experts", default="4t4i", help="MoMa expert groups (default 4t4i)")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--execution", default="chunked", help="moma_expert_execution (default chunked)")
    p.add_argument("--image-fraction", type=float, default=0.5,
                   help="share of image tokens (modality 1) in each micro-batch, exact (default half)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (one EP=1 and one EP=2 call each)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 tokens, hidden 64, 1 warm-up + 2 timed rounds (unless given)")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = p.parse_args(argv)
    for name, default, quick in (("seq", 1024, 64), ("batch", 4, 2), ("hidden", 256, 64)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.tokens is not None:
        if args.tokens % args.batch:
            p.error(f"--tokens {args.tokens} is not a multiple of --batch {args.batch}")
        args.seq = args.tokens // args.batch
    if args.rounds is None:
        args.rounds = 2 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.ffn is None:
        args.ffn = 4 * args.hidden
    if args.rounds < 1 or args.warmup < 0 or args.seq < 1 or args.batch < 1:
        p.error("--rounds, --seq and --batch must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.image_fraction <= 1.0:
        p.error("--image-fraction must lie in [0, 1]")
    return args


# -- inside each rank ---------------------------------------------------------------------------------
def make_config(args, ep: int):
    import moma_plugin as mp

    return mp.MoMaConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=1, ffn_hidden_size=args.ffn,
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, moma_experts=args.experts, moma_capacity_factor=args.capacity_factor,
        moma_expert_execution=args.execution, expert_model_parallel_size=ep,
    )


def build_layer(args, ep: int):
    """A MoMaMLP from the local spec (as a layer builds it); the same seed, the same weights at any EP."""
    import moma_plugin as mp
    from megatron.core.transformer.spec_utils import build_module

    config = make_config(args, ep)
    torch.manual_seed(args.seed)
    spec = mp.get_moma_layer_spec(config, use_te=False).submodules.mlp
    layer = build_module(spec, config=config)
    layer.train()
    return layer


def make_inputs(args, rank: int, num_modalities: int):
    """This rank's micro-batch: hidden states [s, b, H], modality ids [s, b] (an exact share of image
    tokens, shuffled), and the fixed random tensor of the loss."""
    g = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))
    T = args.seq * args.batch
    hidden = torch.randn(args.seq, args.batch, args.hidden, generator=g)
    ids = torch.zeros(T, dtype=torch.long)
    ids[:round(T * args.image_fraction)] = min(1, num_modalities - 1)
    ids = ids[torch.randperm(T, generator=g)].view(args.seq, args.batch)
    target = torch.randn(args.seq, args.batch, args.hidden, generator=g)
    return hidden, ids, target


class Probe:
    """Times a layer's local experts (``MoMaMLP.compute``) and, under EP, the rest of
    ``ExpertParallel.run`` and the collectives, and counts the bytes those send, while ``active``.
    Wrappers on the instances (and on ``torch.distributed`` in this process) only: the package is not
    changed."""

    def __init__(self, layer, rank: int):
        self.rank, self.active = rank, False
        self.ep = getattr(layer.experts, "ep", None)
        self.reset()
        original_compute = layer.compute

        def compute(rows, counts):
            if not self.active:
                return original_compute(rows, counts)
            t = time.perf_counter()
            if rows.requires_grad:  # the local experts' input gradient is ready: their backward done
                rows.register_hook(lambda g: self._mark("compute_bwd_end"))
            y = original_compute(rows, counts)
            if y.requires_grad:  # the local experts' output gradient is ready: their backward starts
                y.register_hook(lambda g: self._mark("compute_bwd_start"))
            self.fwd_compute_s += time.perf_counter() - t
            return y

        # MoMaMLP.forward looks ``self.compute`` up per call (and hands it to ep.run under EP).
        layer.compute = compute
        if self.ep is None:
            return
        original_run = self.ep.run

        def run(x_AH, tokens_per_expert, compute):
            if not self.active:
                return original_run(x_AH, tokens_per_expert, compute)
            start = time.perf_counter()
            if x_AH.requires_grad:
                x_AH.register_hook(lambda g: self._mark("run_bwd_end"))
            out = original_run(x_AH, tokens_per_expert, compute)
            if out.requires_grad:
                out.register_hook(lambda g: self._mark("run_bwd_start"))
            self.fwd_run_s += time.perf_counter() - start
            return out

        self.ep.run = run  # the instance's attribute: other ExpertParallel objects are untouched
        self._a2a = torch.distributed.all_to_all_single
        self._gather = torch.distributed.all_gather

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                              group=None, async_op=False):
            if self.active:
                row = input.element_size() * math.prod(input.shape[1:])
                if input_split_sizes is None:
                    sent = input.shape[0] - input.shape[0] // WORLD
                else:
                    sent = sum(input_split_sizes) - input_split_sizes[self.rank]
                self.bytes_sent += sent * row
                t = time.perf_counter()
            result = self._a2a(output, input, output_split_sizes, input_split_sizes, group=group,
                               async_op=async_op)
            if self.active:
                self.collective_s[self._phase()] += time.perf_counter() - t
            return result

        def all_gather(tensor_list, tensor, group=None, async_op=False):
            if self.active:
                self.bytes_sent += tensor.numel() * tensor.element_size() * (len(tensor_list) - 1)
                t = time.perf_counter()
            result = self._gather(tensor_list, tensor, group=group, async_op=async_op)
            if self.active:
                self.collective_s[self._phase()] += time.perf_counter() - t
            return result

        torch.distributed.all_to_all_single = all_to_all_single
        torch.distributed.all_gather = all_gather

    def _phase(self):
        return "bwd" if self.in_backward else "fwd"

    def _mark(self, name):
        self.marks[name] = time.perf_counter()

    def reset(self):
        self.fwd_run_s = self.fwd_compute_s = 0.0
        self.collective_s = {"fwd": 0.0, "bwd": 0.0}
        self.marks, self.bytes_sent, self.in_backward = {}, 0, False

    def record(self):
        m = self.marks
        needed = ("compute_bwd_start", "compute_bwd_end")
        if self.ep is not None:
            needed += ("run_bwd_start", "run_bwd_end")
        if not all(k in m for k in needed):
            raise RuntimeError(f"backward hooks of the layer did not all fire: {sorted(m)}")
        rec = {"fwd_compute_s": self.fwd_compute_s,
               "bwd_compute_s": m["compute_bwd_end"] - m["compute_bwd_start"]}
        if self.ep is not None:
            rec.update(
                fwd_dispatch_s=self.fwd_run_s - self.fwd_compute_s,
                bwd_dispatch_s=(m["compute_bwd_start"] - m["run_bwd_start"])
                + (m["run_bwd_end"] - m["compute_bwd_end"]),
                fwd_collective_s=self.collective_s["fwd"], bwd_collective_s=self.collective_s["bwd"],
                bytes_sent=self.bytes_sent)
        return rec


def call(layer, hidden, ids, target, probe=None):
    """One fwd+bwd of ``layer`` on this rank's micro-batch after a barrier; (wall s, fwd wall s, CPU s,
    probe record: {} without a probe)."""
    import moma_plugin as mp

    for p in layer.parameters():
        if p.grad is not None:
            p.grad.zero_()
    x = hidden.detach().requires_grad_(True)
    layout = mp.build_modality_layout(ids, layer.config.num_modalities)
    if probe is not None:
        probe.reset()
        probe.active = True
    torch.distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        with layer.routing_layout(layout):
            y, _ = layer(x)
        fwd = time.perf_counter() - start
        if probe is not None:
            probe.in_backward = True
        (y * target).sum().backward()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        if probe is not None:
            probe.active = False
    return wall, fwd, cpu, (probe.record() if probe is not None else {})


def agreement(ep1, ep2, hidden, ids, target):
    """max |EP2 - EP1| of this rank's outputs and input gradients on the same inputs."""
    import moma_plugin as mp

    results = []
    for layer in (ep1, ep2):
        x = hidden.detach().clone().requires_grad_(True)
        with layer.routing_layout(mp.build_modality_layout(ids, layer.config.num_modalities)):
            y, _ = layer(x)
        (y * target).sum().backward()
        results.append((y.detach(), x.grad))
        layer.zero_grad(set_to_none=True)
    (y1, dx1), (y2, dx2) = results
    return (y2 - y1).abs().max().item(), (dx2 - dx1).abs().max().item()


def worker(rank, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=WORLD)
    try:
        ep1, ep2 = build_layer(args, 1), build_layer(args, WORLD)
        hidden, ids, target = make_inputs(args, rank, ep1.config.num_modalities)
        diff = torch.tensor(agreement(ep1, ep2, hidden, ids, target))
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        report = {"max_abs_diff_out": diff[0].item(), "max_abs_diff_dx": diff[1].item(),
                  "held_experts": ep2.experts.expert_names, "ep1_experts": ep1.experts.num_experts}
        if max(report["max_abs_diff_out"], report["max_abs_diff_dx"]) > TOLERANCE:
            report["error"] = (f"EP=2 and EP=1 disagree: max |out| diff {diff[0].item():.3e}, max |dx| "
                               f"diff {diff[1].item():.3e} (> {TOLERANCE}); not timing a broken path")
        else:
            import moma_plugin as mp

            layout = mp.build_modality_layout(ids, ep1.config.num_modalities)
            report["modality_tokens"] = list(layout.counts)
            report["tokens_per_expert"] = [
                mp.expert_capacity(layout.token_count(g.modalities), g.num_experts, args.capacity_factor)
                for g in ep1.config.moma_expert_groups for _ in range(g.num_experts)]
            probes = {"ep1": Probe(ep1, rank), "ep2": Probe(ep2, rank)}
            samples = {"ep1": [], "ep2": []}
            for r in range(args.warmup + args.rounds):
                order = (("ep1", ep1), ("ep2", ep2)) if r % 2 == 0 else (("ep2", ep2), ("ep1", ep1))
                for name, layer in order:
                    wall, fwd, cpu, rec = call(layer, hidden, ids, target, probes[name])
                    if r >= args.warmup:
                        samples[name].append({"wall_s": wall, "fwd_s": fwd, "cpu_s": cpu, **rec})
            report["samples"] = samples
        with open(f"{out}.{rank}", "w") as f:
            json.dump(report, f)
    finally:
        torch.distributed.destroy_process_group()


# -- the launching process ----------------------------------------------------------------------------
def quartiles(values):
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def summarise(args, ranks):
    """Per-round figures (wall: the slower rank; CPU: the mean over ranks) and their medians."""
    rounds = args.rounds
    out = {}
    for name in ("ep1", "ep2"):
        per = [ranks[q]["samples"][name] for q in range(WORLD)]
        out[name] = {
            "wall_s": [max(p[i]["wall_s"] for p in per) for i in range(rounds)],
            "fwd_s": [max(p[i]["fwd_s"] for p in per) for i in range(rounds)],
            "cpu_s": [statistics.fmean(p[i]["cpu_s"] for p in per) for i in range(rounds)],
        }
        out[name]["bwd_s"] = [w - f for w, f in zip(out[name]["wall_s"], out[name]["fwd_s"])]
    out["ratio_wall"] = [b / a for a, b in zip(out["ep1"]["wall_s"], out["ep2"]["wall_s"])]
    out["ratio_cpu"] = [b / a for a, b in zip(out["ep1"]["cpu_s"], out["ep2"]["cpu_s"])]
    # Where the time goes, per rank and round against that rank's own fwd+bwd wall time.
    for name in ("ep1", "ep2"):
        pooled = [s for q in range(WORLD) for s in ranks[q]["samples"][name]]
        parts = {"layer": [s["wall_s"] for s in pooled],
                 "experts": [s["fwd_compute_s"] + s["bwd_compute_s"] for s in pooled]}
        if name == "ep2":
            parts["dispatch"] = [s["fwd_dispatch_s"] + s["bwd_dispatch_s"] for s in pooled]
            parts["collectives"] = [s["fwd_collective_s"] + s["bwd_collective_s"] for s in pooled]
            for key in ("dispatch", "collectives"):
                out[f"{key}_share"] = [x / s["wall_s"] for x, s in zip(parts[key], pooled)]
            for key in ("dispatch", "collective"):
                for phase in ("fwd", "bwd"):
                    out[f"{key}_{phase}_s"] = [s[f"{phase}_{key}_s"] for s in pooled]
            out["bytes_sent"] = [s["bytes_sent"] for s in pooled]
        parts["rest"] = [s["wall_s"] - e - d for s, e, d in
                         zip(pooled, parts["experts"], parts.get("dispatch", [0.0] * len(pooled)))]
        out[name]["parts_s"] = parts
    return out


def bytes_model(args, num_experts: int, element_size: int = 4):
    """Bytes one rank sends per token of its micro-batch per fwd+bwd (see the module docstring)."""
    T, P, c, H = args.seq * args.batch, WORLD, args.capacity_factor, args.hidden
    rows = 4 * c * (P - 1) / P * H * element_size
    counts = num_experts * 8 * (P - 1) / T
    return rows + counts, rows, counts


def main(argv=None):
    args = parse_args(argv)
    import torch.multiprocessing as tmp

    from moma_plugin.config import parse_expert_groups
    from moma_plugin.expert_parallel import check_expert_parallel

    try:
        groups = parse_expert_groups(args.experts, ("text", "image"))
        check_expert_parallel(groups, WORLD)
    except ValueError as e:
        sys.exit(f"error: --experts {args.experts}: {e}")
    num_experts = sum(g.num_experts for g in groups)
    T = args.seq * args.batch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"# bench_expert_parallel: {args.experts} MoMaMLP, EP=1 vs EP={WORLD} | {WORLD} gloo ranks x 1 "
          f"thread, loopback | {T} tokens per rank ([s={args.seq}, b={args.batch}], "
          f"{args.image_fraction:.0%} image), H {args.hidden}, ffn {args.ffn}, capacity factor "
          f"{args.capacity_factor}, {args.execution}, float32 | {args.warmup} warm-up + {args.rounds} "
          f"timed rounds | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        out = f"{tmpdir}/result"
        tmp.spawn(worker, args=(port, args, out), nprocs=WORLD)
        ranks = [json.loads(Path(f"{out}.{q}").read_text()) for q in range(WORLD)]
    elapsed = time.perf_counter() - start
    r0 = ranks[0]
    print(f"max |EP2 - EP1| on the same weights and inputs (both ranks): output "
          f"{r0['max_abs_diff_out']:.2e}, input gradient {r0['max_abs_diff_dx']:.2e}")
    if "error" in r0:
        sys.exit(f"error: {r0['error']}")
    print(f"experts per rank: EP=1 {r0['ep1_experts']} (all); EP=2 rank 0 {', '.join(r0['held_experts'])}; "
          f"rank 1 {', '.join(ranks[1]['held_experts'])}")
    print(f"rank 0 micro-batch: modality tokens {r0['modality_tokens']}, tokens per expert "
          f"{r0['tokens_per_expert']} ({sum(r0['tokens_per_expert'])} chosen rows = "
          f"{sum(r0['tokens_per_expert']) / T:.3f} x tokens)")

    res = summarise(args, ranks)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    rows = []
    for name, label in (("ep1", f"EP=1 ({num_experts} experts per rank)"),
                        ("ep2", f"EP={WORLD} ({num_experts // WORLD} per rank)")):
        r = res[name]
        if name == "ep1":
            ratio = cpu_ratio = "1.00"
        else:
            q1, med, q3 = quartiles(res["ratio_wall"])
            ratio = f"{med:.2f} [{q1:.2f}-{q3:.2f}]"
            q1, med, q3 = quartiles(res["ratio_cpu"])
            cpu_ratio = f"{med:.2f} [{q1:.2f}-{q3:.2f}]"
        rows.append([label, f"{ms(r['wall_s']):.1f}", f"{ms(r['fwd_s']):.1f}", f"{ms(r['bwd_s']):.1f}",
                     ratio, f"{ms(r['cpu_s']):.1f}", cpu_ratio])
    header = ["layer", "fwd+bwd ms", "fwd ms", "bwd ms", "vs EP=1 [q1-q3]", "CPU ms", "CPU vs EP=1 [q1-q3]"]
    print_markdown_table(header, rows)
    print("ms: median over rounds of the slower rank's wall time per fwd+bwd; CPU ms: median of the "
          "ranks' mean process CPU time; vs EP=1: median [quartiles] of per-round EP=2 / EP=1")

    header = ["layer", "per rank fwd+bwd ms", "local experts ms", "dispatch/combine ms",
              "of which collectives ms", "rest ms (routing, gate, combine)"]
    rows = []
    for name, label in (("ep1", "EP=1"), ("ep2", f"EP={WORLD}")):
        parts = res[name]["parts_s"]
        cell = lambda key: f"{ms(parts[key]):.1f}" if key in parts else "-"  # noqa: E731
        rows.append([label, cell("layer"), cell("experts"), cell("dispatch"), cell("collectives"),
                     cell("rest")])
    print_markdown_table(header, rows)
    print("each column: median over rounds and ranks of that rank's own time, fwd + bwd (rest = layer - "
          "experts - dispatch of the same call, so the medians need not add up)")

    d_q1, d_med, d_q3 = (100 * x for x in quartiles(res["dispatch_share"]))
    c_q1, c_med, c_q3 = (100 * x for x in quartiles(res["collectives_share"]))
    print(f"EP={WORLD} dispatch/combine (ExpertParallel.run outside the local experts): "
          f"{d_med:.1f}% [{d_q1:.1f}-{d_q3:.1f}] of the layer's fwd+bwd "
          f"(fwd {ms(res['dispatch_fwd_s']):.1f} ms + bwd {ms(res['dispatch_bwd_s']):.1f} ms)")
    print(f"EP={WORLD} collectives alone (all_gather + all_to_all_single): "
          f"{c_med:.1f}% [{c_q1:.1f}-{c_q3:.1f}] of the layer's fwd+bwd "
          f"(fwd {ms(res['collective_fwd_s']):.1f} ms + bwd {ms(res['collective_bwd_s']):.1f} ms)")
    total, rows_b, counts_b = bytes_model(args, num_experts)
    measured = statistics.median(res["bytes_sent"]) / T
    print(f"bytes per token (model): {total:.1f} = 4 x {args.capacity_factor} x ({WORLD}-1)/{WORLD} x "
          f"{args.hidden} x 4 B ({rows_b:.1f}) + count all-gather ({counts_b:.2f})")
    print(f"bytes per token (measured): {measured:.1f} (all_to_all_single + all_gather sends to the other "
          f"rank, per fwd+bwd, median over rounds and ranks)")
    print(f"bytes per token measured / model: {measured / total:.3f}")
    print(f"(whole run {elapsed:.1f} s)")

    if args.json:
        record = {"benchmark": "bench_expert_parallel", "date": time.strftime("%Y-%m-%d"),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                  "args": vars(args), "torch": torch.__version__, "ranks": ranks, "summary": res,
                  "bytes_per_token": {"model": total, "measured": measured}}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
