"""fused_policy_loss and fused_logprobs against the float64 reference, on CPU (C++) and Triton.

The Triton launchers run under TRITON_INTERPRET=1 on CPU tensors (set in conftest), so shapes for
them stay small; the C++ op runs natively on the larger ones.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from capo_fast.kernels import (
    aggregation_weights,
    fused_linear_policy_loss,
    fused_logprobs,
    fused_policy_loss,
    reference,
)
from capo_fast.kernels.policy_loss import (
    PolicyLossInputs,
    PolicyLossOptions,
    logits_grad,
    logprobs_fwd,
    policy_loss_fwd,
)

OPTION_NAMES = {f.name for f in dataclasses.fields(PolicyLossOptions)}

OPTION_SETS = {
    "plain": {},
    "capo_credit": {"credit": True, "group_penalty": 0.7},
    "clip_higher_dual": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0},
    "kl_entropy_temp": {"ref": True, "kl_coef": 0.05, "entropy_coef": 0.01, "temperature": 0.7},
    "everything": {
        "credit": True,
        "group_penalty": 1.3,
        "ref": True,
        "kl_coef": 0.1,
        "entropy_coef": 0.02,
        "temperature": 1.3,
        "eps_high": 0.28,
        "dual_clip": 2.0,
    },
}


def make_case(
    n,
    v,
    dtype=torch.float32,
    seed=0,
    credit=False,
    group_penalty=None,
    ref=False,
    mask_rows=(),
    neg_inf_cols=0,
    logit_scale=3.0,
    adv_scale=1.0,
    **options,
):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * logit_scale).to(dtype)
    if neg_inf_cols:
        logits[:, -neg_inf_cols:] = float("-inf")
    labels = torch.randint(0, v - neg_inf_cols, (n,), generator=g)
    for r in mask_rows:
        labels[r] = -100
    ref_lp = reference.token_logprobs_and_entropy(logits.double(), labels)[0]
    # old log-probs near the current ones so ratios straddle the clip range
    old = (ref_lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = (torch.randn(n, generator=g) * adv_scale).float()
    seq_ids = torch.arange(n) * 3 // max(n, 1)
    mask = (labels >= 0).float()
    kwargs = dict(loss_weights=aggregation_weights(mask, seq_ids, "seq-mean-token-mean"), **options)
    if credit:
        kwargs["credit"] = torch.rand(n, generator=g).round()
        kwargs["group_penalty"] = torch.full((n,), group_penalty)
    if ref:
        kwargs["ref_logprobs"] = (ref_lp + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    return logits, labels, old, adv, kwargs


def run_reference(logits, labels, old, adv, kwargs):
    """Loss, outputs and logits gradient from the reference in float64."""
    x = logits.detach().double().requires_grad_(True)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    loss, logp, ent, clip = reference.policy_loss(x, labels, old.double(), adv.double(), **kw)
    loss.backward()
    return loss.detach(), logp, ent, clip, x.grad


def run_fused(logits, labels, old, adv, kwargs, inplace=False):
    x = logits.clone().requires_grad_(True)
    out = fused_policy_loss(x, labels, old, adv, inplace_backward=inplace, **kwargs)
    out.loss.backward()
    return out, x.grad


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_reference(logits, labels, old, adv, kwargs, inplace=False, tol=1e-5):
    loss_ref, logp_ref, ent_ref, clip_ref, grad_ref = run_reference(logits, labels, old, adv, kwargs)
    out, grad = run_fused(logits, labels, old, adv, kwargs, inplace=inplace)
    assert torch.isfinite(out.loss)
    assert_close(out.loss, loss_ref, tol, tol, "loss")
    valid = labels >= 0
    assert_close(out.logprobs[valid], logp_ref[valid], tol * 10, tol, "logprobs")
    assert_close(out.entropy, ent_ref, tol * 10, tol, "entropy")
    assert torch.equal(out.clipped, clip_ref)
    assert torch.isfinite(grad).all()
    grad_scale = grad_ref.abs().max().item() + 1e-30
    assert_close(grad, grad_ref, tol * grad_scale, tol, "grad_logits")


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_cpu_op_matches_reference_odd_shape(options):
    logits, labels, old, adv, kwargs = make_case(37, 1009, seed=1, **options)
    check_against_reference(logits, labels, old, adv, kwargs)


def test_cpu_op_large_vocab_masked_rows_and_neg_inf():
    logits, labels, old, adv, kwargs = make_case(
        9,
        70_001,
        seed=2,
        mask_rows=(0, 4),
        neg_inf_cols=1000,
        credit=True,
        group_penalty=0.5,
        ref=True,
        kl_coef=0.1,
        entropy_coef=0.01,
    )
    check_against_reference(logits, labels, old, adv, kwargs)


def test_fully_masked_batch_gives_zero_loss_and_gradient():
    logits, labels, old, adv, kwargs = make_case(5, 300, seed=3, mask_rows=range(5))
    kwargs["loss_weights"] = torch.zeros(5)
    out, grad = run_fused(logits, labels, old, adv, kwargs)
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_extreme_advantages_and_logits_stay_finite():
    logits, labels, old, adv, kwargs = make_case(16, 513, seed=4, logit_scale=200.0, adv_scale=1e6, dual_clip=3.0)
    check_against_reference(logits, labels, old, adv, kwargs, tol=1e-4)


def test_inplace_backward_writes_gradient_into_logits():
    logits, labels, old, adv, kwargs = make_case(23, 777, seed=5, credit=True, group_penalty=1.0)
    _, _, _, _, grad_ref = run_reference(logits, labels, old, adv, kwargs)
    x = logits.clone().requires_grad_(True)
    out = fused_policy_loss(x, labels, old, adv, inplace_backward=True, **kwargs)
    (2.0 * out.loss).backward()
    assert_close(x.grad, 2.0 * grad_ref, 1e-5 * grad_ref.abs().max().item(), 1e-5, "grad")
    assert x.grad.data_ptr() == x.data_ptr(), "the gradient should live in the logits buffer"


def test_capo_form_equals_direct_per_token_advantages():
    logits, labels, old, adv, kwargs = make_case(31, 401, seed=6, credit=True, group_penalty=0.9)
    direct = dict(kwargs)
    credit, group_penalty = direct.pop("credit"), direct.pop("group_penalty")
    a = run_fused(logits, labels, old, adv, kwargs)
    b = run_fused(logits, labels, old, adv - group_penalty * credit, direct)
    assert_close(a[0].loss, b[0].loss, 1e-6, 1e-6, "loss")
    assert_close(a[1], b[1], 1e-7, 1e-6, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_torch(dtype):
    logits, labels, old, adv, kwargs = make_case(
        64, 4099, dtype=dtype, seed=7, ref=True, kl_coef=0.05, entropy_coef=0.01
    )
    loss64, logp64, ent64, _, grad64 = run_reference(logits, labels, old, adv, kwargs)
    # PyTorch's own answer in the low-precision dtype (its kernels upcast internally the same way)
    x = logits.clone().requires_grad_(True)
    loss_t, logp_t, _, _ = reference.policy_loss(
        x,
        labels,
        old.to(dtype),
        adv.to(dtype),
        **{k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()},
    )
    loss_t.backward()
    out, grad = run_fused(logits, labels, old, adv, kwargs)
    for name, ours, theirs, exact in (
        ("loss", out.loss, loss_t, loss64),
        ("logprobs", out.logprobs, logp_t, logp64),
        ("grad", grad, x.grad, grad64),
    ):
        err_ours = (ours.double() - exact).abs().max().item()
        err_torch = (theirs.double() - exact).abs().max().item()
        margin = 1e-3 * exact.abs().max().item() + 1e-6
        assert err_ours <= err_torch + margin, f"{name}: kernel error {err_ours} vs torch {err_torch}"


def test_loss_is_independent_of_how_the_batch_is_split():
    """Two data-parallel halves with global normalisers sum to the loss of the whole batch."""
    logits, labels, old, adv, _ = make_case(40, 257, seed=8)
    seq_ids = torch.arange(40) // 7
    mask = torch.ones(40)
    full = fused_policy_loss(
        logits, labels, old, adv, loss_weights=aggregation_weights(mask, seq_ids, "seq-mean-token-mean")
    ).loss
    num_seqs = float(seq_ids.max() + 1)
    parts = []
    for rows in (slice(0, 21), slice(21, 40)):  # sequence 3 (rows 21..27) sits wholly in the second half
        ids = seq_ids[rows] - seq_ids[rows].min()
        w = aggregation_weights(mask[rows], ids, "seq-mean-token-mean", global_num_seqs=num_seqs)
        parts.append(fused_policy_loss(logits[rows], labels[rows], old[rows], adv[rows], loss_weights=w).loss)
    assert_close(parts[0] + parts[1], full, 1e-6, 1e-6, "split loss")


def test_logprobs_op_matches_reference_with_temperature():
    logits, labels, *_ = make_case(29, 3001, seed=9, neg_inf_cols=7)
    lp, ent = fused_logprobs(logits, labels, temperature=0.6, with_entropy=True)
    lp_ref, ent_ref = reference.logprobs(logits.double(), labels, temperature=0.6)
    assert_close(lp, lp_ref, 1e-4, 1e-5, "logprobs")
    assert_close(ent, ent_ref, 1e-4, 1e-5, "entropy")
    assert fused_logprobs(logits, labels)[1] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_gradient_takes_per_token_upstream_gradients(dtype):
    """A loss written in PyTorch on the [N] log-probs and entropies (GSPO's sequence-level ratio here)."""
    logits, labels, *_ = make_case(33, 1003, dtype=dtype, seed=14, neg_inf_cols=2, mask_rows=(4,))
    seq = torch.arange(33) // 11
    old = torch.randn(33, generator=torch.Generator().manual_seed(15)) * 0.1 - 7.0
    adv = torch.tensor([1.0, -0.5, 0.3])

    def gspo(logp, ent):
        log_ratio = torch.zeros(3, dtype=logp.dtype).index_add(0, seq, logp - old.to(logp.dtype)) / 11
        return -(adv.to(logp.dtype) * log_ratio.exp()).mean() - 0.01 * ent.mean()

    x = logits.clone().requires_grad_(True)
    lp, ent = fused_logprobs(x, labels, temperature=0.8, with_entropy=True)
    gspo(lp, ent).backward()
    x64 = logits.double().requires_grad_(True)
    gspo(*reference.token_logprobs_and_entropy(x64, labels, temperature=0.8)).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(x.grad, x64.grad, tol * x64.grad.abs().max().item(), tol, "grad")
    assert x.grad.dtype == dtype


def test_hand_computed_single_token():
    """An independent statement of the loss: one token, V = 2, every term worked out by hand."""
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    labels = torch.tensor([0])
    old = torch.tensor([math.log(0.5)])  # ratio = 1.5, beyond 1 + 0.2
    out = fused_policy_loss(
        logits,
        labels,
        old,
        torch.tensor([2.0]),
        credit=torch.tensor([1.0]),
        group_penalty=torch.tensor([0.5]),
        ref_logprobs=torch.tensor([math.log(0.75)]),
        kl_coef=0.1,
    )
    # A = 2 - 0.5 * 1 = 1.5 > 0, ratio clipped at 1.2: pg = -1.5 * 1.2; KL k3 = 0 at ref == logp
    assert out.loss.item() == pytest.approx(-1.8, abs=1e-6)
    assert out.clipped.tolist() == [2]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert out.entropy.item() == pytest.approx(entropy, abs=1e-6)




@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_the_old_keyword_penalty_is_refused_naming_group_penalty(linear):
    """`penalty` is the config's P; the per-token p_g is `group_penalty`. The old keyword is never read as p_g."""
    n, v, h = 4, 11, 3
    labels, old, adv = torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.ones(n)
    first = (torch.randn(n, h), torch.randn(v, h)) if linear else (torch.randn(n, v),)
    fn = fused_linear_policy_loss if linear else fused_policy_loss
    with pytest.raises(TypeError, match=r"penalty= is now group_penalty="):
        fn(*first, labels, old, adv, credit=torch.ones(n), penalty=0.5)
    kept = fn(*first, labels, old, adv, credit=torch.ones(n), group_penalty=0.5)  # A_t = 1 - 0.5 = 0.5
    plain = fn(*first, labels, old, torch.full((n,), 0.5))
    assert kept.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)
