#!/usr/bin/env bash
# RMT against its baseline and ablations, evaluated the paper's way, on the tiny CPU model:
# every variant (rmt, no_dtb, no_cas, no_ntp, rpt, ntp) trains STEPS steps from the same
# initial weights (the same --seed) on the same data, then `evaluate run` scores each on one fixed set and
# `evaluate table` prints them side by side. Run examples/eval_tiny_cpu.sh first (it builds the
# set and the data). The tiny model is random and never writes the answer format, so the RL
# variants get no reward signal here: this shows the pipeline; real comparisons need a real model
# (e.g. SmolLM2 or Qwen3 with --rollout-url).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/compare_tiny_cpu}
STEPS=${STEPS:-6}
SET=${SET:-runs/eval_tiny_cpu/set.jsonl}
DATA=${DATA:-runs/tiny_cpu/data/sample_text_document}
[ -f "$DATA.idx" ] || DATA=runs/eval_tiny_cpu/data/sample_text_document
if [ ! -f "$SET" ] || [ ! -f "$DATA.idx" ]; then
  echo "run examples/eval_tiny_cpu.sh first (it writes $SET and the data)" >&2
  exit 1
fi
MODEL="--config configs/tiny_cpu.yaml --budget-initial 8 --max-response-tokens 24"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
results=()
for variant in rmt no_dtb no_cas no_ntp rpt ntp; do
  if [ ! -f "$OUT/$variant/latest_checkpointed_iteration.txt" ]; then
    python -m megatron_rmt.train $MODEL --data-path "$DATA" --rmt-variant "$variant" \
      --train-iters "$STEPS" --save "$OUT/$variant" --log-interval "$STEPS" \
      --metrics-file "$OUT/$variant.metrics.jsonl"
  fi
  python -m megatron_rmt.evaluate run --eval-set "$SET" --samples 4 --budget 8 \
    --output "$OUT/$variant.json" --name "$variant, $STEPS steps" $MODEL --load "$OUT/$variant"
  results+=("$OUT/$variant.json")
done
python -m megatron_rmt.evaluate table "${results[@]}" --output "$OUT/table.md"
echo "checkpoints, metrics and results under $OUT; table: $OUT/table.md"
