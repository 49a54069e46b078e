#!/usr/bin/env bash
# Math post-training on CPU: GRPO on the bundled MATH train problems, from the checkpoint that
# examples/rmt_tiny_cpu.sh wrote (run that first), with TP=2 and the embedded rollout engine.
# The tiny model is random, so its accuracy stays 0: this shows the pipeline, not learning.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny_cpu}
if [ ! -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ]; then
  echo "no checkpoint in $OUT/checkpoints: run examples/rmt_tiny_cpu.sh first" >&2
  exit 1
fi
export OMP_NUM_THREADS=1
torchrun --standalone --nproc-per-node 2 -m megatron_rmt.posttrain \
  --config configs/tiny_cpu.yaml configs/posttrain_tiny_cpu.yaml \
  --tensor-model-parallel-size 2 \
  --prompt-data ../shared/assets/math/math_train.jsonl \
  --load "$OUT/checkpoints" --no-load-optim \
  --save "$OUT/posttrain_checkpoints" --metrics-file "$OUT/posttrain_metrics.jsonl" \
  "$@"
echo "metrics: $OUT/posttrain_metrics.jsonl  checkpoint: $OUT/posttrain_checkpoints"
