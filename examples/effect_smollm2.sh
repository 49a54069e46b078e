#!/usr/bin/env bash
# Does next-token reasoning overtake next-token prediction after RMT? The experiment of
# docs/results_smollm2.md on SmolLM2-135M-Instruct, 2-core CPU, real vLLM server:
#   0. the base (the GGUF converted), the training shards (corpus/sample_math.jsonl), and an
#      evaluation set of 3 x PER_LEVEL positions of held-out MATH500 solutions, levels fixed
#      once by the base model's entropy;
#   1. the format cold start (COLDSTART_CONFIG, configs/coldstart_smollm2.yaml: self-distillation,
#      never the true token, plain NTP mixed in);
#   2. RMT for STEPS steps from the cold start;
#   3. compute-matched baselines from the cold start (beyond the paper): NTP only for the RMT
#      run's training FLOPs (NTP pass + RL pass + rollout generation, compute.py), and the
#      cold-start SFT continued for those FLOPs;
#   3b. with AHEAD=1, the same RMT run with one-step-ahead rollouts (docs/rollout.md);
#   4. every checkpoint scored on the same positions: NTP top-1, NTR pass@1 over SAMPLES samples
#      at budget EVAL_BUDGET, held-out NTP loss; paired bootstrap intervals
#      (evaluation/transfer.py) in $OUT/results/transfer.md, the paper's table in table.md.
# Every stage is skipped when its output exists and a killed run resumes from its checkpoint:
# rerun the same command to continue. Set MEGATRON_RMT_VLLM_PYTHON to .venv-vllm's python.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/vllm_server.sh

