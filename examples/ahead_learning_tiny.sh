#!/usr/bin/env bash
# Does one-step-ahead learning match on-policy learning? The main job's tiny model (examples/
# rmt_tiny_cpu.sh) trained twice from the same cold start over the same STEPS steps and windows,
# on-policy and with --rollout-ahead 1 (docs/rollout.md), embedded engine, then compared:
# per-step reward, match accuracy and NTP loss paired step by step (evaluation/learning.py
# --against), held-out NTP top-1 and NTR pass@1 paired over the same positions
# (evaluation/paired.py). The second run reuses the first's warm-up, evaluation set and cold start.
set -euo pipefail
cd "$(dirname "$0")/.."
ON=${ON:-runs/tiny_on} AHEAD=${AHEAD:-runs/tiny_ahead}
export STEPS=${STEPS:-40}
OUT=$ON bash examples/rmt_tiny_cpu.sh
if [ ! -d "$AHEAD" ]; then
  mkdir -p "$AHEAD/eval"
  cp -r "$ON/data" "$ON/warmup" "$ON/coldstart" "$AHEAD/"
  cp "$ON"/eval/{set.jsonl,warmup.json,coldstart.json} "$AHEAD/eval/"
fi
OUT=$AHEAD bash examples/rmt_tiny_cpu.sh --rollout-ahead 1
python -m megatron_rmt.evaluation.learning "$AHEAD/metrics.jsonl" --against "$ON/metrics.jsonl" \
  --against-keys reward,match_acc,think_len,ntp_loss | tee "$AHEAD/learning_vs_on_policy.md"
python -m megatron_rmt.evaluation.paired "$ON/eval/rmt.json" "$AHEAD/eval/rmt.json" \
  --output "$AHEAD/paired_vs_on_policy.md"
