#!/usr/bin/env bash
# MoMa's upcycling (docs/TRAINING.md, "Upcycling") on the bundled data, on CPU: 1t1i for ITERS iterations,
# upcycled to 4t4i and trained ITERS more, against 4t4i from scratch for 2 x ITERS iterations (the same
# FLOPs, within the routers' share); moma-compare tables the runs with the scratch run as the baseline.
#   bash examples/upcycling.sh [RUN_DIR] [ITERS]     (defaults: runs/upcycling 150)
set -euo pipefail
dir=${1:-runs/upcycling}
iters=${2:-150}
config="$(dirname "$0")/configs/tiny_cpu.yaml"
moma-pretrain --config "$config" --moma-experts 1t1i --train-iters "$iters" --run-dir "$dir/1t1i" --no-progress-bar
moma-upcycle --load "$dir/1t1i/checkpoints" --save "$dir/4t4i-upcycled/checkpoints" --moma-experts 4t4i
moma-pretrain --config "$config" --moma-experts 4t4i --train-iters "$iters" --run-dir "$dir/4t4i-upcycled" \
    --save "$dir/4t4i-upcycled/checkpoints" --no-progress-bar
moma-pretrain --config "$config" --moma-experts 4t4i --train-iters $((2 * iters)) --run-dir "$dir/4t4i-scratch" \
    --no-progress-bar
moma-compare "$dir/4t4i-scratch" "$dir/4t4i-upcycled" "$dir/1t1i" --baseline "$dir/4t4i-scratch" \
    --output "$dir/compare.png" --json "$dir/compare.json"
