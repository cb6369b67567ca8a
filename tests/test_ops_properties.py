"""Property tests of the CPU ops in fp32/bf16/fp16 against the float64 reference (kernels/reference.py).

Hypothesis draws shapes, logits (ordinary, extreme, confident labels with p(label) near 1, -inf
columns), masked and out-of-vocabulary labels, temperatures and loss options. Three ways are compared
(STYLE.md): the float64 oracle on the very same low-precision inputs, PyTorch computing in the low
precision, and the op. The op accumulates in fp32 and rounds each output once, so its error must be
no worse than PyTorch's own plus a margin of one unit of the dtype. A small sample runs by default,
more under the `slow` marker.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from capo_fast.kernels import (
    fused_linear_logprobs,
    fused_linear_policy_loss,
    fused_logprobs,
    fused_policy_loss,
    reference,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # one rounding, relative
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logit_cases(draw):
    """(logits [N, V] in dtype, labels [N], temperature, seed) with the edge cases the ops must survive."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    n = draw(st.integers(1, 6))
    v = draw(st.sampled_from([2, 3, 17, 64, 67, 257]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["ordinary", "confident", "extreme", "neg-inf"]))
    # fp16 holds |z| <= 65504: its extreme scale keeps 6 sigma inside the range
    scale = {"ordinary": 3.0, "confident": 1.0, "extreme": 1e4 if dtype == torch.float16 else 1e6, "neg-inf": 3.0}
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale[kind]
    labels = torch.randint(0, v, (n,), generator=g)
    if kind == "confident":  # p(label) = 1 - 10^-k, k in 1..4: the label's gradient 1 - p is tiny
        k = torch.randint(1, 5, (n,), generator=g).double()
        logits[torch.arange(n), labels] = torch.log((1 - 10.0**-k) * (v - 1) / 10.0**-k)
    if kind == "neg-inf" and v > 2:
        logits[:, -1] = float("-inf")
        labels = labels % (v - 1)
    masked = draw(st.lists(st.sampled_from([-100, v, v + 5]), max_size=n))
    labels[: len(masked)] = torch.tensor(masked, dtype=torch.long)
    temperature = draw(st.sampled_from([1.0, 0.7, 1.3]))
    return logits.to(dtype), labels, temperature, seed