OUT=${OUT:-runs/effect_smollm2}
GGUF=${GGUF:-../shared/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf}
EVAL_TEXT=${EVAL_TEXT:-../shared/assets/math/math500.jsonl}
EVAL_DOCS=${EVAL_DOCS:-100}                # held-out documents the positions come from
LOSS_DOCS=${LOSS_DOCS:-40}                 # of those, the ones the held-out NTP loss reads
PER_LEVEL=${PER_LEVEL:-100}
SAMPLES=${SAMPLES:-4}
EVAL_BUDGET=${EVAL_BUDGET:-8}
STEPS=${STEPS:-40}
BASELINES=${BASELINES:-1}  # 0: no compute-matched baselines (stage 3)
AHEAD=${AHEAD:-0}          # 1: also RMT with one-step-ahead rollouts (--rollout-ahead 1), same steps
# The run's presets (configs/effect_smollm2.yaml: template, budgets, batch), the cold start's
# after them, and EXTRA: trainer flags for every stage.
CONFIGS=${CONFIGS:-"configs/smollm2_135m.yaml configs/reproduce_cpu.yaml configs/effect_smollm2.yaml"}
COLDSTART_CONFIG=${COLDSTART_CONFIG:-configs/coldstart_smollm2.yaml}
EXTRA=${EXTRA:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # one trainer process at a time
# Trainer and server share the two cores: OpenMP threads that spin while they wait starve the
# other process (docs/rollout.md, "Sharing the cores"), so both sleep instead.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# The server decodes while the trainer waits (evaluation) or computes (RMT steps): two threads,
# and KV cache for the evaluation's 50 x 4 sequences (SmolLM2 in fp32: 46 KB a token).
export SERVE_FLAGS=${SERVE_FLAGS:-"--cpu-threads 2 -- --kv-cache-memory-bytes 1073741824"}
say() { echo "== $* ($(date +%H:%M:%S))"; }
done_at() { [ -f "$1/latest_checkpointed_iteration.txt" ] && [ "$(cat "$1/latest_checkpointed_iteration.txt")" = "$2" ]; }
R=$OUT/results
mkdir -p "$R" "$OUT/metrics"

BASE=$OUT/base
[ -d "$BASE" ] || { say "converting $GGUF"; python tools/convert_hf_to_megatron.py --load "$GGUF" --save "$BASE"; }
TOK="--tokenizer-type HuggingFaceTokenizer --tokenizer-model $BASE"
FLAGS="$TOK $EXTRA"
MODEL="--config $CONFIGS $FLAGS"
DATA=$OUT/data/train_text_document
if [ ! -f "$DATA.idx" ]; then
  mkdir -p "$OUT/data"
  python tools/preprocess_data.py --input corpus/sample_math.jsonl --output-prefix "$OUT/data/train" \
    $TOK --append-eod --workers 1
fi
HELD="--eval-data $EVAL_TEXT --text-field solution"
SET=$R/set.jsonl
[ -f "$SET" ] || python -m megatron_rmt.evaluate build-set $HELD --max-documents "$EVAL_DOCS" --per-level "$PER_LEVEL" \
  --output "$SET" $MODEL --load "$BASE" --eval-micro-batch 8
[ -d "$OUT/base_hf" ] || python tools/convert_megatron_to_hf.py --load "$BASE" --save "$OUT/base_hf"
start_vllm_server "$OUT/base_hf" "$OUT"

evaluate() {  # name checkpoint samples: evaluation set (NTP, NTR) and held-out text loss
  [ -f "$R/$1.json" ] || { say "evaluating $1"; python -m megatron_rmt.evaluate run --eval-set "$SET" \
    --samples "$3" --budget "$EVAL_BUDGET" --ntr-batch 50 --eval-micro-batch 8 --output "$R/$1.json" \
    --name "$1" $MODEL --load "$2" $ROLL >"$R/$1.eval.log" 2>&1; }
  [ -f "$R/$1.loss.json" ] || python -m megatron_rmt.evaluation.text_loss $HELD --max-documents "$LOSS_DOCS" \
    --output "$R/$1.loss.json" $MODEL --load "$2" >"$R/$1.loss.log" 2>&1
}
train() {  # name variant steps [flags]: a run from the cold start, resumed when killed
  local ckpt=$OUT/runs/$1 from="--load $OUT/coldstart --no-load-optim"
  done_at "$ckpt" "$3" && return
  [ -f "$ckpt/latest_checkpointed_iteration.txt" ] && from="--load $ckpt"
  say "training $1 ($2), $3 steps"
  python -m megatron_rmt.train --config $CONFIGS configs/variants/$2.yaml $FLAGS $from ${@:4} \
    --data-path "$DATA" --train-iters "$3" --save "$ckpt" --save-interval 10 --keep-last-n-checkpoints 1 \
    --log-interval 1 --metrics-file "$OUT/metrics/$1.jsonl" $ROLL
}
total_flops() { python -c "import json,sys; print(sum(json.loads(l)['flops'] for l in open(sys.argv[1])))" "$1"; }

evaluate base "$BASE" 0
if ! done_at "$OUT/coldstart" 0; then
  say "format cold start"
  python -m megatron_rmt.coldstart --config $CONFIGS $COLDSTART_CONFIG $FLAGS --load "$BASE" --data-path "$DATA" \
    --save "$OUT/coldstart" 2>&1 | tee "$OUT/coldstart.log"
fi
evaluate coldstart "$OUT/coldstart" "$SAMPLES"
python -m megatron_rmt.evaluation.transfer --base-loss "$R/base.loss.json" "$R/coldstart.json" \
  --output "$R/transfer.md"

train rmt rmt "$STEPS"
evaluate rmt "$OUT/runs/rmt" "$SAMPLES"
FLOPS=$(total_flops "$OUT/metrics/rmt.jsonl")
if [ "$AHEAD" = 1 ]; then
  train rmt_ahead rmt "$STEPS" --rollout-ahead 1
  evaluate rmt_ahead "$OUT/runs/rmt_ahead" "$SAMPLES"
fi
if [ "$BASELINES" = 1 ]; then
  # NTP only: an NTP step costs the RMT step's NTP pass (the same windows, forward and backward).
  NTP_STEPS=$(python -c "import json,math,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
print(math.ceil(float(sys.argv[2]) / (sum(x['flops_ntp'] for x in r) / len(r))))" "$OUT/metrics/rmt.jsonl" "$FLOPS")
  say "RMT: $FLOPS FLOPs; NTP-only matched: $NTP_STEPS steps"
  train ntp_matched ntp "$NTP_STEPS"
  evaluate ntp_matched "$OUT/runs/ntp_matched" "$SAMPLES"
  # The cold start continued: the same recipe from the cold-started model (its own guesses now),
  # for the steps (of the cold start's mean cost) that spend the RMT run's FLOPs: the epochs
  # that hold them, stopped there.
  if ! done_at "$OUT/sft_matched" 0; then
    read -r EPOCHS SFT_STEPS < <(python -c "import json,math,sys; c=json.load(open(sys.argv[1])); \
n=math.ceil(float(sys.argv[2]) / (c['flops'] / c['steps'])); print(math.ceil(n / (c['steps'] / c['epochs'])), n)" \
      "$OUT/coldstart/coldstart.json" "$FLOPS")
    say "SFT continued: $SFT_STEPS steps ($EPOCHS epochs)"
    python -m megatron_rmt.coldstart --config $CONFIGS $COLDSTART_CONFIG $FLAGS --coldstart-epochs "$EPOCHS" \
      --coldstart-max-steps "$SFT_STEPS" --load "$OUT/coldstart" --data-path "$DATA" --save "$OUT/sft_matched" \
      2>&1 | tee "$OUT/sft_matched.log"
  fi
  evaluate sft_matched "$OUT/sft_matched" "$SAMPLES"
fi

say "tables"
# Training FLOPs from the base: the cold start's, plus each run's own after it.
trained() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['flops'])" "$1/coldstart.json"; }
plus() { python -c "import sys; print(float(sys.argv[1]) + float(sys.argv[2]))" "$1" "$2"; }
CS=$(trained "$OUT/coldstart")
NAMES="coldstart rmt" SPENT="base=0 coldstart=$CS rmt=$(plus "$CS" "$FLOPS")"
if [ "$AHEAD" = 1 ]; then
  NAMES="$NAMES rmt_ahead" SPENT="$SPENT rmt_ahead=$(plus "$CS" "$(total_flops "$OUT/metrics/rmt_ahead.jsonl")")"
fi
if [ "$BASELINES" = 1 ]; then
  NAMES="$NAMES ntp_matched sft_matched"
  SPENT="$SPENT ntp_matched=$(plus "$CS" "$(total_flops "$OUT/metrics/ntp_matched.jsonl")")"
  SPENT="$SPENT sft_matched=$(plus "$CS" "$(trained "$OUT/sft_matched")")"
fi
RESULTS=$(for n in $NAMES; do echo "$R/$n.json"; done)
python -m megatron_rmt.evaluation.transfer --base-loss "$R/base.loss.json" $RESULTS --flops $SPENT \
  --output "$R/transfer.md"
python -m megatron_rmt.evaluate table "$R/base.json" $RESULTS --flops $SPENT --output "$R/table.md"
for other in $NAMES; do  # paired over the same positions
  [ "$other" = rmt ] || python -m megatron_rmt.evaluation.paired "$R/$other.json" "$R/rmt.json" \
    --output "$R/paired_rmt_vs_$other.md"
done
if [ "$BASELINES" = 1 ]; then
  python -m megatron_rmt.evaluation.learning "$OUT/metrics/rmt.jsonl" \
    --against "$OUT/metrics/ntp_matched.jsonl" >"$R/learning.md"
fi
if [ "$AHEAD" = 1 ]; then
  python -m megatron_rmt.evaluation.learning "$OUT/metrics/rmt_ahead.jsonl" \
    --against "$OUT/metrics/rmt.jsonl" --against-keys reward,match_acc,mixed_match_share,think_len,ntp_loss \
    >"$R/learning_ahead.md"
fi
echo "results: $R/transfer.md $R/table.md $R/paired_rmt_vs_*.md $R/learning*.md"
