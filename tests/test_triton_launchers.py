"""The Triton launchers take any strides a user is likely to pass and launch on their tensors' device.

Strided [N] inputs: a label column `ids[:, 1:]` of a batch, `x[:, 0]` of a stacked tensor. Each launch is
checked against the same launch with contiguous copies, on the device tests/conftest.py chose (the GPU
when present, else CPU tensors in Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from conftest import TRITON_DEVICE, choose_triton_device

from capo_fast.kernels import policy_loss as pl
from capo_fast.kernels.policy_loss import (
    LOSS_TENSORS,
    PolicyLossInputs,
    PolicyLossOptions,
    logits_grad,
    logprobs_fwd,
    policy_loss_fwd,
)

N, V = 9, 131
GRAD_INPUTS = ("labels", "lse", "entropy", "grad_logprobs", "grad_entropy")


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a stride-3 view, with other values (in range for labels) in between."""
    filler = (t + 1) % V if t.dtype == torch.int64 else t * 3.0 - 50.0
    return torch.stack([filler, t, filler], dim=1)[:, 1]


def loss_inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    values = dict(
        labels=labels,
        old_logprobs=torch.randn(N, generator=g) - 5.0,
        advantages=torch.randn(N, generator=g),
        credit=torch.rand(N, generator=g),
        group_penalty=torch.rand(N, generator=g),
        ref_logprobs=torch.randn(N, generator=g) - 5.0,
        loss_weights=torch.rand(N, generator=g),
    )
    return logits.to(device), {k: v.to(device) for k, v in values.items()}


OPTIONS = PolicyLossOptions(temperature=0.8, eps_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)


def run_loss(logits, inputs, in_place):
    buf = logits.clone()
    out = policy_loss_fwd(buf, PolicyLossInputs(**inputs), OPTIONS, in_place=in_place)
    return [t.cpu() for t in out] + ([buf.cpu()] if in_place else [])


@pytest.mark.parametrize("in_place", [False, True], ids=["forward", "in-place"])
@pytest.mark.parametrize("name", LOSS_TENSORS)
def test_loss_launcher_reads_strided_per_token_inputs(name, in_place, triton_device):
    logits, inputs = loss_inputs(triton_device)
    expected = run_loss(logits, inputs, in_place)
    view = strided(inputs[name])
    assert not view.is_contiguous()
    got = run_loss(logits, {**inputs, name: view}, in_place)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b), name


def test_logprobs_launcher_reads_strided_labels(triton_device):
    logits, inputs = loss_inputs(triton_device, seed=1)
    expected = [t.cpu() for t in logprobs_fwd(logits, inputs["labels"], 1.3)]
    got = [t.cpu() for t in logprobs_fwd(logits, strided(inputs["labels"]), 1.3)]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", GRAD_INPUTS)
def test_grad_launcher_reads_strided_per_token_inputs(name, triton_device):
    logits, inputs = loss_inputs(triton_device, seed=2)
    _, entropy, lse = logprobs_fwd(logits, inputs["labels"], 0.9)
    g = torch.Generator().manual_seed(3)
    args = dict(
        labels=inputs["labels"],
        lse=lse,
        entropy=entropy,
        grad_logprobs=torch.randn(N, generator=g).to(triton_device),
        grad_entropy=torch.randn(N, generator=g).to(triton_device),
    )

    def run(a):
        out = torch.full_like(logits, float("nan"))
        return logits_grad(logits, *(a[k] for k in GRAD_INPUTS), 0.9, out).cpu()

    expected = run(args)
    assert torch.isfinite(expected).all()
    assert torch.equal(run({**args, name: strided(args[name])}), expected)


# ---- which device the launches run on -------------------------------------------------------------


def test_the_triton_device_choice():
    assert choose_triton_device(True, {}) == "cuda"
    assert choose_triton_device(True, {"TRITON_INTERPRET": "0"}) == "cuda"
    assert choose_triton_device(True, {"TRITON_INTERPRET": "1"}) == "cpu"
    assert choose_triton_device(False, {}) == "cpu"
    # this session: the interpreter is on exactly when the launchers get CPU tensors
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (TRITON_DEVICE == "cpu")


def test_launch_guard_makes_the_tensors_device_current(monkeypatch):
    entered = []

    class FakeCudaDevice(contextlib.AbstractContextManager):
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with pl.launch_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with pl.launch_guard(torch.device("cpu")):  # CPU tensors (the interpreter): no CUDA context at all
        pass
    assert entered == [torch.device("cuda", 1)]


KERNELS = ("_policy_loss_fwd_kernel", "_logprobs_fwd_kernel", "_logits_grad_kernel", "_scale_kernel")


def test_every_launch_happens_inside_the_guard_of_its_tensors_device(monkeypatch):
    """Each launcher enters launch_guard(device of its tensors) and launches inside it; recorded with
    stand-in kernels, so this runs on CPU (a `meta` tensor stands for a GPU one in scale_)."""
    events = []
    current = []

    @contextlib.contextmanager
    def recording_guard(device):
        current.append(device)
        yield
        current.pop()

    class SpyKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(**kwargs):
                events.append((self.name, current[-1] if current else None))

            return launch

    monkeypatch.setattr(pl, "launch_guard", recording_guard)
    for name in KERNELS:
        monkeypatch.setattr(pl, name, SpyKernel(name))
    logits, inputs = loss_inputs("cpu")
    policy_loss_fwd(logits, PolicyLossInputs(**inputs), OPTIONS)
    policy_loss_fwd(logits, PolicyLossInputs(**inputs), OPTIONS, in_place=True)
    logprobs_fwd(logits, inputs["labels"], 1.0)
    vec = torch.zeros(N)
    logits_grad(logits, inputs["labels"], vec, vec, vec, vec, 1.0, torch.empty_like(logits))
    pl.scale_(torch.empty(5, device="meta"), torch.ones((), device="meta"))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert events == [
        ("_policy_loss_fwd_kernel", cpu),
        ("_policy_loss_fwd_kernel", cpu),
        ("_logprobs_fwd_kernel", cpu),
        ("_logits_grad_kernel", cpu),
        ("_scale_kernel", meta),
    ]
