"""Memory per rank of the model state (weights, gradients, optimizer state) under each engine: the
accounting of the ZeRO paper (Rajbhandari et al. 2020) for Adam, per parameter, with W data-parallel
ranks (parameters counted per tensor-parallel rank):

==========  ======================  ======================================
engine      fp32 (or ddp/fsdp2 bf16) bf16 (DeepSpeed: bf16 weights and grads)
==========  ======================  ======================================
ddp         4 + 4 + 8               the same: fp32 weights, bf16 autocast
fsdp2       (4 + 4 + 8) / W         the same, sharded; bf16 only while gathered
zero1       4 + 4 + 8 / W           2 + 2 + (4 master + 8 Adam) / W
zero2       4 + (4 + 8) / W         2 + (2 + 12) / W
zero3       (4 + 4 + 8) / W         (2 + 2 + 12) / W
==========  ======================  ======================================

Not counted: activations, the gathered layer of FSDP2/ZeRO-3 in flight, communication buckets.

    python -m moma_plugin.training.engines.memory examples/configs/paper/4t4i_1.4b.yaml --world 8 64

prints the table (GiB) for configs and data-parallel sizes (docs/TRAINING.md, "Engines", holds the paper
configs' tables and a test checks them against this).
"""

import argparse
import sys
from typing import Dict, List

ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
PAPER_VOCAB = 65536  # Chameleon's tokenizer, the paper's (docs: the tables assume it)


def bytes_per_parameter(engine: str, world: int, bf16: bool) -> Dict[str, float]:
    """{"weights", "gradients", "optimizer"}: bytes per parameter held by one rank."""
    w = float(world)
    half = bf16 and engine.startswith("zero")  # DeepSpeed keeps bf16 weights and gradients
    weight, grad, optim = (2.0, 2.0, 12.0) if half else (4.0, 4.0, 8.0)
    shards = {"ddp": (1, 1, 1), "fsdp2": (w, w, w), "zero1": (1, 1, w), "zero2": (1, w, w),
              "zero3": (w, w, w)}[engine]
    return {"weights": weight / shards[0], "gradients": grad / shards[1], "optimizer": optim / shards[2]}


def state_bytes_per_rank(num_parameters: int, engine: str, world: int, bf16: bool) -> float:
    return num_parameters * sum(bytes_per_parameter(engine, world, bf16).values())


def estimate_line(num_parameters: int, engine, world: int, bf16: bool) -> str:
    """The start-of-run line: the model-state memory per rank of a run on ``engine``."""
    key = engine.accounting
    parts = {k: num_parameters * v for k, v in bytes_per_parameter(key, world, bf16).items()}
    return (f"model state per rank ({key}, {world} data-parallel rank(s){', bf16' if bf16 else ''}): "
            f"{_size(sum(parts.values()))} = weights {_size(parts['weights'])} + gradients "
            f"{_size(parts['gradients'])} + optimizer {_size(parts['optimizer'])} (activations not counted)")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.1f} MiB"


def count_parameters(config_path: str, vocab_size: int = PAPER_VOCAB, tp: int = 1) -> int:
    """Parameters of a config's model per tensor-parallel rank, built on the meta device (no memory)."""
    import torch

    from ...args import moma_config_from_args
    from ...model import MoMaGPTModel
    from ...specs import get_moma_layer_spec
    from ..arguments import parse_args
    from ..initialize import padded_vocab_size

    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():  # a one-process group: Megatron's modules ask for one
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    args = parse_args(["--config", config_path])
    config = moma_config_from_args(args, moma_vocab_ranges=None, add_bias_linear=not args.disable_bias_linear,
                                   use_cpu_initialization=True)
    with torch.device("meta"):
        model = MoMaGPTModel(config, get_moma_layer_spec(config, use_te=False),
                             vocab_size=padded_vocab_size(vocab_size, tp, args.make_vocab_size_divisible_by),
                             max_sequence_length=args.max_position_embeddings,
                             share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    return sum(p.numel() for p in model.parameters())


def table(configs: List[str], worlds: List[int]) -> str:
    """A markdown table: GiB of model state per rank, per config, engine and data-parallel size, in
    fp32 and with --bf16."""
    header = ("| config | parameters | engine | " + " | ".join(f"DP {w}" for w in worlds) + " | "
              + " | ".join(f"bf16 DP {w}" for w in worlds) + " |")
    lines = [header, "|" + "---|" * (3 + 2 * len(worlds))]
    for path in configs:
        n = count_parameters(path)
        name = path.rsplit("/", 1)[-1].removesuffix(".yaml")
        for engine in ENGINES:
            cells = [f"{state_bytes_per_rank(n, engine, w, bf16) / 2 ** 30:.1f}"
                     for bf16 in (False, True) for w in worlds]
            lines.append(f"| {name} | {n / 1e9:.2f}B | {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moma_plugin.training.engines.memory",
                                     description="Model-state memory per rank (GiB) of configs under each engine")
    parser.add_argument("configs", nargs="+", help="moma-pretrain YAML configs")
    parser.add_argument("--world", type=int, nargs="+", default=[8, 64, 256], help="data-parallel sizes")
    options = parser.parse_args(argv)
    print(table(options.configs, options.world))


if __name__ == "__main__":
    main(sys.argv[1:])
