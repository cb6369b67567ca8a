"""The CUDA (Triton) path of every op against the float64 reference; skipped without a GPU.

Values, not finiteness: each op's outputs and gradients against `capo_fast.kernels.reference` in float64
evaluated on the very same (rounded) inputs, in fp32 and bf16, on LLM-sized vocabularies; strided
inputs (label columns of a batch, logits rows padded in memory); the in-place backward; torch.compile
(inductor); the device guard when a second GPU is present. Run on an H100/H200 with `pytest -m gpu`.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_policy_loss import OPTION_SETS, make_case

from capo_fast.kernels import (
    fused_linear_logprobs,
    fused_linear_policy_loss,
    fused_logprobs,
    fused_policy_loss,
    reference,
)

pytestmark = pytest.mark.gpu

N, V = 257, 151_936  # a Qwen2.5 vocabulary, an odd token count
LINEAR_N, LINEAR_H, LINEAR_V = 300, 256, 32_003
# bf16 gradients are stored once from fp32: one rounding, 2^-9 relative, plus fp32 noise
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8}


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


def on(device, kwargs):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def reference_on(device, logits, labels, old, adv, kwargs):
    """Loss, log-probs, entropy, clip codes and d loss / d logits in float64, on `device`, from the same values."""
    x = logits.detach().to(device, torch.float64).requires_grad_(True)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    loss, logp, ent, clip = reference.policy_loss(
        x, labels.to(device), old.to(device).double(), adv.to(device).double(), **on(device, kw)
    )
    loss.backward()
    return loss.detach(), logp, ent, clip, x.grad


def assert_matches(out, grad, ref, dtype, labels, grad_scale=1.0):
    loss_ref, logp_ref, ent_ref, clip_ref, grad_ref = ref
    torch.testing.assert_close(out.loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    valid = (labels >= 0) & (labels < grad.shape[1])
    torch.testing.assert_close(out.logprobs[valid].double(), logp_ref[valid], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent_ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.clipped, clip_ref.to(torch.int8))
    expected = grad_scale * grad_ref
    atol = 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(grad.double(), expected, atol=atol, rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("inplace", [False, True], ids=["two-pass", "in-place"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_policy_loss_matches_reference(dtype, options, inplace, device):
    logits, labels, old, adv, kwargs = make_case(N, V, dtype=dtype, seed=20, mask_rows=(5,), neg_inf_cols=3, **options)
    labels[7] = V + 3  # out of the vocabulary: masked like -100
    kwargs["loss_weights"][7] = 0.5  # and its weight ignored
    ref = reference_on(device, logits, labels, old, adv, kwargs)
    x = logits.clone().to(device).requires_grad_(True)
    out = fused_policy_loss(x, labels.to(device), old.to(device), adv.to(device), inplace_backward=inplace,
                            **on(device, kwargs))  # fmt: skip
    (2.0 * out.loss).backward()  # an upstream gradient other than 1 reaches the in-place scaling
    assert x.grad.dtype == dtype
    if inplace:
        assert x.grad.data_ptr() == x.data_ptr()
    assert_matches(out, x.grad, ref, dtype, labels.to(device), grad_scale=2.0)


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, stride 3 (a column of a [N, 3] batch), other values in between."""
    return torch.stack([t.flip(0), t, t.flip(0)], dim=1)[:, 1]


