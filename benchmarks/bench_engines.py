"""Tokens per second and peak memory per rank of each data-parallel engine, two processes on CPU.

Each measurement is a job of two gloo ranks (one intra-op thread each) that builds the model and the
engine as ``moma-pretrain`` does, draws real batches of the bundled corpus with the balanced sampler,
and runs ``--warmup`` + ``--steps`` optimizer steps of ``step.train_step``. Per job: tokens/s of the
global batch (median over the timed steps), CPU seconds per step of rank 0 (``time.process_time``), and
the peak resident memory of each rank above what it held before the model was built (``ru_maxrss``:
weights, gradients, optimizer state, activations, communication buffers). Engines run in a rotated
order within each round; each round's ratios are against that round's ``ddp`` job, and the table
gives the medians of those paired ratios.

    python benchmarks/bench_engines.py                 # tiny and 90M-matched 4t4i, 3 rounds
    python benchmarks/bench_engines.py --quick         # a smoke run (tests/test_benchmarks.py)

Configs: ``tiny`` is examples/configs/tiny_cpu.yaml (4 layers, hidden 128, 4t4i, sequences of 128, two
micro-batches of 8 per rank); ``4t4i-90m`` is examples/configs/paper/4t4i_90m.yaml at sequences of 256
and two micro-batches of 2 per rank (short sequences, so that a CPU step takes seconds).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = {
    "ddp": [],
    "fsdp2": ["--use-torch-fsdp2"],
    "zero1": ["--deepspeed", "--deepspeed-config", str(ROOT / "examples/deepspeed/zero1.json")],
    "zero2": ["--deepspeed", "--deepspeed-config", str(ROOT / "examples/deepspeed/zero2.json")],
    "zero3": ["--deepspeed", "--deepspeed-config", str(ROOT / "examples/deepspeed/zero3.json")],
}
CONFIGS = {
    "tiny": ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), "--micro-batch-size", "8",
             "--global-batch-size", "32", "--train-iters", "1000"],
    "4t4i-90m": ["--config", str(ROOT / "examples/configs/paper/4t4i_90m.yaml"), "--seq-length", "256",
                 "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1000",
                 "--lr-warmup-iters", "1"],
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(rank, port, argv, steps, warmup, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from moma_plugin.training.arguments import batch_sizes, parse_args
    from moma_plugin.training.engines import build_engine
    from moma_plugin.training.initialize import (build_model, build_optimizer, build_sampler, load_datasets,
                                                 seed_everything, setup_parallel)
    from moma_plugin.training.step import collate, train_step

    args = parse_args(argv)
    parallel = setup_parallel(args)
    num_micro = batch_sizes(args, parallel.dp)
    seed_everything(args.seed)
    train_set, _ = load_datasets(args, parallel)
    layout = train_set.layout
    sampler, _, _ = build_sampler(train_set, args, parallel, layout, announce=lambda message: None)
    batches = [[collate([train_set[i] for i in sampler.next_step()[parallel.dp_rank]])
                for _ in range(num_micro)] for _ in range(warmup + steps)]
    if args.deepspeed:  # its import is not the engine's memory
        from moma_plugin.training.engines.deepspeed import import_deepspeed

        import_deepspeed()
    before = _rss_mib()
    model, _ = build_model(args, layout, parallel)
    engine = build_engine(model, args, parallel, num_micro, build_optimizer)
    walls, cpus = [], []
    for index, micro_batches in enumerate(batches):
        torch.distributed.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        _, _, finite = train_step(engine, micro_batches, layout, args, parallel)
        if index >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        assert finite
    tokens = args.global_batch_size * args.seq_length
    result = {"tokens_per_s": tokens / statistics.median(walls), "cpu_s": statistics.median(cpus),
              "peak_mib": _rss_mib() - before, "parameters": sum(p.numel() for p in model.parameters())}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def run_job(config, engine, steps, warmup):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*CONFIGS[config], *ENGINES[engine]]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        mp.spawn(_worker, args=(port, argv, steps, warmup, out), nprocs=2)
        ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    return {"tokens_per_s": ranks[0]["tokens_per_s"], "cpu_s": ranks[0]["cpu_s"],
            "peak_mib": max(r["peak_mib"] for r in ranks), "parameters": ranks[0]["parameters"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny config, ddp, fsdp2 and zero2, one round of 1+2 steps")
    options = parser.parse_args(argv)
    if options.quick:
        options.configs, options.rounds, options.steps, options.warmup = ["tiny"], 1, 2, 1
        options.engines = ["ddp", "fsdp2", "zero2"]
    engines = ["ddp", *[e for e in options.engines if e != "ddp"]]
    print(f"# bench_engines: {options.rounds} round(s), {options.warmup}+{options.steps} steps per job, "
          f"2 gloo ranks x 1 thread, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print("| config | engine | tokens/s | vs ddp | CPU s/step (rank 0) | vs ddp | peak MiB per rank | vs ddp |")
    print("|---|---|---|---|---|---|---|---|")
    for config in options.configs:
        rounds = []
        for r in range(options.rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            rounds.append({engine: run_job(config, engine, options.steps, options.warmup) for engine in order})
        for engine in engines:
            def median(key, ratio=False):
                values = [(rnd[engine][key] / rnd["ddp"][key]) if ratio else rnd[engine][key] for rnd in rounds]
                return statistics.median(values)

            print(f"| {config} | {engine} | {median('tokens_per_s'):,.0f} | {median('tokens_per_s', True):.2f} "
                  f"| {median('cpu_s'):.3f} | {median('cpu_s', True):.2f} | {median('peak_mib'):,.0f} "
                  f"| {median('peak_mib', True):.2f} |", flush=True)
        print(f"({config}: {rounds[0]['ddp']['parameters'] / 1e6:.1f}M parameters)", flush=True)


if __name__ == "__main__":
    main()
