#!/usr/bin/env bash
# RMT on several trainer nodes with plain torchrun and a c10d rendezvous: run this script on
# every trainer node with the same RDZV_HOST (any one of the trainer nodes) and RUN_ID.
#
#   NNODES=2 RDZV_HOST=node0 ROLLOUT_URLS="http://node2:8000 http://node3:8000" \
#     bash examples/rmt_multinode.sh --config configs/qwen3_14b.yaml ...   # on node0 and node1
#
# Rollout servers (ROLLOUT_URLS, space-separated) run elsewhere, each started with
#   python -m megatron_rmt.rollout.serve --model HF_DIR --host 0.0.0.0 --port 8000 \
#       --weight-transfer nccl        # gloo for CPU servers
# and the trainer pushes its weights into them in memory after every step (WEIGHT_TRANSFER,
# default nccl): no shared filesystem is needed. Global rank 0 opens the transfer group, so the
# servers must reach the first trainer node on a free TCP port (GLOO_SOCKET_IFNAME / NCCL_*
# select the interface; --weight-transfer-address overrides the address the servers are given).
# Every other flag (model, data, batch, ...) is passed through to megatron_rmt.train.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?number of trainer nodes}" "${RDZV_HOST:?a trainer node every node can reach}"
: "${RDZV_PORT:=29500}" "${RUN_ID:=rmt}" "${NPROC_PER_NODE:=8}"
ROLLOUT=()
if [ -n "${ROLLOUT_URLS:-}" ]; then
  ROLLOUT=(--rollout-url $ROLLOUT_URLS --weight-transfer "${WEIGHT_TRANSFER:-nccl}")
fi
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RUN_ID" \
  -m megatron_rmt.train "${ROLLOUT[@]}" "$@"
