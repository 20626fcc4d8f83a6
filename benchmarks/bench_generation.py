"""Generation speed with the KV cache against recomputing the whole sequence every step.

A 4-layer 4t4i model and the same with MoD on alternate layers (capacity 0.25), random weights with the
aux routers marked trained (speed does not depend on what the weights learned, only on how many tokens
each layer and expert processes; the script prints the share of tokens the MoD layers kept). Prompts of
different lengths, greedy decoding of a fixed number of new tokens (no end-of-document stop). Both
paths run in the same process, alternated round by round; the ratio is the median over rounds, and the
script stops if the two paths ever produce different tokens.

    python benchmarks/bench_generation.py              # about a minute on 2 CPU cores
    python benchmarks/bench_generation.py --quick      # smoke run
    python benchmarks/bench_generation.py --device cuda
"""

import argparse
import os
import statistics
import warnings

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

import moma_plugin as mp  # noqa: E402
from moma_plugin.generation import TokenRules, generate  # noqa: E402


def build(mod_interval: int, args, device):
    config = mp.MoMaConfig(
        num_layers=4, hidden_size=args.hidden, num_attention_heads=4, ffn_hidden_size=4 * args.hidden,
        add_bias_linear=False, use_cpu_initialization=True, moma_experts="4t4i",
        moma_vocab_ranges={"image": (args.vocab // 2, args.vocab)}, mod_interval=mod_interval,
        mod_capacity=0.25,
    )
    torch.manual_seed(0)
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config, use_te=False), vocab_size=args.vocab,
                            max_sequence_length=args.positions).to(device)
    with torch.no_grad():  # sharper aux scores, so that the routers' decisions vary between tokens
        for _, router in mp.aux_router.aux_routers(model):
            router.fc2.mul_(20.0)
    mp.mark_aux_routers_trained(model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.new_tokens, args.rounds = 64, 12, 1
    args.positions = 32 + args.new_tokens
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    device = torch.device(args.device)
    text_ids = torch.arange(args.vocab // 2 - 1)
    rules = TokenRules(vocab_size=args.vocab, eod_id=args.vocab // 2 - 1, text_ids=text_ids)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab // 2 - 1, (n,), generator=g).tolist() for n in (32, 20, 9, 27)]
    print(f"device {device}, hidden {args.hidden}, 4 layers, batch {len(prompts)} prompts of "
          f"{[len(p) for p in prompts]} tokens, {args.new_tokens} new tokens each, {args.rounds} rounds")
    print("| model | KV cache tokens/s | recompute tokens/s | speed-up |\n|---|---|---|---|")
    for name, mod in (("4t4i", 0), ("MoD 4t4i", 2)):
        model = build(mod, args, device)
        speeds = {True: [], False: []}
        for _ in range(args.rounds):
            results = {}
            for use_cache in (True, False):
                result = generate(model, prompts, rules, args.new_tokens, use_kv_cache=use_cache)
                speeds[use_cache].append(result.tokens_per_s)
                results[use_cache] = result.tokens
            if results[True] != results[False]:
                raise SystemExit(f"{name}: KV-cache tokens differ from recompute")
        cached, recomputed = statistics.median(speeds[True]), statistics.median(speeds[False])
        ratio = statistics.median(a / b for a, b in zip(speeds[True], speeds[False]))
        print(f"| {name} | {cached:,.0f} | {recomputed:,.0f} | {ratio:.2f}x |")
        if mod:
            shares = mp.collect_routing_metrics(model)
            kept = [v for k, v in shares.items() if k.endswith("processed_frac")]
            print(f"(MoD layers processed {min(kept):.2f}-{max(kept):.2f} of each modality's tokens "
                  "over the run)" if kept else "")


if __name__ == "__main__":
    main()