def max_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference; equal values (infinities included) differ by 0."""
    x = x.double()
    return torch.where(x == exact, 0.0, x - exact).abs().max().item() if x.numel() else 0.0


def assert_no_worse_than_torch(name, ours, torchs, exact, dtype, extra=0.0):
    """The op's error is at most PyTorch's low-precision error plus one unit of the dtype (relative to the
    largest exact value) and `extra`; and finite wherever the exact value is."""
    finite = torch.isfinite(exact)
    assert torch.isfinite(ours[finite]).all(), name
    scale = exact[finite].abs().max().item() if finite.any() else 0.0
    err_ours, err_torch = max_err(ours[finite], exact[finite]), max_err(torchs[finite].nan_to_num(), exact[finite])
    margin = UNIT[dtype] * scale + 1e-6 * (1 + scale) + extra
    assert err_ours <= err_torch + margin, f"{name}: op error {err_ours:.3g} vs torch {err_torch:.3g} + {margin:.3g}"


def lse_rounding(logits: torch.Tensor, temperature: float) -> float:
    """The gradient from a saved log-sum-exp forms log p = z / T - lse in fp32: an error of |z / T| ulps."""
    finite = logits[torch.isfinite(logits)]
    return 2.0**-22 * finite.double().abs().max().item() / temperature if finite.numel() else 0.0


def check_logprobs(case):
    logits, labels, temperature, _ = case
    dtype = logits.dtype
    x = logits.clone().requires_grad_(True)
    lp, ent = fused_logprobs(x, labels, temperature=temperature, with_entropy=True)
    x64 = logits.double().requires_grad_(True)
    lp64, ent64 = reference.token_logprobs_and_entropy(x64, labels, temperature)
    xt = logits.clone().requires_grad_(True)
    lpt, entt = reference.token_logprobs_and_entropy(xt, labels, temperature)
    g = torch.Generator().manual_seed(case[3])
    g_lp, g_ent = torch.randn(labels.shape[0], generator=g), torch.randn(labels.shape[0], generator=g)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
    (lpt * g_lp.to(dtype) + entt * g_ent.to(dtype)).sum().backward()
    # the op's fp32 outputs: fp32-level error whatever the input dtype
    tol = 1e-5 + 4 * 2.0**-23 * lp64.detach().abs().max().item()
    assert max_err(lp, lp64.detach()) <= tol
    assert max_err(ent, ent64.detach()) <= 1e-5 * (1 + ent64.detach().abs().max().item())
    assert_no_worse_than_torch("grad", x.grad, xt.grad, x64.grad, dtype, extra=lse_rounding(logits, temperature))
    assert x.grad.dtype == dtype


@st.composite
def loss_cases(draw):
    logits, labels, temperature, seed = draw(logit_cases())
    n = labels.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lp64 = reference.token_logprobs_and_entropy(logits.double(), labels, temperature)[0]
    kwargs = dict(temperature=temperature, inplace_backward=draw(st.booleans()))
    if draw(st.booleans()):
        kwargs.update(credit=torch.rand(n, generator=g).round(), group_penalty=draw(st.sampled_from([0.3, 1.5])))
    if draw(st.booleans()):
        kwargs.update(ref_logprobs=(lp64 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)).float())
        kwargs.update(kl_coef=0.1)
    kwargs.update(
        eps_high=draw(st.sampled_from([0.2, 0.28])),
        dual_clip=draw(st.sampled_from([0.0, 3.0])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
    )
    if draw(st.booleans()):
        kwargs["loss_weights"] = torch.rand(n, generator=g)
    old = (lp64 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(n, generator=g)
    return logits, labels, old, adv, kwargs


def reference_loss(logits, labels, old, adv, kwargs, dtype):
    kw = {k: v for k, v in kwargs.items() if k != "inplace_backward"}
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    x = logits.detach().to(dtype).requires_grad_(True)
    loss, logp, ent, clip = reference.policy_loss(x, labels, old.to(dtype), adv.to(dtype), **kw)
    loss.backward()
    return loss.detach(), logp, clip, x.grad


def loss_slope(logp, labels, old, adv, kwargs) -> torch.Tensor:
    """A bound on |d loss / d log p| per token (float64): the weight times |A_t| times the ratio (or its clip,
    whichever is larger) plus the k3 term's |1 - e^(ref - log p)|."""
    n = labels.shape[0]
    a = adv.double() - kwargs.get("group_penalty", 0.0) * kwargs.get("credit", torch.zeros(n)).double()
    ratio = torch.exp((logp - old.double()).clamp(-20, 20))
    slope = a.abs() * torch.maximum(ratio, torch.tensor(1 + kwargs["eps_high"])) * max(kwargs["dual_clip"], 1.0)
    if "ref_logprobs" in kwargs:
        slope = slope + kwargs["kl_coef"] * (1 - torch.exp(kwargs["ref_logprobs"].double() - logp)).abs()
    valid = labels >= 0  # labels >= V carry weight 0 in the op too; counting them only widens the bound
    weights = kwargs.get("loss_weights", valid.double() / max(int(valid.sum()), 1)).double()
    return (weights.abs() * slope).where(valid, torch.zeros_like(slope))


def check_policy_loss(case):
    logits, labels, old, adv, kwargs = case
    dtype = logits.dtype
    x = logits.clone().requires_grad_(True)
    out = fused_policy_loss(x, labels, old, adv, **kwargs)
    out.loss.backward()
    loss64, lp64, clip64, grad64 = reference_loss(logits, labels, old, adv, kwargs, torch.float64)
    # a token within rounding of a clip boundary may fall either side: the gradient jumps there
    assume(torch.equal(out.clipped, clip64))
    loss_t, _, _, grad_t = reference_loss(logits, labels, old, adv, kwargs, dtype)
    assert math.isfinite(out.loss.item())
    # log p = z / T - lse in fp32 is off by up to lse_rounding; it reaches the loss through d loss / d log p, and
    # the gradient through the same factor times |onehot - p| / T, even where the exact gradient is 0 (p = 1)
    shift = lse_rounding(logits, kwargs["temperature"])
    d_logp = loss_slope(lp64.nan_to_num(neginf=0.0), labels, old, adv, kwargs)
    loss_extra = shift * d_logp.sum().item()
    assert_no_worse_than_torch("loss", out.loss[None], loss_t[None], loss64[None], dtype, extra=loss_extra)
    extra = shift * (grad64.abs().max().item() + 2 * d_logp.max().item() / kwargs["temperature"])
    assert_no_worse_than_torch("grad", x.grad, grad_t, grad64, dtype, extra=extra)


