#!/usr/bin/env bash
# RMT on Qwen3-14B with the paper's setting: 16 H100s (2 nodes x 8), batch 128, lr 1e-6, G 8,
# B_0 800, B_min 1, gamma 0.2, t1/t2 at 30%/70%, lambda 0.1, max response 2048 (fixed cap), one
# RL position per document (configs/qwen3_14b.yaml; docs/method.md lists every choice).
# TP=8 inside a node (40 heads and 8 KV groups divide by 8), PP=1, so DP=2 across the nodes.
#
# Before: convert the HF checkpoint once (one process per TP rank, bf16: ~30 GB, not 59), and
# preprocess the corpus with the Qwen3 tokenizer (it writes ${CORPUS}_text_document.{bin,idx}):
#   torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --load /models/Qwen3-14B \
#       --save $CKPT_IN --tensor-model-parallel-size 8 --bf16
#   python tools/preprocess_data.py --input corpus.jsonl --output-prefix $CORPUS \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Qwen3-14B --append-eod
# DATA is then ${CORPUS}_text_document (the suffix is added here if left out).
# Check the memory first, on any machine: WORLD_SIZE=16 python -m megatron_rmt.train \
#   --config configs/qwen3_14b.yaml --dry-run   (docs/memory.md)
# Rollouts: one or more vLLM servers (ROLLOUT_URLS, space-separated), each started on its own
# GPUs with `python -m megatron_rmt.rollout.serve --model HF_DIR --host 0.0.0.0
# --weight-transfer nccl -- --gpu-memory-utilization 0.85` (it prints the URL other nodes reach
# it at). The trainer pushes its weights into them in memory every step (WEIGHT_TRANSFER=gloo for
# CPU servers), or, with SYNC_DIR set, writes them there for the servers to read. The trainer's
# embedded engine would take ~20-35 minutes per step at 14B: it is used only with
# EMBEDDED_ROLLOUT=1.
# Launch on every node with MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK set (e.g. by SLURM).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR}" "${NNODES:=2}" "${NODE_RANK:=0}" "${MASTER_PORT:=29500}"
: "${CKPT_IN:?converted Megatron checkpoint}" "${DATA:?indexed data prefix}"
: "${TOKENIZER:?HF tokenizer directory}" "${OUT:=runs/rmt_qwen3_14b}"
if [ ! -f "$DATA.idx" ] && [ -f "${DATA}_text_document.idx" ]; then DATA="${DATA}_text_document"; fi
[ -f "$DATA.idx" ] || { echo "no indexed data at $DATA.idx (tools/preprocess_data.py output)" >&2; exit 1; }
ROLLOUT=()
if [ -n "${ROLLOUT_URLS:-}" ] && [ -n "${SYNC_DIR:-}" ]; then  # a directory the servers share
  ROLLOUT=(--rollout-url $ROLLOUT_URLS --weight-sync-dir "$SYNC_DIR")
elif [ -n "${ROLLOUT_URLS:-}" ]; then  # remote servers: weights in memory (nccl on GPU servers)
  ROLLOUT=(--rollout-url $ROLLOUT_URLS --weight-transfer "${WEIGHT_TRANSFER:-nccl}")
elif [ "${EMBEDDED_ROLLOUT:-0}" != 1 ]; then
  echo "set ROLLOUT_URLS (vLLM servers, see above), or EMBEDDED_ROLLOUT=1 for the slow embedded engine" >&2
  exit 1
fi
# "10 epochs" with packed windows: a step reads GLOBAL_BATCH windows of 4,096 tokens, each
# packing several documents, so steps = ceil(EPOCHS * corpus tokens / (4096 * GLOBAL_BATCH)),
# not documents / batch. With one RL position per document (position_unit: document), a step
# poses as many problems as its windows hold documents (about 4096 * GLOBAL_BATCH / mean
# document length). The paper's batch of 128 is read here as 128 windows; to match its 128
# documents per step (4,051 Omni-MATH documents: ~317 steps for 10 epochs), set GLOBAL_BATCH
# to about 128 * mean document length / 4096 (a multiple of DP = 2). Both are printed below.
EPOCHS=${EPOCHS:-10} GLOBAL_BATCH=${GLOBAL_BATCH:-128}
read -r TOKENS DOCS < <(python -c "import sys
from megatron.core.datasets.indexed_dataset import IndexedDataset as D
d = D(sys.argv[1]); print(int(d.sequence_lengths.sum()), len(d.document_indices) - 1)" "$DATA")
STEPS=$(( (EPOCHS * TOKENS + 4096 * GLOBAL_BATCH - 1) / (4096 * GLOBAL_BATCH) ))
TRAIN_ITERS=${TRAIN_ITERS:-$STEPS}
echo "corpus: $TOKENS tokens in $DOCS documents (mean $((TOKENS / DOCS))); $EPOCHS epochs at" \
  "$GLOBAL_BATCH windows = $STEPS steps (training $TRAIN_ITERS); paper-like batch:" \
  "$(( (128 * TOKENS / DOCS + 4095) / 4096 )) windows per 128 documents"

torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_rmt.train \
  --config configs/qwen3_14b.yaml \
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \
  --global-batch-size "$GLOBAL_BATCH" --micro-batch-size 1 --lr 1e-6 --train-iters "$TRAIN_ITERS" \
  --group-size 8 --budget-initial 800 --budget-min 1 --budget-gamma 0.2 \
  --curriculum-t1 0.3 --curriculum-t2 0.7 --ntp-weight 0.1 --max-response-tokens 2048 \
  --data-path "$DATA" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
  --load "$CKPT_IN" --no-load-optim --save "$OUT/checkpoints" --save-interval 50 \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" \
  "${ROLLOUT[@]}" "$@"
