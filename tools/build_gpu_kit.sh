#!/usr/bin/env bash
# Build gpu_kit/: the wheels the lent GPU machine's image lacks, for its Python 3.12 (docs/gpu.md).
#
#   bash tools/build_gpu_kit.sh        # or: make gpu-kit      (here, with network)
#   bash tools/run_gpu_kit.sh          # there: installs gpu_kit/ without network, runs the check
#
# The image (Python 3.12.3, torch 2.11.0+cu130, pytest, transformers, tokenizers, safetensors,
# numpy, pyyaml, tqdm, psutil, tensorboard, requests, click, joblib, regex, ...; docs/gpu.md)
# has every requirement of setup.py except these, which megatron_rmt or theirs need:
#   megatron-core  the trainer (0.19.2: the newest release setup.py allows; deps torch, numpy,
#                  packaging: on the image)
#   nltk           --split-sentences in tools/preprocess_data.py (deps click, joblib, regex,
#                  tqdm: on the image; defusedxml: not)
#   defusedxml     nltk's
#   gguf           reading llama.cpp checkpoints (deps numpy, pyyaml, requests, tqdm: on the image)
# Nothing else travels: no vLLM, no Transformer Engine (far over the size limit; the check says
# "not on this image" for what needs them), no model weights (the check trains its own model).
# tools/run_gpu_kit.sh imports everything the check uses before it starts, so a package missing
# from this list shows there as one line, not as a failed part.
#
# The wheels are pure Python or manylinux x86-64 builds for CPython 3.12, fetched with
# `pip download --no-deps` for that target whatever Python runs this script. The working tree and
# the kit must together stay within the 64 MiB that reach the machine: the script prints both
# and fails above the limit. KIT=DIR to write elsewhere; PIP="python3 -m pip" to choose the pip.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-gpu_kit}
PIP=${PIP:-python3 -m pip}
LIMIT=$((64 * 1024 * 1024))
WHEELS=(megatron-core==0.19.2 nltk==3.10.4 defusedxml==0.7.1 gguf==0.19.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$KIT.partial"
mkdir -p "$KIT.partial"
args=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --abi cp312 --abi abi3 --abi none -d "$KIT.partial")
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
args+=(--platform any)
$PIP "${args[@]}" "${WHEELS[@]}"
# One wheel per name: two versions of one package stop `pip install --no-index` there.
names=$(for w in "$KIT.partial"/*.whl; do basename "$w" | cut -d- -f1 | tr '[:upper:]' '[:lower:]'; done)
if [ "$(sort <<<"$names" | uniq -d)" != "" ]; then
  echo "error: two wheels of one package in $KIT.partial: $(sort <<<"$names" | uniq -d)" >&2
  exit 1
fi
rm -rf "$KIT"
mv "$KIT.partial" "$KIT"
(cd "$KIT" && sha256sum ./*.whl >SHA256SUMS)

kit_bytes=$(du -cb "$KIT"/* | tail -n 1 | cut -f1)
# What travels besides the kit: tracked files and untracked files git does not ignore.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
ls -l "$KIT"
echo "kit: $(mib "$kit_bytes") in $KIT/; working tree: $(mib "$tree_bytes");" \
  "together $(mib $((kit_bytes + tree_bytes))) of the 64 MiB that travel"
if [ $((kit_bytes + tree_bytes)) -gt "$LIMIT" ]; then
  echo "error: over the 64 MiB limit" >&2
  exit 1
fi
echo "there: name $KIT in the device run's carry and run: bash tools/run_gpu_kit.sh"
