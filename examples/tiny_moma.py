"""Train a tiny 4t4i MoMa model on CPU in about a minute and print what the experts do.

    python examples/tiny_moma.py [--steps 60] [--experts 4t4i] [--recompute]

The data is synthetic interleaved text/image token sequences (the bundled real corpus and the full
`moma-pretrain` job come with the data pipeline). Text tokens follow a counting pattern; image spans,
wrapped in begin/end-of-image sentinels, hold codes from a separate id range, so the model learns each
modality's statistics and the routing statistics show modality-separated experts at work.
"""

import argparse
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import moma_plugin as mp

TEXT_VOCAB, IMAGE_CODES = 96, 64
BOI, EOI = TEXT_VOCAB - 2, TEXT_VOCAB - 1  # sentinels are text tokens, as in Chameleon
VOCAB = TEXT_VOCAB + IMAGE_CODES


def interleaved_batch(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq+1] token ids: text runs and image spans (BOI, 16 codes, EOI), interleaved."""
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < seq + 1:
            start = int(torch.randint(0, 90, (1,), generator=generator))
            row += [(start + i) % (TEXT_VOCAB - 2) for i in range(int(torch.randint(4, 20, (1,), generator=generator)))]
            base = int(torch.randint(0, IMAGE_CODES - 16, (1,), generator=generator))
            row += [BOI] + [TEXT_VOCAB + base + (i % 8) for i in range(16)] + [EOI]
        rows.append(row[: seq + 1])
    return torch.tensor(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--experts", default="4t4i")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    torch.manual_seed(args.seed)

    config = mp.MoMaConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
        moma_experts=args.experts, moma_vocab_ranges={"image": (TEXT_VOCAB, VOCAB)},
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, normalization="RMSNorm",
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
           if args.recompute else {}),
    )
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config), vocab_size=VOCAB,
                            max_sequence_length=args.seq_length)
    print(f"MoMa {args.experts}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"groups {[(g.name, g.num_experts) for g in config.moma_expert_groups]}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    position_ids = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)
    start = time.time()
    for step in range(1, args.steps + 1):
        data = interleaved_batch(args.micro_batch_size, args.seq_length, generator)
        tokens, labels = data[:, :-1], data[:, 1:]
        loss_BS = model(tokens, position_ids, None, labels=labels)
        image = labels >= TEXT_VOCAB
        loss = loss_BS.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 1:
            metrics = mp.collect_routing_metrics(model)
            idle = metrics.get("moma/layer1/text/picked_by_0_frac", float("nan"))
            tokens_per_s = step * tokens.numel() / (time.time() - start)
            print(f"step {step:4d} | loss {loss.item():.3f} (text {loss_BS[~image].mean().item():.3f}, "
                  f"image {loss_BS[image].mean().item():.3f}) | {tokens_per_s:,.0f} tok/s | "
                  f"layer1 text tokens picked by no expert {idle:.1%}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
