#!/usr/bin/env bash
# RMT on a real pretrained model on CPU: SmolLM2-135M-Instruct from its GGUF (../shared/assets,
# or pass GGUF=path). It does not yet follow the think-then-answer format, so this run uses the
# answer-first template (the response starts inside \boxed{ after an empty think block) without
# the dynamic budget (variant no_dtb): its next-token guesses already differ within a group,
# which gives GRPO a real signal. About 30 s per step on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-../shared/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/smollm2_cpu}
export OMP_NUM_THREADS=1
if [ ! -d "$OUT/ckpt" ]; then
  python tools/convert_hf_to_megatron.py --load "$GGUF" --save "$OUT/ckpt"
fi
if [ ! -f "$OUT/data/sample_text_document.idx" ]; then
  mkdir -p "$OUT/data"
  python tools/preprocess_data.py --input corpus/sample_math.jsonl --output-prefix "$OUT/data/sample" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/ckpt" --append-eod
fi
python -m megatron_rmt.train --config configs/smollm2_135m.yaml \
  --load "$OUT/ckpt" --no-load-optim --tokenizer-model "$OUT/ckpt" \
  --data-path "$OUT/data/sample_text_document" \
  --rmt-variant no_dtb --prompt-template ntr_answer_first --max-response-tokens 8 --answer-tokens 8 \
  --group-size 4 --global-batch-size 4 --micro-batch-size 2 --seq-length 256 --train-iters 4 \
  --metrics-file "$OUT/metrics.jsonl" "$@"
echo "metrics: $OUT/metrics.jsonl"