@pytest.mark.parametrize("inplace", [False, True], ids=["two-pass", "in-place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(dtype, inplace, device):
    """Every [N] input a strided view, logits rows padded in memory (stride(0) > V)."""
    logits, labels, old, adv, kwargs = make_case(
        N, V, dtype=dtype, seed=21, mask_rows=(2,), **OPTION_SETS["everything"]
    )
    ref = reference_on(device, logits, labels, old, adv, kwargs)
    padded = torch.full((N, V + 61), float("nan"), dtype=dtype, device=device)
    x = padded[:, :V].copy_(logits.to(device)).requires_grad_(True)
    assert x.stride(0) == V + 61
    vectors = {k: strided(v.to(device)) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    assert all(not v.is_contiguous() for v in vectors.values())
    lab, o, a = (strided(t.to(device)) for t in (labels, old, adv))
    out = fused_policy_loss(x, lab, o, a, inplace_backward=inplace, **{**kwargs, **vectors})
    (2.0 * out.loss).backward()
    assert_matches(out, x.grad, ref, dtype, labels.to(device), grad_scale=2.0)
    # The in-place gradient is written into the padded buffer, whose padding stays untouched (autograd
    # then hands a contiguous copy to x.grad: a leaf that is not dense gets its gradient in row-major
    # layout, torch/csrc/autograd/functions/accumulate_grad.h:198, utils/grad_layout_contract.h:29).
    assert torch.isnan(padded[:, V:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_and_gradient_match_reference(dtype, device):
    logits, labels, *_ = make_case(N, V, dtype=dtype, seed=22, neg_inf_cols=2, mask_rows=(1,))
    g = torch.Generator().manual_seed(23)
    g_lp, g_ent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    x = logits.clone().to(device).requires_grad_(True)
    lp, ent = fused_logprobs(x, strided(labels.to(device)), temperature=0.7, with_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    x64 = logits.detach().to(device, torch.float64).requires_grad_(True)
    lp64, ent64 = reference.token_logprobs_and_entropy(x64, labels.to(device), temperature=0.7)
    (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
    torch.testing.assert_close(lp.double(), lp64.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), atol=1e-4, rtol=1e-5)
    atol = 1e-6 * x64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=GRAD_RTOL[dtype])


def test_huge_logits_and_confident_tokens(device):
    """The fuzzing cases: CPU and GPU agree with the reference (-log 2 at 1e30 / 0.7; a bf16 label gradient
    of 1 - p = 0.001 rounded once)."""
    logits = torch.tensor([[1e30, 1e30, 0.0, 1.0]], device=device)
    lp, ent = fused_logprobs(logits, torch.tensor([0], device=device), temperature=0.7, with_entropy=True)
    assert lp.item() == pytest.approx(-math.log(2), abs=1e-6) and ent.item() == pytest.approx(math.log(2), abs=1e-6)
    v, label = 4099, 17
    z = torch.zeros(1, v, dtype=torch.float64)
    z[0, label] = math.log(0.999 * (v - 1) / 0.001)
    x = z.to(device, torch.bfloat16).requires_grad_(True)
    fused_logprobs(x, torch.tensor([label], device=device))[0].sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    reference.token_logprobs_and_entropy(x64, torch.tensor([label], device=device))[0].sum().backward()
    assert x.grad[0, label].item() == pytest.approx(x64.grad[0, label].item(), rel=2**-8)


def linear_case(dtype, device, seed=24):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(LINEAR_N, LINEAR_H, generator=g).to(device, dtype)
    weight = (torch.randn(LINEAR_V, LINEAR_H, generator=g) / LINEAR_H**0.5).to(device, dtype)
    labels = torch.randint(0, LINEAR_V, (LINEAR_N,), generator=g).to(device)
    labels[4] = -100
    with torch.no_grad():
        lp = reference.token_logprobs_and_entropy(hidden.double() @ weight.double().T, labels)[0]
    old = (lp + 0.3 * torch.randn(LINEAR_N, generator=g, dtype=torch.float64).to(device)).float()
    adv = torch.randn(LINEAR_N, generator=g).to(device)
    kwargs = dict(credit=torch.rand(LINEAR_N, generator=g).to(device), group_penalty=0.8, kl_coef=0.05,
                  ref_logprobs=(lp + 0.2).float(), entropy_coef=0.01, temperature=0.9, eps_high=0.28)  # fmt: skip
    return hidden, weight, labels, old, adv, kwargs


def linear_grads(hidden, weight, labels, old, adv, kwargs, precision, fused):
    h = hidden.detach().to(precision).requires_grad_(True)
    w = weight.detach().to(precision).requires_grad_(True)
    if fused:  # chunks of 40 tokens: several chunks, the fp32 weight-gradient accumulator used across them
        out = fused_linear_policy_loss(h, w, labels, old, adv, chunk_budget_bytes=40 * LINEAR_V * 6, **kwargs)
        loss = out.loss
    else:
        kw = {k: (v.to(precision) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kwargs.items()}  # fmt: skip
        loss = reference.linear_policy_loss(h, w, labels, old.to(precision), adv.to(precision), **kw)[0]
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_policy_loss_matches_reference(dtype, device):
    """fp32: against float64 directly. bf16: the chunk's logits are rounded to bf16 as PyTorch's own bf16
    matmul rounds them, so the error is held to PyTorch's bf16 error plus a small margin (three ways)."""
    case = linear_case(dtype, device)
    ours = linear_grads(*case, dtype, fused=True)
    exact = linear_grads(*case, torch.float64, fused=False)
    if dtype == torch.float32:
        for o, e in zip(ours, exact, strict=True):
            torch.testing.assert_close(o, e, atol=1e-5 * e.abs().max().item(), rtol=1e-4)
        return
    torchs = linear_grads(*case, dtype, fused=False)
    for name, o, t, e in zip(("loss", "grad_hidden", "grad_weight"), ours, torchs, exact, strict=True):
        err_ours, err_torch = (o - e).abs().max().item(), (t - e).abs().max().item()
        assert err_ours <= err_torch + 2**-8 * e.abs().max().item(), f"{name}: {err_ours} vs torch {err_torch}"


def test_linear_logprobs_match_reference(device):
    hidden, weight, labels, *_ = linear_case(torch.float32, device, seed=25)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = fused_linear_logprobs(h, w, strided(labels), temperature=0.8, with_entropy=True,
                                    chunk_budget_bytes=64 * LINEAR_V * 4)  # fmt: skip
    (lp.sum() + 0.1 * ent.sum()).backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    lp64, ent64 = reference.token_logprobs_and_entropy(h64 @ w64.T, labels, temperature=0.8)
    (lp64.sum() + 0.1 * ent64.sum()).backward()
    torch.testing.assert_close(lp.double(), lp64.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5 * h64.grad.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5 * w64.grad.abs().max().item(), rtol=1e-4)


def test_torch_compile_inductor_matches_eager_and_reference(device):
    """fullgraph torch.compile (inductor) of a step around both fused losses: same values as eager."""
    logits, labels, old, adv, kwargs = make_case(
        64, 32_000, dtype=torch.bfloat16, seed=26, **OPTION_SETS["capo_credit"]
    )
    hidden, weight, hl, hold, hadv, hkw = linear_case(torch.bfloat16, device, seed=27)
    kw = on(device, kwargs)

    def step(x, h, w):
        a = fused_policy_loss(x, labels.to(device), old.to(device), adv.to(device), **kw)
        b = fused_linear_policy_loss(h, w, hl, hold, hadv, **hkw)
        return a.loss + b.loss, a.entropy.mean()

    def run(fn):
        x = logits.clone().to(device).requires_grad_(True)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, ent = fn(x, h, w)
        loss.backward()
        return loss.detach(), ent.detach(), x.grad, h.grad, w.grad

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)
    ref = reference_on(device, logits, labels, old, adv, kwargs)
    atol = 1e-6 * ref[4].abs().max().item()
    torch.testing.assert_close(compiled[2].double(), ref[4], atol=atol, rtol=GRAD_RTOL[torch.bfloat16])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_a_device_that_is_not_current():
    """Logits on cuda:1 while cuda:0 is current (an lm_head placed by device_map="auto")."""
    logits, labels, old, adv, kwargs = make_case(33, 4099, seed=28)
    ref = reference_on("cpu", logits, labels, old, adv, kwargs)
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = logits.clone().to(dev).requires_grad_(True)
    out = fused_policy_loss(x, labels.to(dev), old.to(dev), adv.to(dev), **on(dev, kwargs))
    out.loss.backward()
    torch.cuda.synchronize(dev)
    cpu_out = type(out)(*(t.cpu() for t in out))
    assert_matches(cpu_out, x.grad.cpu(), ref, torch.float32, labels)
