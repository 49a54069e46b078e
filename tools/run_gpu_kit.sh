#!/usr/bin/env bash
# On the lent GPU machine, from its copy of the working tree (docs/gpu.md): install gpu_kit/
# (tools/build_gpu_kit.sh) without network into a folder of its own, check that everything the
# GPU check imports is there, then run benchmarks/gpu_check.sh; its arguments go to that script.
#
#   bash tools/run_gpu_kit.sh        # device run with carry ["gpu_kit"]
#
# The image's Python is left as it is: the wheels go to $SITE (default /tmp/megatron_rmt_site),
# put first on PYTHONPATH with the repository. PYTHON picks the interpreter (default python3,
# the image's; a venv's python for the rehearsal). Exit status: that of gpu_check.sh (1 without
# CUDA, after everything before the CUDA check ran), or 1 when the kit does not install or
# something the check imports is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-gpu_kit}
SITE=${SITE:-/tmp/megatron_rmt_site}
PY=${PYTHON:-python3}
export PYTHON=$PY

if [ ! -f "$KIT/SHA256SUMS" ]; then
    echo "error: no $KIT/ here: build it with make gpu-kit and carry it" >&2
    exit 1
fi
(cd "$KIT" && sha256sum --quiet -c SHA256SUMS) || { echo "error: $KIT/ is damaged" >&2; exit 1; }
echo "== installing $(ls "$KIT"/*.whl | wc -l) wheels from $KIT/ into $SITE (no network)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$KIT"/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== what the check imports"
"$PY" - <<'PY' || exit 1
import importlib
import importlib.metadata as md
import sys

sys.path.insert(0, "tools")
sys.path.insert(0, "benchmarks")
need = [
    "torch", "numpy", "yaml", "safetensors", "tokenizers", "transformers", "tqdm", "psutil",
    "packaging", "pytest", "nltk", "gguf", "tensorboard", "megatron.core",
    "megatron_rmt", "megatron_rmt.train", "megatron_rmt.coldstart", "megatron_rmt.evaluate",
    "preprocess_data", "step_model", "rl_pass",
]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:  # an ImportError, or a module that fails while importing
        missing.append(f"{name} ({type(e).__name__}: {e})")
import torch  # noqa: E402

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"megatron-core {md.version('megatron-core')}")
for dist, what in (("vllm", "the vLLM rollout service and its NCCL weight transfer"),
                   ("transformer_engine", "the TE layer spec, sequence parallelism")):
    try:
        importlib.import_module(dist)
        print(f"{dist}: present ({what} are checked)")
    except ImportError:
        print(f"{dist}: not on this image ({what}: one 'not on this image' row)")
if missing:
    print("error: missing on this image and not in the kit:\n  " + "\n  ".join(missing),
          file=sys.stderr)
    sys.exit(1)
print(f"all {len(need)} imports work")
PY
echo "== benchmarks/gpu_check.sh"
exec bash benchmarks/gpu_check.sh "$@"