@st.composite
def linear_cases(draw):
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    n, h, v = draw(st.integers(1, 12)), draw(st.sampled_from([8, 24])), draw(st.sampled_from([17, 67, 130]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * draw(st.sampled_from([0.3, 3.0])) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    masked = draw(st.lists(st.sampled_from([-100, v]), max_size=n))
    labels[: len(masked)] = torch.tensor(masked, dtype=torch.long)
    with torch.no_grad():
        lp64 = reference.token_logprobs_and_entropy(hidden.double() @ weight.double().T, labels)[0]
    old = (lp64 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(n, generator=g)
    chunk_tokens = draw(st.sampled_from([1, 5, 100]))
    return hidden, weight, labels, old, adv, chunk_tokens * v * 6


def check_linear(case):
    """The chunk's logits are rounded to the dtype once (as PyTorch's own low-precision matmul rounds them),
    so the op's error is held to PyTorch's plus the first-order effect of that rounding: each logit moves
    by at most one unit of |z|, which reaches the loss through |d loss / d z| and the gradients through
    |d loss / d z| @ |W| and |d loss / d z|.T @ |H| (a factor 4 covers the second order and the rounding of
    the gradient chunk itself)."""
    hidden, weight, labels, old, adv, budget = case
    dtype = hidden.dtype
    results = {}
    for name, precision in (("ours", None), ("torch", dtype), ("exact", torch.float64)):
        h = hidden.detach().to(precision or dtype).requires_grad_(True)
        w = weight.detach().to(precision or dtype).requires_grad_(True)
        if precision is None:
            out = fused_linear_policy_loss(h, w, labels, old, adv, chunk_budget_bytes=budget)
            loss, clip = out.loss, out.clipped
            lp, _ = fused_linear_logprobs(h, w, labels, chunk_budget_bytes=budget)
            z = None
        else:
            z = h @ w.T
            z.retain_grad()
            loss, _, _, clip = reference.policy_loss(z, labels, old.to(precision), adv.to(precision))
            lp = reference.token_logprobs_and_entropy(z, labels)[0]
        (loss + 0.1 * lp.sum()).backward()
        results[name] = (loss.detach(), lp.detach(), clip, h.grad, w.grad, z)
    ours, torchs, exact = results["ours"], results["torch"], results["exact"]
    assume(torch.equal(ours[2], exact[2]))
    z64, g64 = exact[5].detach(), exact[5].grad
    unit = 4 * UNIT[dtype]
    z_max = z64.abs().max().item()
    budgets = {
        "loss": unit * (g64.abs() * z64.abs()).sum().item(),
        "logprobs": unit * 2 * z_max,
        "grad_hidden": unit * (1 + z_max) * (g64.abs() @ weight.double().abs()).max().item(),
        "grad_weight": unit * (1 + z_max) * (g64.abs().T @ hidden.double().abs()).max().item(),
    }
    for i, name in ((0, "loss"), (1, "logprobs"), (3, "grad_hidden"), (4, "grad_weight")):
        o, t, e = (r[i].reshape(-1) for r in (ours, torchs, exact))
        assert_no_worse_than_torch(name, o, t, e, dtype, extra=budgets[name] if dtype != torch.float32 else 0.0)
    assert ours[3].dtype == ours[4].dtype == dtype


@FAST
@given(logit_cases())
def test_logprobs_property(case):
    check_logprobs(case)


@FAST
@given(loss_cases())
def test_policy_loss_property(case):
    check_policy_loss(case)


@FAST
@given(linear_cases())
def test_linear_ops_property(case):
    check_linear(case)


@pytest.mark.slow
@SLOW
@given(logit_cases())
def test_logprobs_property_many(case):
    check_logprobs(case)


@pytest.mark.slow
@SLOW
@given(loss_cases())
def test_policy_loss_property_many(case):
    check_policy_loss(case)


@pytest.mark.slow
@SLOW
@given(linear_cases())
def test_linear_ops_property_many(case):
    check_linear(case)