# ---- Triton kernels: on the GPU when there is one, else under the interpreter (tests/conftest.py) -------


def on(device, x):
    """A tensor, or the tensors of a dict or tuple, on `device` (results come back with device "cpu")."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: on(device, v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        moved = [on(device, v) for v in x]
        return type(x)(*moved) if hasattr(x, "_fields") else tuple(moved)
    return x


def triton_forward(logits, labels, old, adv, kwargs, with_grad=True, device="cpu"):
    """The Triton forward and (with_grad) backward launchers, as the CUDA op and its autograd run them.
    Inputs are moved to `device`, results returned on the CPU."""
    logits, labels, old, adv, kwargs = on(device, (logits, labels, old, adv)) + (on(device, kwargs),)
    options = PolicyLossOptions(**{k: v for k, v in kwargs.items() if k in OPTION_NAMES})
    inputs = PolicyLossInputs(
        labels, old, adv, kwargs["loss_weights"], credit=kwargs.get("credit"),
        group_penalty=kwargs.get("group_penalty"), ref_logprobs=kwargs.get("ref_logprobs"),
    )  # fmt: skip
    out = policy_loss_fwd(logits, inputs, options)
    grad = None
    if with_grad:
        grad = torch.full_like(logits, float("nan"))  # poisoned: every entry must be written
        logits_grad(
            logits, labels, out.lse, out.entropy, out.dloss_dlogprobs, out.dloss_dentropy, options.temperature, grad
        )
    return on("cpu", (*out[:4], grad))


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_triton_kernel_matches_reference(options, triton_device):
    logits, labels, old, adv, kwargs = make_case(13, 1009, seed=10, mask_rows=(3,), neg_inf_cols=5, **options)
    loss_ref, logp_ref, ent_ref, clip_ref, grad_ref = run_reference(logits, labels, old, adv, kwargs)
    loss, logp, ent, clip, grad = triton_forward(logits, labels, old, adv, kwargs, device=triton_device)
    assert_close(loss, loss_ref, 1e-5, 1e-5, "loss")
    assert_close(logp, logp_ref, 1e-4, 1e-5, "logprobs")
    assert_close(ent, ent_ref, 1e-4, 1e-5, "entropy")
    assert torch.equal(clip, clip_ref)
    assert_close(grad, grad_ref, 1e-5 * grad_ref.abs().max().item(), 1e-5, "grad")


def test_triton_kernel_large_vocab_bf16_inplace(triton_device):
    logits, labels, old, adv, kwargs = make_case(
        3, 65_600, dtype=torch.bfloat16, seed=11, credit=True, group_penalty=1.0
    )
    loss_ref, logp_ref, _, _, grad_ref = run_reference(logits, labels, old, adv, kwargs)
    buf, labels, old, adv, kwargs = on(triton_device, (logits, labels, old, adv)) + (on(triton_device, kwargs),)
    inputs = PolicyLossInputs(
        labels, old, adv, kwargs["loss_weights"], credit=kwargs["credit"], group_penalty=kwargs["group_penalty"]
    )
    out = policy_loss_fwd(buf, inputs, PolicyLossOptions(), in_place=True)
    out, buf = on("cpu", out), buf.cpu()
    assert_close(out.loss, loss_ref, 1e-4, 1e-4, "loss")
    assert_close(out.logprobs, logp_ref, 2e-2, 1e-3, "logprobs")  # bf16 inputs: the reference sees the same values
    assert_close(buf, grad_ref, 1e-2 * grad_ref.abs().max().item(), 1e-2, "grad")


def test_triton_logprobs_kernel_and_its_gradient(triton_device):
    logits, labels, *_ = make_case(11, 2049, seed=12, neg_inf_cols=3, mask_rows=(2,))
    lp, ent, lse = on("cpu", logprobs_fwd(*on(triton_device, (logits, labels)), 1.7))
    x = logits.double().requires_grad_(True)
    lp_ref, ent_ref = reference.token_logprobs_and_entropy(x, labels, temperature=1.7)
    assert_close(lp, lp_ref, 1e-4, 1e-5, "logprobs")
    assert_close(ent, ent_ref, 1e-4, 1e-5, "entropy")
    g = torch.Generator().manual_seed(13)
    g_lp, g_ent = torch.randn(11, generator=g), torch.randn(11, generator=g)
    (lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum().backward()
    args = on(triton_device, (logits, labels, lse, ent, g_lp, g_ent))
    grad = logits_grad(*args, 1.7, torch.full_like(args[0], float("nan"))).cpu()
    assert_close(grad, x.grad, 1e-5 * x.grad.abs().max().item(), 1e-5, "grad")


def test_triton_and_cpp_agree_on_fully_neg_inf_row(triton_device):
    logits = torch.randn(2, 100)
    logits[1] = float("-inf")
    labels = torch.tensor([5, -100])
    w = torch.tensor([1.0, 0.0])
    zeros = torch.zeros(2)
    cpp, cpp_grad = run_fused(logits, labels, zeros, zeros + 1, {"loss_weights": w})
    tri = triton_forward(logits, labels, zeros, zeros + 1, {"loss_weights": w}, device=triton_device)
    assert torch.isfinite(cpp.loss) and torch.isfinite(tri[0])
    assert_close(cpp.loss, tri[0], 1e-6, 1e-6, "loss")
    assert_close(cpp_grad, tri[4], 1e-7, 1e-6, "grad")
    assert torch.count_nonzero(tri[4][1]) == 0


@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_triton_scale_kernel(scale, triton_device):
    from capo_fast.kernels.policy_loss import SCALE_BLOCK, _scale_kernel

    x = torch.randn(SCALE_BLOCK + 7)
    expected = x * scale
    x = x.to(triton_device)
    _scale_kernel[(2,)](
        x_ptr=x, scale_ptr=torch.tensor([scale], device=triton_device), numel=x.numel(), BLOCK=SCALE_BLOCK
    )
    assert torch.equal(x.cpu(), expected)


# ---- edge cases found by fuzzing (issue 22) ----------------------------------------------------------


def confident_row(p_label, v=64, label=5):
    """One row whose label has probability p_label, the other v - 1 tokens sharing the rest equally."""
    z = torch.zeros(1, v, dtype=torch.float64)
    z[0, label] = math.log(p_label * (v - 1) / (1 - p_label))
    return z, torch.tensor([label])


@pytest.mark.parametrize("dtype, rel_tol", [(torch.bfloat16, 2**-8), (torch.float16, 2**-10)])
@pytest.mark.parametrize("p_label", [0.99, 0.999])
@pytest.mark.parametrize("path", ["logprobs", "loss", "loss-inplace"])
def test_low_precision_label_gradient_is_rounded_once(dtype, rel_tol, p_label, path):
    """d logp / d z_label = 1 - p is small for confident tokens: storing -p first and adding 1 after rounds
    twice (bf16 at p = 0.999 gave 0 instead of 0.001). One rounding keeps the dtype's relative precision."""
    z, labels = confident_row(p_label, v=67)  # 67: the label sits in a vector block, a scalar tail follows
    x = z.to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    lp64, _ = reference.token_logprobs_and_entropy(x64, labels)
    if path == "logprobs":
        fused_logprobs(x, labels)[0].sum().backward()
        lp64.sum().backward()
    else:  # the loss -A * ratio at ratio 1 has d loss / d logp = -1 (no clipping at ratio 1)
        old, adv = lp64.detach().float(), torch.ones(1)
        fused_policy_loss(x, labels, old, adv, inplace_backward=path == "loss-inplace").loss.backward()
        reference.policy_loss(x64, labels, old.double(), adv.double())[0].backward()
    exact = x64.grad[0, labels[0]].item()
    assert abs(exact) == pytest.approx(1 - p_label, rel=0.05)
    assert x.grad[0, labels[0]].item() == pytest.approx(exact, rel=rel_tol)


