#!/usr/bin/env bash
# The README's main job: RMT learning on CPU in a few minutes (about 4 on 2 idle cores).
# A tiny Qwen3-shaped model (configs/tiny_cpu.yaml, GPT-2 tokenizer) learns everything here:
#   1. the bundled MATH sample -> Megatron indexed shards;
#   2. NTP warm-up from random initialisation: it learns the corpus (loss ~10.8 -> ~4);
#   3. a held-out evaluation set: 20 positions per level of the corpus's last 16 documents (the
#      trainer's split never trains on them), levels fixed by the warm-up model's entropy;
#   4. the format cold start (megatron_rmt.coldstart): SFT on 'think, then \boxed{its own top-1
#      guess}' responses, so its rollouts become parseable, with plain NTP windows in every
#      step so the model keeps the corpus (configs/coldstart_tiny.yaml); scored held-out;
#   5. RMT with the embedded rollout engine: budget B_t 8 -> 6 tokens, G = 4, easy-to-hard
#      curriculum over per-batch entropy quantiles; reward > 0 from the first steps (length
#      reward, and match reward whenever the boxed token is the true next token); scored
#      held-out on the same positions;
#   6. plots of the run (reward, think length vs B_t, entropy, NTP loss), and the last lines:
#      held-out NTP top-1 and NTR pass@1 after the cold start and at the end, paired intervals.
# Each stage is skipped when its output exists (rerun to continue; delete $OUT to start over).
# STEPS=20 for more RMT steps, TP=2 to run them under torchrun; extra flags go to the RMT stage.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny_cpu}
STEPS=${STEPS:-12}
TP=${TP:-1}
export OMP_NUM_THREADS=1
TOK="--tokenizer-type GPT2BPETokenizer --vocab-file corpus/gpt2_tokenizer/vocab.json \
  --merge-file corpus/gpt2_tokenizer/merges.txt"
