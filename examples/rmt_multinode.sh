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
# Settings (environment): NNODES, RDZV_HOST (required), RDZV_PORT (29500), RUN_ID (rmt),
# NPROC_PER_NODE (8), LOCAL_ADDR (the address the other nodes reach this one at, when its
# hostname does not resolve to it). Every flag is passed through to megatron_rmt.train; relative
# paths in them are relative to the directory the script is run from.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?number of trainer nodes}" "${RDZV_HOST:?a trainer node every node can reach}"
: "${RDZV_PORT:=29500}" "${RUN_ID:=rmt}" "${NPROC_PER_NODE:=8}"
ROLLOUT=()
if [ -n "${ROLLOUT_URLS:-}" ]; then
  read -r -a URLS <<< "$ROLLOUT_URLS"
  ROLLOUT=(--rollout-url "${URLS[@]}" --weight-transfer "${WEIGHT_TRANSFER:-nccl}")
fi
LOCAL=()
[ -z "${LOCAL_ADDR:-}" ] || LOCAL=(--local-addr "$LOCAL_ADDR")
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RUN_ID" "${LOCAL[@]}" \
  -m megatron_rmt.train "${ROLLOUT[@]}" "$@"
