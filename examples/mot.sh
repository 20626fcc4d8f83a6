#!/usr/bin/env bash
# Mixture-of-Transformers (MoT) on the bundled data, on CPU, against the dense baseline and MoMa: four
# runs of the tiny config for ITERS iterations each, on the same data in the same order:
#   dense      --moma-experts dense               the dense baseline
#   mot        --moma-experts 1t1i --mot all       MoT: attention projections, norms and FFN untied per
#                                                  modality (text, image)
#   4t4i       --moma-experts 4t4i                 MoMa: 4 text + 4 image experts, expert-choice routing
#   mot-4t1i   --moma-experts 4t1i --mot all       MoT + text MoE: the text FFN a 4-expert MoE, the image
#                                                  FFN a plain untied FFN
# FLOPs-matched: dense, MoT and 4t4i cost the same FLOPs per token up to the routers (MoT unties weights,
# not compute; 4t4i's experts at capacity factor 1 route one expert per token on average), and so does
# MoT + text MoE. The comparison is therefore loss at equal training FLOPs (moma-compare's eta, dense as
# the baseline); the held-out losses are each run's final "held-out loss" line and its last "eval"
# record in metrics.jsonl. The measured table is in docs/MOT.md, "Measured".
# --no-balanced-sampler on all four runs: 4t1i's expert ratio (80% text) is not the data's (52% text),
# which the balanced sampler warns about; plain shuffled batches give every run the same data order.
#   bash examples/mot.sh [RUN_DIR] [ITERS]     (defaults: runs/mot 300)
set -euo pipefail
dir=${1:-runs/mot}
iters=${2:-300}
config="$(dirname "$0")/configs/tiny_cpu.yaml"
train() {  # train NAME FLAGS...
    local name=$1
    shift
    moma-pretrain --config "$config" "$@" --train-iters "$iters" --no-balanced-sampler --run-dir "$dir/$name" \
        --no-progress-bar
}
train dense --moma-experts dense
train mot --moma-experts 1t1i --mot all
train 4t4i --moma-experts 4t4i
train mot-4t1i --moma-experts 4t1i --mot all
moma-compare "$dir/dense" "$dir/mot" "$dir/4t4i" "$dir/mot-4t1i" --baseline "$dir/dense" \
    --output "$dir/compare.png" --json "$dir/compare.json"