@pytest.mark.parametrize("scale", [1e30, 1e9, 1e8, 3e5])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_huge_logits_with_temperature(scale, temperature, triton_device):
    """log p = (z - max) / T - log s: no residue of z / T rounded at |z| (nats at 1e8) enters the exponent."""
    logits = torch.tensor([[scale, scale, 0.0, 1.0], [scale, scale - scale * 2**-20, -scale, 0.0]])
    labels = torch.tensor([0, 1])
    lp_ref, ent_ref = reference.logprobs(logits.double(), labels, temperature)
    for lp, ent in (
        fused_logprobs(logits, labels, temperature=temperature, with_entropy=True),
        on("cpu", logprobs_fwd(*on(triton_device, (logits, labels)), temperature)[:2]),
    ):
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
        assert_close(lp, lp_ref, 1e-5, 1e-5, "logprobs")
        assert_close(ent, ent_ref, 1e-5, 1e-5, "entropy")
    if scale == 1e30 and temperature == 0.7:
        assert lp[0].item() == pytest.approx(-math.log(2), abs=1e-6)
        assert ent[0].item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("scale", [1e30, 1e8])
def test_huge_logits_gradient_in_place_is_exact_and_finite_otherwise(scale, triton_device):
    """The in-place path has the row's maximum at hand and is exact; the two-pass backward only has the
    saved log-sum-exp (rounded at |z|), and stays finite with p_j <= 1."""
    logits = torch.tensor([[scale, scale, 0.0, 1.0]])
    labels, old, adv = torch.tensor([0]), torch.tensor([-0.7]), torch.tensor([1.0])
    x64 = logits.double().requires_grad_(True)
    reference.policy_loss(x64, labels, old.double(), adv.double(), temperature=0.7)[0].backward()
    x = logits.clone().requires_grad_(True)
    fused_policy_loss(x, labels, old, adv, temperature=0.7, inplace_backward=True).loss.backward()
    assert_close(x.grad, x64.grad, 1e-6, 1e-5, "in-place grad")
    buf, lab, o, a, w = on(triton_device, (logits, labels, old, adv, torch.ones(1)))
    policy_loss_fwd(buf, PolicyLossInputs(lab, o, a, w), PolicyLossOptions(0.7), in_place=True)
    assert_close(buf.cpu(), x64.grad, 1e-6, 1e-5, "Triton in-place grad")
    y = logits.clone().requires_grad_(True)
    fused_policy_loss(y, labels, old, adv, temperature=0.7).loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().max() <= 2.0 / 0.7


