"""Shared test set-up: Triton runs in its interpreter on CPU, GPU tests skip without CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs: the kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
