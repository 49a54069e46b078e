#!/usr/bin/env bash
# The cold-start recipe measurements on the main job's tiny model (docs/coldstart.md): every
# recipe is one cold start from the same warm-up checkpoint, scored on the same 300 held-out
# positions (100 per level, G = 4, B = 8) and on the held-out text's NTP loss.
#   OUT=/tmp/tiny bash examples/rmt_tiny_cpu.sh     # once: the warm-up checkpoint and shards
#   WARMUP=/tmp/tiny/warmup DATA=/tmp/tiny/data/sample_text_document bash examples/coldstart_sweep.sh NAME...
# Held-out text: the corpus's last 16 documents, the ones the trainer's split (969,30,1) never
# trains on. The table lands in $RES/table.md. Recipes are named in `recipe` below.
set -euo pipefail
cd "$(dirname "$0")/.."
WARMUP=${WARMUP:-/tmp/tiny/warmup}
DATA=${DATA:-/tmp/tiny/data/sample_text_document}
WORK=${WORK:-/tmp/cs}
RES=${RES:-results/coldstart_tiny}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RMT="--budget-initial 8 --budget-min 6 --max-response-tokens 24"
MODEL="--config configs/tiny_cpu.yaml $RMT"
mkdir -p "$WORK" "$RES"
HELD=$WORK/held.jsonl
SET=$WORK/set.jsonl
[ -f "$HELD" ] || sed -n 485,500p corpus/sample_math.jsonl >"$HELD"
[ -f "$SET" ] || python -m megatron_rmt.evaluate build-set --eval-data "$HELD" --output "$SET" \
  --per-level 100 $MODEL --bucket-mode quantile --load "$WARMUP" --eval-micro-batch 8
[ -f "$RES/warmup.loss.json" ] || SAMPLES=0 bash examples/coldstart_eval.sh "$WARMUP" warmup "$RES" "$SET" "$HELD" $MODEL

recipe() {  # the cold-start flags of each named recipe (after configs/coldstart_tiny.yaml)
  local mix="--coldstart-ntp-windows 8 --coldstart-ntp-weight 1.0"
  local restate="--coldstart-think restate --coldstart-restate-tokens 5 --coldstart-exact-box"
  case $1 in
    old) echo "" ;;                                   # the main job's recipe before this work
    mix) echo "$mix" ;;                               # + plain NTP windows in every step
    mix_exact) echo "$mix --coldstart-exact-box" ;;   # + the box holds the guess token itself
    restate) echo "$mix $restate" ;;                  # + think = the text's last 5 tokens, guess
    restate_nomix) echo "$restate" ;;
    first) echo "$mix --coldstart-think guess_first --coldstart-exact-box" ;;  # think = guess x B
    restated) echo "$mix --prompt-template ntr_restated --coldstart-think guess_first --coldstart-exact-box" ;;
    restated_nomix) echo "--prompt-template ntr_restated --coldstart-think guess_first --coldstart-exact-box" ;;
    phrase) echo "$mix --prompt-template ntr_restated --coldstart-think guess_phrase --coldstart-exact-box --coldstart-budgets 6 6" ;;
    phrase_6ep) echo "$(recipe phrase) --coldstart-epochs 6" ;;
    phrase_base) echo "$mix --coldstart-think guess_phrase --coldstart-exact-box --coldstart-budgets 6 6" ;;
    first_6ep) echo "$mix --coldstart-think guess_first --coldstart-exact-box --coldstart-epochs 6" ;;
    restate_lr1e3) echo "$mix $restate --lr 1e-3" ;;
    restate_6ep) echo "$mix $restate --coldstart-epochs 6" ;;
    restate_more) echo "$mix $restate --coldstart-per-level 200 --coldstart-max-documents 200" ;;
    *) echo "unknown recipe $1" >&2; exit 2 ;;
  esac
}

for NAME in "$@"; do
  CK=$WORK/ck/$NAME
  if [ ! -f "$CK/latest_checkpointed_iteration.txt" ]; then
    echo "== cold start $NAME: $(recipe "$NAME") ($(date +%H:%M:%S))"
    rm -rf "$CK"
    start=$(date +%s)
    python -m megatron_rmt.coldstart --config configs/tiny_cpu.yaml configs/coldstart_tiny.yaml $RMT --load "$WARMUP" \
      --data-path "$DATA" --save "$CK" $(recipe "$NAME") >"$WORK/$NAME.coldstart.log" 2>&1
    echo "$(( $(date +%s) - start ))" >"$CK/seconds"
  fi
  if [ ! -f "$RES/$NAME.loss.json" ]; then
    echo "== evaluating $NAME ($(date +%H:%M:%S))"
    # the recipe's prompt template is the one its checkpoint answers
    # a recipe with one budget is scored at that budget, the others at B = 8
    B=$(recipe "$NAME" | grep -o -- "--coldstart-budgets [0-9]* [0-9]*" | awk '{print $3}')
    BUDGET=${B:-8} bash examples/coldstart_eval.sh "$CK" "$NAME" "$RES" "$SET" "$HELD" $MODEL \
      $(recipe "$NAME" | grep -o -- "--prompt-template [a-z_]*" || true)
  fi
  cp "$CK/coldstart.json" "$RES/$NAME.coldstart.json"
  echo "$(recipe "$NAME")" >"$RES/$NAME.flags"
  cp "$CK/seconds" "$RES/$NAME.seconds"
done
python -m megatron_rmt.evaluation.transfer --base-loss "$RES/warmup.loss.json" \
  $(ls "$RES"/*.json | grep -v 'loss.json\|coldstart.json\|warmup.json') --output "$RES/table.md"
