"""Train a tiny 4t4i MoMa model on the bundled corpus, on CPU, in about a minute.

    python examples/tiny_moma.py [--steps 150] [--experts 4t4i] [--recompute]

First run: builds the bundled corpus (handwritten digits and photo crops that ship in scikit-learn,
captioned) and preprocesses it into a Megatron indexed dataset under $MOMA_CACHE (a few seconds).
Training draws micro-batches with the balanced sampler, so the text:image token ratio of every
micro-batch stays within 5% of the 1:1 expert ratio. A minimal loop to read; the full job (checkpoints,
resume, TensorBoard, FLOPs accounting, evaluation) is `moma-pretrain` (docs/TRAINING.md).
"""

import argparse
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import moma_plugin as mp  # noqa: E402
from moma_plugin.data.corpus import bundled_dataset_prefix  # noqa: E402
from moma_plugin.data.dataset import build_datasets  # noqa: E402
from moma_plugin.data.sampler import BalancedSampler, target_shares_from_experts  # noqa: E402
from moma_plugin.training.step import (  # noqa: E402
    collate, forward_loss, label_modalities, modality_loss_sums,
)
from moma_plugin.training.metrics_log import losses_from_sums  # noqa: E402


@torch.no_grad()
def per_modality_loss(model, dataset, batch_size=16):
    """Held-out loss per modality of the predicted token, as moma-pretrain's evaluation counts it."""
    model.eval()
    sums = torch.zeros(2, len(dataset.layout.modalities), dtype=torch.float64)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        sums += modality_loss_sums(forward_loss(model, batch), batch["loss_mask"],
                                   label_modalities(batch, dataset.layout), sums.shape[1])
    model.train()
    return losses_from_sums(sums, dataset.layout.modalities)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--experts", default="4t4i")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    torch.manual_seed(args.seed)

    train, valid = build_datasets([bundled_dataset_prefix()], args.seq_length, seed=args.seed)
    layout = train.layout
    config = mp.MoMaConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
        moma_experts=args.experts, moma_vocab_ranges=layout.vocab_ranges(),
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, normalization="RMSNorm",
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
           if args.recompute else {}),
    )
    model = mp.MoMaGPTModel(config, mp.get_moma_layer_spec(config), vocab_size=layout.vocab_size,
                            max_sequence_length=args.seq_length)
    shares = target_shares_from_experts(args.experts)
    sampler = BalancedSampler(train.modality_counts(), args.micro_batch_size, 1, shares,
                              tolerance=0.05, seed=args.seed, strict=False)
    print(f"MoMa {args.experts}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(train)} training and {len(valid)} held-out samples of {args.seq_length} tokens; "
          f"vocabulary {layout.vocab_size} (image codes {layout.range_of('image')})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = collate([train[i] for i in sampler.next_step()[0]])
        loss_BS = forward_loss(model, batch)
        optimizer.zero_grad()
        loss_BS.mean().backward()
        optimizer.step()
        if step % 25 == 0 or step == 1:
            image = batch["labels"] >= layout.range_of("image")[0]
            metrics = mp.collect_routing_metrics(model)
            loads = [metrics[f"moma/layer1/{g}/tokens_per_expert_{s}"]
                     for g in ("text", "image") for s in ("min", "max")] if shares else []
            image_share = sampler.stats()["last_step_shares"][0][1] if shares else float("nan")
            tokens_per_s = step * batch["tokens"].numel() / (time.time() - start)
            print(f"step {step:4d} | loss {loss_BS.mean().item():.3f} (text "
                  f"{loss_BS[~image].mean().item():.3f}, image {loss_BS[image].mean().item():.3f}) | "
                  f"{tokens_per_s:,.0f} tok/s | image share {image_share:.3f} | "
                  f"layer1 tokens/expert text {loads[:2]} image {loads[2:]}")
    held_out = per_modality_loss(model, valid)
    stats = sampler.stats()
    print(f"done in {time.time() - start:.1f}s | held-out loss text {held_out['loss_text']:.3f}, image "
          f"{held_out['loss_image']:.3f} | sampler worst ratio deviation "
          f"{stats.get('worst_deviation', float('nan')):.3f}, steps outside the bound "
          f"{stats['violations']}")


if __name__ == "__main__":
    main()
