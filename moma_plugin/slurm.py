"""``python -m moma_plugin.slurm``: the parallel layout of a SLURM job, checked before it runs.

The scripts in ``launch_scripts/`` call it (``DRY_RUN=1`` prints the resolved commands and stops there).
It fails, saying what to change, when:
- the world size (nodes x GPUs per node) is not a multiple of TP x PP;
- the data-parallel size is not a multiple of EP;
- the global batch is not a multiple of micro-batch x data-parallel size.
It prints the sizes it resolved (``world 16 = TP 2 x PP 1 x DP 8; EP 4 ...``).

    python -m moma_plugin.slurm --nodes 2 --gpus-per-node 8 --tp 2 --ep 4 --global-batch-size 256 \\
        --micro-batch-size 2
"""

import argparse
import sys
from typing import List, Optional


def check_layout(nodes: int, gpus_per_node: int, tp: int = 1, pp: int = 1, ep: int = 1,
                 global_batch_size: Optional[int] = None, micro_batch_size: int = 1) -> str:
    """A one-line description of the layout; ValueError naming what does not divide."""
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("TP", tp), ("PP", pp),
                        ("EP", ep), ("--micro-batch-size", micro_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise ValueError(f"world size {world} ({nodes} node(s) x {gpus_per_node} GPUs) is not a multiple of "
                         f"TP {tp} x PP {pp} = {tp * pp}; change the node count, GPUS_PER_NODE, TP or PP")
    dp = world // (tp * pp)
    if dp % ep:
        raise ValueError(f"EP {ep} does not divide the data-parallel size {dp} (world {world} / "
                         f"(TP {tp} x PP {pp})): experts are split over data-parallel ranks; pick EP "
                         f"among {[n for n in range(1, dp + 1) if dp % n == 0]}")
    line = f"world {world} = {nodes} node(s) x {gpus_per_node}; TP {tp} x PP {pp} x DP {dp}"
    if ep > 1:
        line += f"; experts over EP {ep} (expert-data-parallel {dp // ep})"
    if global_batch_size is not None:
        per_step = micro_batch_size * dp
        if global_batch_size % per_step:
            raise ValueError(f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size "
                             f"{micro_batch_size} x DP {dp} = {per_step}")
        line += (f"; global batch {global_batch_size} = {global_batch_size // per_step} micro-batch(es) of "
                 f"{micro_batch_size} per rank")
    return line


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moma_plugin.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        print("layout: " + check_layout(args.nodes, args.gpus_per_node, args.tp, args.pp, args.ep,
                                        args.global_batch_size, args.micro_batch_size), flush=True)
    except ValueError as e:
        print(f"layout: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
