#!/usr/bin/env bash
# One-shot GPU check (issue 14), within 8 minutes on one CUDA host; prints one table:
#   1. the gpu-marked tests;  2. TE layer spec vs local spec (same logits, rows and shared-prefix);
#   3. the fused CE + entropy kernel and the fused linear + CE + entropy (benchmarks/entropy.py,
#      4096 tokens x 151,936 vocabulary, bf16);  4. NTP-pass MFU of a 1.6B Qwen3-shaped model;
#   5. weight-transfer GB/s (NCCL broadcast between two GPUs, or a CUDA-IPC copy between two
#      processes when there is one GPU: NCCL refuses two ranks on one device).
# Usage: bash benchmarks/gpu_check.sh   (from the repository root, venv active)
# Without CUDA it prints one line and exits 1. Each part has its own time limit; a part that
# fails or times out shows as FAILED in the table and makes the exit status 1.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing run" >&2
    exit 1
fi
log=$(mktemp -d)
rows=()
status=0

part() {  # part NAME SECONDS COMMAND...: run, keep its RESULT lines (or one FAILED row)
    local name=$1 limit=$2
    shift 2
    if timeout "$limit" "$@" >"$log/$name.out" 2>&1; then
        while IFS= read -r line; do rows+=("${line#RESULT }"); done \
            < <(grep '^RESULT ' "$log/$name.out")
    else
        rows+=("$name | FAILED (exit $?; log $log/$name.out) | -")
        status=1
    fi
}

# 1. gpu-marked tests
if timeout 100 python -m pytest -q -m gpu tests/ >"$log/tests.out" 2>&1; then
    rows+=("gpu-marked tests | $(tail -n 1 "$log/tests.out") | all pass")
else
    rows+=("gpu-marked tests | FAILED: $(tail -n 1 "$log/tests.out") | all pass")
    status=1
fi
# 2. TE spec vs local spec
part te-vs-local 50 python benchmarks/gpu_check.py te-vs-local
# 3. kernels: the logits kernel vs naive, then the fused linear vs logits + kernel (Qwen3-14B h)
part kernels 80 python benchmarks/gpu_check.py kernels --tokens 4096 --vocab 151936 \
    --dtype bf16 --chunk 1024 --repeats 3
part fused-linear 80 python benchmarks/gpu_check.py kernels --tokens 4096 --vocab 151936 \
    --dtype bf16 --hidden 5120 --chunk 1024 512 --repeats 3
# 4. MFU
part mfu 100 python benchmarks/gpu_check.py mfu
# 5. weight transfer
part transfer 50 python benchmarks/gpu_check.py transfer

printf '\n%s on %s\n' "gpu_check" "$(python -c 'import torch; print(torch.cuda.get_device_name())')"
table() { if command -v column >/dev/null; then column -t -s '|'; else cat; fi; }
printf '%s\n' "check | result | target" "--- | --- | ---" "${rows[@]}" | table
exit $status
