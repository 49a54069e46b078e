#!/usr/bin/env bash
# The README's main job: a tiny RMT run on CPU in a few minutes.
# Preprocesses the bundled MATH sample, then trains a tiny Qwen3-shaped model with TP=2 on gloo,
# rollouts from the embedded engine. Override anything with extra flags, e.g. `--train-iters 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny_cpu}
TOK="--tokenizer-type GPT2BPETokenizer --vocab-file corpus/gpt2_tokenizer/vocab.json \
  --merge-file corpus/gpt2_tokenizer/merges.txt"
mkdir -p "$OUT/data"
if [ ! -f "$OUT/data/sample_text_document.idx" ]; then
  python tools/preprocess_data.py --input corpus/sample_math.jsonl \
    --output-prefix "$OUT/data/sample" $TOK --append-eod --workers 1
fi
export OMP_NUM_THREADS=1
torchrun --standalone --nproc-per-node 2 -m megatron_rmt.train \
  --config configs/tiny_cpu.yaml \
  --tensor-model-parallel-size 2 \
  --data-path "$OUT/data/sample_text_document" \
  --save "$OUT/checkpoints" --save-interval 1000 \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" \
  "$@"
echo "metrics: $OUT/metrics.jsonl  tensorboard: $OUT/tensorboard  checkpoint: $OUT/checkpoints"
