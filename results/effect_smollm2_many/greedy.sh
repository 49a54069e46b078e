# The greedy diagnostic of results/effect_smollm2_many (README): NTR at temperature 0, one sample, for
# $OUT/coldstart and $OUT/runs/rmt of an examples/effect_smollm2.sh run (OUT=runs/effect_many by default).
set -euo pipefail
cd "$(dirname "$0")/../.."; source .venv/bin/activate; source examples/vllm_server.sh
OUT=${OUT:-runs/effect_many}; R=$OUT/results
export MEGATRON_RMT_VLLM_PYTHON=${MEGATRON_RMT_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python} OMP_NUM_THREADS=2 SERVE_FLAGS="--cpu-threads 2 -- --kv-cache-memory-bytes 1073741824"
mkdir -p $OUT/greedy
start_vllm_server $OUT/base_hf $OUT/greedy
for name in coldstart rmt; do
  ck=$OUT/coldstart; [ $name = rmt ] && ck=$OUT/runs/rmt
  python -m megatron_rmt.evaluate run --eval-set $R/set.jsonl --samples 1 --budget 8 --ntr-batch 50 \
    --eval-micro-batch 8 --output $R/${name}_greedy.json --name ${name}_greedy \
    --config configs/smollm2_135m.yaml configs/reproduce_cpu.yaml configs/effect_smollm2.yaml \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model $OUT/base --load $ck \
    --rollout-temperature 0 $ROLL > $R/${name}_greedy.eval.log 2>&1
  echo "done $name $(date +%T)"
done
