#!/usr/bin/env bash
# Held-out evaluation of one checkpoint for the cold-start measurements (docs/coldstart.md):
# NTP top-1 and NTR pass@1 (G samples, budget B) on a fixed evaluation set, and the NTP loss
# over every token of the held-out text.
#   bash examples/coldstart_eval.sh CKPT NAME OUTDIR SET HELD_OUT [trainer flags: model, RMT ...]
# Writes OUTDIR/NAME.json (evaluate run, with per-position values) and OUTDIR/NAME.loss.json.
# SAMPLES (4) and BUDGET (8) set G and B; TEXT_LOSS=0 skips the held-out text loss.
set -euo pipefail
CKPT=$1 NAME=$2 OUTDIR=$3 SET=$4 HELD=$5
shift 5
mkdir -p "$OUTDIR"
python -m megatron_rmt.evaluate run --eval-set "$SET" --output "$OUTDIR/$NAME.json" --name "$NAME" \
  --samples "${SAMPLES:-4}" --budget "${BUDGET:-8}" --ntr-batch 50 --eval-micro-batch 8 \
  --load "$CKPT" "$@" >"$OUTDIR/$NAME.eval.log" 2>&1
[ "${TEXT_LOSS:-1}" = 1 ] || exit 0
python -m megatron_rmt.evaluation.text_loss --eval-data "$HELD" --output "$OUTDIR/$NAME.loss.json" \
  --load "$CKPT" "$@" >"$OUTDIR/$NAME.loss.log" 2>&1
