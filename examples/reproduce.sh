#!/usr/bin/env bash
# The RMT paper's comparison in one script (Tables 1 and 4, Figure 3's reasoning length):
#   0. the base model: a GGUF / Hugging Face checkpoint converted, a Megatron checkpoint as is,
#      or (BASE empty) WARMUP_STEPS of NTP from random initialisation (the tiny CPU model);
#   1. the evaluation set: easy / medium / hard positions of held-out text (EVAL_TEXT), fixed
#      once by the base model's entropy;
#   2. the format cold start (COLDSTART=1; large reasoning models may skip it with COLDSTART=0);
#   3. every variant of VARIANTS (NTP-only, RPT, RMT and its ablations) trained STEPS steps from
#      that one checkpoint, on the same windows in the same order (same seed and data);
#   4. each evaluated the paper's way: NTP and NTR accuracy per level with 95% intervals,
#      reasoning length; the base and cold-start checkpoints too;
#   5. results/: table.md (the paper's table shape), learning.md (first vs last quarter of every
#      run, with intervals), plots/*.png (reward, think length vs B_t, chosen entropy, NTP loss).
# Every stage is skipped when its output exists, and a killed variant resumes from its last
# checkpoint: rerun the same command to continue.
#
# Defaults: SmolLM2-135M-Instruct on the 2-core CPU machine (configs/reproduce_cpu.yaml, 10 steps
# per variant; 88 minutes with the vLLM server while other runs shared the cores, see
# docs/results_smollm2.md). Qwen3 / Qwen2 on GPUs, e.g.:
#   BASE=/models/Qwen3-14B MODEL_CONFIG=configs/qwen3_14b.yaml SCALE=configs/reproduce_paper.yaml \
#   COLDSTART=0 EVAL_BUDGET=160 LAUNCH="torchrun --nproc-per-node 8" STEPS=320 \
#   bash examples/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/vllm_server.sh

OUT=${OUT:-runs/reproduce_smollm2}
BASE=${BASE-../shared/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf}
MODEL_CONFIG=${MODEL_CONFIG:-configs/smollm2_135m.yaml}
SCALE=${SCALE:-configs/reproduce_cpu.yaml}      # batch, budget, G, lr: the run's scale
TRAIN_TEXT=${TRAIN_TEXT:-corpus/sample_math.jsonl}
EVAL_TEXT=${EVAL_TEXT:-../shared/assets/math/math500.jsonl}
EVAL_FIELD=${EVAL_FIELD:-solution}
EVAL_DOCS=${EVAL_DOCS:-100}                       # held-out documents read
EVAL_PER_LEVEL=${EVAL_PER_LEVEL:-20}              # positions per level
EVAL_SAMPLES=${EVAL_SAMPLES:-4}                   # NTR samples per position (pass@1 over them)
EVAL_BUDGET=${EVAL_BUDGET:-8}                     # B in the evaluation prompt of DTB variants
STEPS=${STEPS:-10}
WARMUP_STEPS=${WARMUP_STEPS:-60}
VARIANTS=${VARIANTS-ntp rpt rmt no_dtb no_cas no_ntp}  # VARIANTS="" trains none
COLDSTART=${COLDSTART:-1}
COLDSTART_CONFIG=${COLDSTART_CONFIG:-configs/coldstart_cpu.yaml}
ROLLOUT=${ROLLOUT:-auto}                          # vllm | embedded | auto
LAUNCH=${LAUNCH:-python}                          # e.g. "torchrun --nproc-per-node 8"
PARALLEL=${PARALLEL:-}                            # e.g. "--tensor-model-parallel-size 2"
TOK=${TOK-}                                       # tokenizer flags (preprocessing and runs);
                                                  # default: the converted base's own
EXTRA=${EXTRA:-}                                  # any trainer flags, for every stage
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$OUT/results" "$OUT/metrics"
say() { echo "== $* ($(date +%H:%M:%S))"; }
done_at() { [ -f "$1/latest_checkpointed_iteration.txt" ] && [ "$(cat "$1/latest_checkpointed_iteration.txt")" = "$2" ]; }

