#!/usr/bin/env bash
# Evaluation the way the RMT paper does, on the tiny CPU model (about two minutes on 2 cores):
#   1. train the tiny model briefly (NTP only: the tiny model cannot follow the reasoning format),
#   2. fix an evaluation set with it as the proxy: entropies of held-out MATH500 solutions
#      (the bundled training sample when ../shared/assets is absent; it overlaps training),
#      bucketed by quantiles (the tiny model is uncertain everywhere, above the fixed 1.5 nats),
#   3. evaluate the initial weights (TP=1) and the trained checkpoint (TP=2 under torchrun):
#      NTP accuracy and NTR pass@1 per level, response and thinking length,
#   4. print the two side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/eval_tiny_cpu}
TOK="--tokenizer-type GPT2BPETokenizer --vocab-file corpus/gpt2_tokenizer/vocab.json \
  --merge-file corpus/gpt2_tokenizer/merges.txt"
# Short rollouts: a thinking budget of 8 tokens, 24 tokens at most.
MODEL="--config configs/tiny_cpu.yaml --budget-initial 8 --max-response-tokens 24"
EVAL="python -m megatron_rmt.evaluate"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

DATA=runs/tiny_cpu/data/sample_text_document  # what examples/rmt_tiny_cpu.sh builds, if it ran
if [ ! -f "$DATA.idx" ]; then
  DATA=$OUT/data/sample_text_document
  [ -f "$DATA.idx" ] || python tools/preprocess_data.py --input corpus/sample_math.jsonl \
    --output-prefix "$OUT/data/sample" $TOK --append-eod --workers 1
fi
if [ ! -f "$OUT/trained/latest_checkpointed_iteration.txt" ]; then
  python -m megatron_rmt.train $MODEL --data-path "$DATA" --rmt-variant ntp \
    --train-iters 40 --global-batch-size 8 --lr 3e-3 --save "$OUT/trained" --log-interval 10
fi

HELD_OUT="--eval-data ../shared/assets/math/math500.jsonl --text-field solution --max-documents 100"
[ -f ../shared/assets/math/math500.jsonl ] || HELD_OUT="--eval-data corpus/sample_math.jsonl"
$EVAL build-set $HELD_OUT --output "$OUT/set.jsonl" --per-level 20 --sample-seed 1234 \
  --bucket-mode quantile $MODEL --load "$OUT/trained"

NTR="--eval-set $OUT/set.jsonl --samples 4 --budget 8"
$EVAL run $NTR --output "$OUT/init.json" --name "init (seed 1234)" $MODEL
torchrun --standalone --nproc-per-node 2 -m megatron_rmt.evaluate run $NTR \
  --output "$OUT/trained.json" --name "NTP 40 steps" $MODEL --load "$OUT/trained" \
  --tensor-model-parallel-size 2

$EVAL table "$OUT/init.json" "$OUT/trained.json" --output "$OUT/table.md"
echo "set: $OUT/set.jsonl  results: $OUT/init.json $OUT/trained.json  table: $OUT/table.md"
