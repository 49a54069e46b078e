#!/usr/bin/env bash
# RMT on Qwen3-14B with the paper's setting: 16 H100s (2 nodes x 8), batch 128, lr 1e-6, G 8,
# B_0 800, B_min 1, gamma 0.2, t1/t2 at 30%/70%, lambda 0.1, max response 2048.
# TP=8 inside a node (40 heads and 8 KV groups divide by 8), PP=1, so DP=2 across the nodes.
#
# Before: convert the HF checkpoint once, and preprocess the corpus with the Qwen3 tokenizer:
#   python tools/convert_hf_to_megatron.py --load /models/Qwen3-14B --save $CKPT_IN \
#       --tensor-model-parallel-size 8
#   python tools/preprocess_data.py --input corpus.jsonl --output-prefix $DATA \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Qwen3-14B --append-eod
# Rollouts: one or more vLLM servers (ROLLOUT_URLS, space-separated; start each with
# `python -m megatron_rmt.rollout.serve --model HF_DIR`) that can read SYNC_DIR, where the trainer
# writes its weights every step. Without them the trainer uses its embedded engine (slow for 14B).
# Launch on every node with MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK set (e.g. by SLURM).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR}" "${NNODES:=2}" "${NODE_RANK:=0}" "${MASTER_PORT:=29500}"
: "${CKPT_IN:?converted Megatron checkpoint}" "${DATA:?indexed data prefix}"
: "${TOKENIZER:?HF tokenizer directory}" "${OUT:=runs/rmt_qwen3_14b}"
TRAIN_ITERS=${TRAIN_ITERS:-320}  # 10 epochs of 4,051 Omni-MATH documents at batch 128
ROLLOUT=()
if [ -n "${ROLLOUT_URLS:-}" ]; then
  ROLLOUT=(--rollout-url $ROLLOUT_URLS --weight-sync-dir "${SYNC_DIR:?shared dir the servers read}")
fi

torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_rmt.train \
  --config configs/qwen3_14b.yaml \
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \
  --global-batch-size 128 --micro-batch-size 1 --lr 1e-6 --train-iters "$TRAIN_ITERS" \
  --group-size 8 --budget-initial 800 --budget-min 1 --budget-gamma 0.2 \
  --curriculum-t1 0.3 --curriculum-t2 0.7 --ntp-weight 0.1 --max-response-tokens 2048 \
  --data-path "$DATA" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
  --load "$CKPT_IN" --no-load-optim --save "$OUT/checkpoints" --save-interval 50 \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" \
  "${ROLLOUT[@]}" "$@"