DATA=$OUT/data/sample_text_document
# Shared by the cold start (its budgets are this run's B_T..B_0) and the RMT run.
RMT="--budget-initial 8 --budget-min 6 --max-response-tokens 24"
done_at() { [ "$(cat "$1/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$2" ]; }
say() { echo "== $* ($(date +%H:%M:%S))"; }

if [ ! -f "$DATA.idx" ]; then
  say "preprocessing corpus/sample_math.jsonl"
  python tools/preprocess_data.py --input corpus/sample_math.jsonl \
    --output-prefix "$OUT/data/sample" $TOK --append-eod --workers 1
fi
if ! done_at "$OUT/warmup" 100; then
  say "NTP warm-up from random init, 100 steps"
  python -m megatron_rmt.train --config configs/tiny_cpu.yaml --rmt-variant ntp \
    --data-path "$DATA" --train-iters 100 --global-batch-size 8 --micro-batch-size 8 \
    --lr 3e-3 --log-interval 20 --save "$OUT/warmup"
fi
# Held-out text: the corpus's last 16 documents, which the trainer's split (969,30,1: the
# first 484 documents train) never trains on; 20 positions per level of it (few, to keep the
# job at minutes: docs/coldstart.md has the 300-position measurements), fixed once by the
# warm-up model's entropy, score every checkpoint below on the same positions.
HELD=$OUT/data/heldout.jsonl
SET=$OUT/eval/set.jsonl
EVAL_FLAGS="--config configs/tiny_cpu.yaml $RMT --bucket-mode quantile"
evaluate() {  # CHECKPOINT NAME: held-out NTP top-1 / NTR pass@1 (G = 4, B = 8)
  [ -f "$OUT/eval/$2.json" ] && return
  TEXT_LOSS=0 SAMPLES=4 BUDGET=8 bash examples/coldstart_eval.sh "$1" "$2" "$OUT/eval" "$SET" "$HELD" $EVAL_FLAGS
}
if [ ! -f "$SET" ]; then
  say "held-out evaluation set"
  mkdir -p "$OUT/eval"
  sed -n 485,500p corpus/sample_math.jsonl >"$HELD"
  python -m megatron_rmt.evaluate build-set --eval-data "$HELD" --output "$SET" --per-level 20 \
    $EVAL_FLAGS --load "$OUT/warmup" --eval-micro-batch 8 >"$OUT/eval/set.log" 2>&1
  TEXT_LOSS=0 SAMPLES=0 bash examples/coldstart_eval.sh "$OUT/warmup" warmup "$OUT/eval" "$SET" "$HELD" $EVAL_FLAGS
fi
if ! done_at "$OUT/coldstart" 0; then
  say "format cold start"
  python -m megatron_rmt.coldstart --config configs/tiny_cpu.yaml configs/coldstart_tiny.yaml $RMT \
    --load "$OUT/warmup" --data-path "$DATA" --save "$OUT/coldstart"
fi
say "held-out evaluation of the cold start"
evaluate "$OUT/coldstart" coldstart
# RMT from the cold start; redone when its flags change (the flags are kept beside it).
if ! done_at "$OUT/checkpoints" "$STEPS" || [ "$(cat "$OUT/checkpoints/flags" 2>/dev/null)" != "$*" ]; then
  say "RMT, $STEPS steps, TP=$TP"
  rm -rf "$OUT/checkpoints" "$OUT/metrics.jsonl" "$OUT/tensorboard" "$OUT/eval/rmt.json"
  LAUNCH=python
  [ "$TP" -gt 1 ] && LAUNCH="torchrun --standalone --nproc-per-node $TP"
  $LAUNCH -m megatron_rmt.train --config configs/tiny_cpu.yaml $RMT --tensor-model-parallel-size "$TP" \
    --bucket-mode quantile --lr 3e-4 --train-iters "$STEPS" \
    --data-path "$DATA" --load "$OUT/coldstart" --no-load-optim \
    --save "$OUT/checkpoints" --save-interval 1000 \
    --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" "$@"
  echo "$*" >"$OUT/checkpoints/flags"
fi
say "held-out evaluation after RMT"
evaluate "$OUT/checkpoints" rmt
python tools/plot_runs.py --runs rmt="$OUT/metrics.jsonl" --output "$OUT/plots"
echo "metrics: $OUT/metrics.jsonl  tensorboard: $OUT/tensorboard  checkpoint: $OUT/checkpoints"
# The verdict, read back from the metrics file.
python - "$OUT/metrics.jsonl" "$OUT/plots" <<'PY'
import json, sys
rows = {r["step"]: r for r in map(json.loads, open(sys.argv[1]))}
steps = [rows[s] for s in sorted(rows)]
hit = [r["step"] for r in steps if r["reward"] > 0]
acc = [r["step"] for r in steps if r["match_acc"] > 0]
rl = sum(r["rl_loss"] != 0 for r in steps)
for key in ("reward", "match_acc", "rl_loss"):
    print(f"{key:>9} per step: " + " ".join(f"{r[key]:+.3f}" for r in steps))
first = f"reached, first at step {hit[0]}" if hit else "never reached"
print(f"RMT: reward > 0 {first} ({len(hit)}/{len(steps)} steps); match acc > 0 on "
      f"{len(acc)} steps {acc}; RL loss nonzero on {rl} steps; plots: {sys.argv[2]}/")
PY
# Held-out, same positions for every checkpoint: NTP top-1 and NTR pass@1 after the cold start
# and at the end, with paired 95% intervals (evaluation/transfer.py, evaluation/paired.py).
python -m megatron_rmt.evaluation.transfer \
  "$OUT/eval/coldstart.json" "$OUT/eval/rmt.json" --output "$OUT/eval/transfer.md" | sed -n 1,4p
python -m megatron_rmt.evaluation.paired "$OUT/eval/coldstart.json" "$OUT/eval/rmt.json" \
  --output "$OUT/eval/paired.md" | sed -n 3,4p
python - "$OUT/eval" <<'PY'
import json, sys
d = sys.argv[1]
warm = json.load(open(f"{d}/warmup.json"))["ntp"]["all"]
for name in ("coldstart", "rmt"):
    r = json.load(open(f"{d}/{name}.json"))
    print(f"held-out after {'the cold start' if name == 'coldstart' else 'RMT'}: NTP top-1 "
          f"{100 * r['ntp']['all']['accuracy']:.1f}% (warm-up {100 * warm['accuracy']:.1f}%), "
          f"NTR pass@1 {100 * r['ntr']['all']['accuracy']:.1f}%, NTP loss there "
          f"{r['ntp']['all']['loss']:.3f} (warm-up {warm['loss']:.3f}) "
          f"({r['per_position']['ntp'].__len__()} positions, tables: {d}/transfer.md)")
PY
