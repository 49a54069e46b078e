# Sourced by the experiment scripts: start_vllm_server HF_DIR DIR starts one vLLM rollout server
# for the whole script (python -m megatron_rmt.rollout.serve; every run and evaluation pushes its
# own weights into it first), waits until it is ready, stops it when the script exits, and sets
# ROLL to the trainer flags that use it (weights synced through DIR/weight_sync). SERVE_FLAGS:
# more flags for rollout.serve, e.g. "--cpu-threads 2 -- --kv-cache-memory-bytes 1073741824".
start_vllm_server() {
  local hf=$1 dir=$2
  echo "== starting the vLLM server ($(date +%H:%M:%S))"
  python -m megatron_rmt.rollout.serve --model "$hf" --log "$dir/vllm.log" ${SERVE_FLAGS:-} \
    >"$dir/serve.out" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
  until grep -q "server ready" "$dir/serve.out"; do
    kill -0 $SERVER 2>/dev/null || { cat "$dir/serve.out"; return 1; }
    sleep 2
  done
  ROLL="--rollout-url $(grep -o 'http://[^ ]*' "$dir/serve.out" | head -1) --weight-sync-dir $dir/weight_sync"
}