def test_default_weights_count_only_labels_inside_the_vocabulary():
    """Labels >= V are ignored like negative ones: the default is the mean over the 3 real tokens."""
    g = torch.Generator().manual_seed(30)
    logits = torch.randn(4, 7, generator=g)
    labels = torch.tensor([1, 2, 7, 3])
    old, adv = torch.randn(4, generator=g) - 2.0, torch.randn(4, generator=g)
    expected = reference.policy_loss(logits.double(), labels, old.double(), adv.double())[0]
    by_hand = reference.policy_loss(
        logits.double(),
        labels,
        old.double(),
        adv.double(),
        loss_weights=torch.tensor([1.0, 1, 0, 1], dtype=torch.float64) / 3,
    )[0]
    assert expected.item() == pytest.approx(by_hand.item(), abs=1e-12)
    assert fused_policy_loss(logits, labels, old, adv).loss.item() == pytest.approx(expected.item(), abs=1e-6)
    hidden, weight = logits.clone(), torch.eye(7)  # hidden @ I.T == logits
    linear = fused_linear_policy_loss(hidden, weight, labels, old, adv).loss
    assert linear.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_weights_of_an_empty_batch(mode):
    w = aggregation_weights(torch.zeros(0), torch.zeros(0, dtype=torch.long), mode, norm_length=8.0)
    assert w.shape == (0,) and w.dtype == torch.float32


