#!/usr/bin/env bash
# Diagnostic: the same checkpoints and positions as table.md, NTR decoded greedily (temperature 0,
# one sample) instead of sampled at temperature 1. If the think adds nothing, greedy NTR is the
# most any sharpening of the sampled policy can reach; its gap to NTP top-1 is the format's cost.
# Run from the repository root after the effect experiment (OUT=runs/effect_long).
set -euo pipefail
source examples/vllm_server.sh
OUT=${OUT:-runs/effect_long}
G=$OUT/greedy
mkdir -p "$G"
export OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE
export SERVE_FLAGS="--cpu-threads 2 -- --kv-cache-memory-bytes 1073741824"
CONFIGS="configs/smollm2_135m.yaml configs/reproduce_cpu.yaml configs/effect_smollm2.yaml"
TOK="--tokenizer-type HuggingFaceTokenizer --tokenizer-model $OUT/base"
start_vllm_server "$OUT/base_hf" "$G"
for name in coldstart rmt ntp_matched; do
  ckpt=$OUT/runs/$name
  [ "$name" = coldstart ] && ckpt=$OUT/coldstart
  [ -f "$G/$name.json" ] && continue
  echo "== $name ($(date +%H:%M:%S))"
  python -m megatron_rmt.evaluate run --eval-set "$OUT/results/set.jsonl" --samples 1 --budget 8 \
    --ntr-batch 50 --eval-micro-batch 8 --rollout-temperature 0 --output "$G/$name.json" \
    --name "$name greedy" --config $CONFIGS $TOK --load "$ckpt" $ROLL >"$G/$name.log" 2>&1
done
python results/effect_smollm2_long/split.py "$G"/{coldstart,rmt,ntp_matched}.json
