#!/usr/bin/env bash
# Pretrain -> train the auxiliary routers (stage 2) -> generate causally, on the bundled data, on CPU.
#   bash examples/causal_pipeline.sh [RUN_DIR] [extra moma-pretrain flags...]
# e.g. bash examples/causal_pipeline.sh runs/mod-4t4i --mod-interval 2
set -euo pipefail
run=${1:-runs/causal-4t4i}
shift || true
moma-pretrain --config "$(dirname "$0")/configs/tiny_cpu.yaml" --run-dir "$run" --no-progress-bar "$@"
moma-train-aux-routers --load "$run/checkpoints" --save "$run/checkpoints-aux" --train-iters 300
moma-generate --load "$run/checkpoints-aux" --compare-kv-cache --max-new-tokens 96 \
    --output-dir "$run/generations" \
    --prompt "Here is a handwritten seven." --prompt "First a three:<image>" \
    --prompt "A row of handwritten digits: two, five." --prompt "Four is even,"