# 0. The base model.
if [ -n "$BASE" ] && [ -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  BASE_CKPT=$BASE
else
  BASE_CKPT=$OUT/base
  if [ -n "$BASE" ] && [ ! -d "$BASE_CKPT" ]; then
    say "converting $BASE"
    python tools/convert_hf_to_megatron.py --load "$BASE" --save "$BASE_CKPT"
  fi
fi
[ -n "$TOK" ] || { [ -n "$BASE" ] && TOK="--tokenizer-type HuggingFaceTokenizer --tokenizer-model $BASE_CKPT"; } || true
FLAGS="$TOK $PARALLEL $EXTRA"
MODEL="--config $MODEL_CONFIG $SCALE $FLAGS"
DATA=$OUT/data/train_text_document
if [ ! -f "$DATA.idx" ]; then
  say "preprocessing $TRAIN_TEXT"
  mkdir -p "$OUT/data"
  python tools/preprocess_data.py --input "$TRAIN_TEXT" --output-prefix "$OUT/data/train" \
    $TOK --append-eod --workers 1
fi
if [ -z "$BASE" ] && ! done_at "$BASE_CKPT" "$WARMUP_STEPS"; then
  say "NTP warm-up of the random model, $WARMUP_STEPS steps"
  $LAUNCH -m megatron_rmt.train $MODEL --data-path "$DATA" --rmt-variant ntp \
    --train-iters "$WARMUP_STEPS" --save "$BASE_CKPT" --log-interval 10 \
    $( [ -d "$BASE_CKPT" ] && echo "--load $BASE_CKPT" )
fi

# The rollout engine: one vLLM server for the whole script (examples/vllm_server.sh), or the
# embedded engine.
VLLM_PYTHON=${MEGATRON_RMT_VLLM_PYTHON:-}
if [ "$ROLLOUT" = auto ]; then
  ROLLOUT=embedded
  [ -n "$VLLM_PYTHON" ] && "$VLLM_PYTHON" -c "import vllm" 2>/dev/null && ROLLOUT=vllm
fi
ROLL=""
if [ "$ROLLOUT" = vllm ]; then
  [ -d "$OUT/base_hf" ] || python tools/convert_megatron_to_hf.py --load "$BASE_CKPT" --save "$OUT/base_hf"
  start_vllm_server "$OUT/base_hf" "$OUT"
fi
say "rollouts: $ROLLOUT $ROLL"

# 1. The evaluation set, fixed by the base model.
SET=${SET:-$OUT/results/set.jsonl}                # another run's set compares with its numbers
if [ ! -f "$SET" ]; then
  say "evaluation set from $EVAL_TEXT"
  python -m megatron_rmt.evaluate build-set --eval-data "$EVAL_TEXT" --text-field "$EVAL_FIELD" \
    --max-documents "$EVAL_DOCS" --per-level "$EVAL_PER_LEVEL" --output "$SET" $MODEL --load "$BASE_CKPT"
fi
evaluate() {  # name checkpoint budget-or-empty
  local out=$OUT/results/$1.json
  [ -f "$out" ] && return
  say "evaluating $1"
  $LAUNCH -m megatron_rmt.evaluate run --eval-set "$SET" --samples "$EVAL_SAMPLES" \
    ${3:+--budget $3} --output "$out" --name "$1" $MODEL --load "$2" $ROLL
}
evaluate base "$BASE_CKPT" "$EVAL_BUDGET"

# 2. The format cold start.
START=$BASE_CKPT
if [ "$COLDSTART" = 1 ]; then
  START=$OUT/coldstart
  if ! done_at "$START" 0; then
    say "format cold start"
    $LAUNCH -m megatron_rmt.coldstart --config $MODEL_CONFIG $SCALE $COLDSTART_CONFIG $FLAGS \
      --load "$BASE_CKPT" --data-path "$DATA" --save "$START"
  fi
  evaluate coldstart "$START" "$EVAL_BUDGET"
fi

# 3-4. Every variant from the same checkpoint over the same windows, then its evaluation.
RUNS=()
for v in $VARIANTS; do
  ckpt=$OUT/runs/$v
  if ! done_at "$ckpt" "$STEPS"; then
    say "training $v, $STEPS steps"
    from="--load $START --no-load-optim"
    [ -f "$ckpt/latest_checkpointed_iteration.txt" ] && from="--load $ckpt"  # resume
    $LAUNCH -m megatron_rmt.train --config $MODEL_CONFIG configs/variants/$v.yaml $SCALE \
      $FLAGS $from --data-path "$DATA" --rmt-variant "$v" --train-iters "$STEPS" \
      --save "$ckpt" --save-interval 5 --log-interval 1 --metrics-file "$OUT/metrics/$v.jsonl" $ROLL
  fi
  budget=$EVAL_BUDGET
  case $v in no_dtb|rpt) budget="";; esac  # trained without the budget sentence
  evaluate "$v" "$ckpt" "$budget"
  RUNS+=("$v=$OUT/metrics/$v.jsonl")
done

# 5. Tables and plots.
say "tables and plots"
rows=("$OUT/results/base.json")
[ "$COLDSTART" = 1 ] && rows+=("$OUT/results/coldstart.json")
for v in $VARIANTS; do rows+=("$OUT/results/$v.json"); done
python -m megatron_rmt.evaluate table "${rows[@]}" --output "$OUT/results/table.md"
python - "$OUT/metrics" $VARIANTS >"$OUT/results/learning.md" <<'PY'  # one process for all
import sys
from megatron_rmt.evaluation import learning
for v in sys.argv[2:]:
    print(f"## {v}")
    learning.main([f"{sys.argv[1]}/{v}.jsonl"])
    print()
PY
python tools/plot_runs.py --runs "${RUNS[@]}" --output "$OUT/results/plots"
echo "results: $OUT/results/table.md $OUT/results/learning.md $OUT/results/plots/"