def test_linear_loss_backward_with_no_tokens():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    empty = torch.zeros(0)
    out = fused_linear_policy_loss(hidden, weight, torch.zeros(0, dtype=torch.long), empty, empty)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.logprobs.shape == (0,)
    assert hidden.grad.shape == (0, 4)
    assert torch.equal(weight.grad, torch.zeros(7, 4))


@pytest.mark.parametrize("shape, stride", [((0, 1), (2, 2)), ((4, 1), (2, 2)), ((0, 5), (5, 3))])
def test_logits_whose_column_stride_reaches_nothing_are_accepted(shape, stride, triton_device):
    """A one-column (or empty) view has contiguous rows whatever its column stride says."""
    base = torch.randn(16)
    logits = torch.as_strided(base, shape, stride)
    on_device = torch.as_strided(base.to(triton_device), shape, stride)
    labels = torch.zeros(shape[0], dtype=torch.long)
    zeros = torch.zeros(shape[0])
    lp_ref, ent_ref = reference.logprobs(logits.double(), labels)
    for lp, ent in (
        fused_logprobs(logits, labels, with_entropy=True),
        on("cpu", logprobs_fwd(on_device, labels.to(triton_device), 1.0)[:2]),
    ):
        assert_close(lp, lp_ref, 0, 0, "logprobs")
        assert_close(ent, ent_ref, 0, 0, "entropy")
    x = logits.detach().clone().requires_grad_(True)
    out = fused_policy_loss(x, labels, zeros, zeros + 1.0)
    out.loss.backward()
    # a one-token vocabulary: log p = 0, ratio 1, loss -A = -1 per token (0 without tokens), no gradient
    assert out.loss.item() == (-1.0 if shape[0] else 0.0) and x.grad.shape == shape
    assert torch.count_nonzero(x.grad) == 0
