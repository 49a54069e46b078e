#!/usr/bin/env bash
# One-shot GPU check (docs/gpu.md), meant to take about 8 minutes on one H200; prints one table:
#   1. the gpu-marked tests;
#   2. the local layer spec (no Transformer Engine) in bf16 against fp32, same weights;
#      with Transformer Engine installed also TE spec vs local spec, else "not on this image";
#   3. the fused kernels on bf16 inputs against fp32 references, then their time and memory
#      (benchmarks/entropy.py, 4096 tokens x 151,936 vocabulary, bf16);
#   4. the shared-prefix RL layout against rows on this GPU (the mask honoured by the fused path);
#   5. NTP-pass MFU of a 1.6B Qwen3-shaped model (local spec);
#   6. weight-transfer GB/s (NCCL broadcast between two GPUs; a CUDA-IPC copy with one GPU:
#      NCCL refuses two ranks on one device);
#   7. a short RMT run with the embedded engine on a model pre-trained here from random
#      initialisation: steps/s, reward, match accuracy, held-out NTR pass@1 before and after.
# Usage, from anywhere: bash benchmarks/gpu_check.sh   (PYTHON=... picks the interpreter, default
# python3; on the lent machine's bare image: bash tools/run_gpu_kit.sh, which installs the wheels
# first). Without CUDA it prints one line and exits 1. Each part has its own time limit; a part
# that fails or times out shows as FAILED in the table and makes the exit status 1. What needs a
# package the machine lacks (vLLM, Transformer Engine) is one "not on this image" row.
# GPU_CHECK_OUT=DIR keeps the parts' logs and the RMT run there (default: a new temporary folder).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here ($PY: torch.cuda.is_available() is False, or no torch): nothing run" >&2
    exit 1
fi
log=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$log"
rows=()
status=0
start=$SECONDS
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

part() {  # part NAME SECONDS COMMAND...: run, keep its RESULT lines (or one FAILED row)
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    if timeout "$limit" "$@" >"$log/$name.out" 2>&1; then
        while IFS= read -r line; do rows+=("${line#RESULT } | $((SECONDS - t0))"); done \
            < <(grep '^RESULT ' "$log/$name.out")
    else
        rows+=("$name | FAILED (exit $?; log $log/$name.out) | - | $((SECONDS - t0))")
        status=1
    fi
}

# 1. gpu-marked tests (those needing vLLM skip, saying so, where it is absent)
t0=$SECONDS
mapfile -t gpu_files < <(grep -l 'mark\.gpu' tests/test_*.py)
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu "${gpu_files[@]}" \
    >"$log/tests.out" 2>&1
rc=$?
summary=$(tail -n 1 "$log/tests.out")
vllm_skips=$(grep -c '^SKIPPED.*vllm' "$log/tests.out")
[ "$vllm_skips" -gt 0 ] && summary="$summary ($vllm_skips need vLLM: not on this image)"
if [ $rc -eq 0 ]; then
    rows+=("gpu-marked tests | $summary | all pass | $((SECONDS - t0))")
else
    rows+=("gpu-marked tests | FAILED (exit $rc): $summary; log $log/tests.out | all pass | $((SECONDS - t0))")
    status=1
fi
# 2. precision of the local spec; TE spec vs local spec where TE is
part precision 120 "$PY" benchmarks/gpu_check.py precision
if has transformer_engine; then
    part te-vs-local 60 "$PY" benchmarks/gpu_check.py te-vs-local
else
    rows+=("TE spec vs local spec; sequence parallel | not on this image (no Transformer Engine) | - | 0")
fi
# 3. kernels: accuracy, then the logits kernel vs naive and the fused linear vs logits + kernel
part kernel-accuracy 90 "$PY" benchmarks/gpu_check.py kernel-accuracy
part kernels 80 "$PY" benchmarks/gpu_check.py kernels --tokens 4096 --vocab 151936 \
    --dtype bf16 --chunk 1024 --repeats 3
part fused-linear 80 "$PY" benchmarks/gpu_check.py kernels --tokens 4096 --vocab 151936 \
    --dtype bf16 --hidden 5120 --chunk 1024 512 --repeats 3
# 4. shared-prefix layout vs rows
part shared-prefix 90 "$PY" benchmarks/gpu_check.py shared-prefix
# 5. MFU
part mfu 120 "$PY" benchmarks/gpu_check.py mfu
# 6. weight transfer (the vLLM service's NCCL route needs vLLM)
part transfer 60 "$PY" benchmarks/gpu_check.py transfer
has vllm || rows+=("vLLM service, NCCL weight transfer into it | not on this image (no vLLM) | - | 0")
# 7. a short RMT run with the embedded engine
part rmt 300 "$PY" benchmarks/gpu_check.py rmt "$log/rmt"

printf '\n%s on %s, %s s in all; logs in %s\n' "gpu_check" \
    "$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')" "$((SECONDS - start))" "$log"
table() { if command -v column >/dev/null; then column -t -s '|'; else cat; fi; }
printf '%s\n' "check | result | target | s" "--- | --- | --- | ---" "${rows[@]}" | table
exit $status
