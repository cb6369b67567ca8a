"""fused_linear_policy_loss and fused_linear_logprobs: chunked logits, gradients for hidden and weight."""

import pytest
import torch

from capo_fast.kernels import aggregation_weights, fused_linear_logprobs, fused_linear_policy_loss, reference
from capo_fast.kernels.linear_policy_loss import chunk_tokens


def make_case(n=45, h=24, v=1009, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    with torch.no_grad():
        logp = reference.token_logprobs_and_entropy((hidden.double() @ weight.double().T), labels)[0]
    old = (logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(n, generator=g)
    seq_ids = torch.arange(n) // 10
    weights = aggregation_weights((labels >= 0).float(), seq_ids, "seq-mean-token-mean")
    kwargs = dict(
        credit=torch.rand(n, generator=g),
        group_penalty=0.8,
        ref_logprobs=ref,
        loss_weights=weights,
        kl_coef=0.05,
        entropy_coef=0.01,
        temperature=0.9,
        eps_high=0.28,
        dual_clip=3.0,
    )
    return hidden, weight, labels, old, adv, kwargs


def reference_grads(hidden, weight, labels, old, adv, kwargs):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    loss, logp, ent, clip = reference.linear_policy_loss(h, w, labels, old.double(), adv.double(), **kw)
    loss.backward()
    return loss.detach(), logp, h.grad, w.grad


@pytest.mark.parametrize("chunk_budget_bytes", [7 * 1009 * 4, 10**9], ids=["7-token-chunks", "one-chunk"])
def test_matches_reference_in_float32(chunk_budget_bytes):
    hidden, weight, labels, old, adv, kwargs = make_case()
    loss_ref, logp_ref, gh_ref, gw_ref = reference_grads(hidden, weight, labels, old, adv, kwargs)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_linear_policy_loss(h, w, labels, old, adv, chunk_budget_bytes=chunk_budget_bytes, **kwargs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    valid = labels >= 0
    torch.testing.assert_close(out.logprobs[valid].double(), logp_ref[valid], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), gh_ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), gw_ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_accumulate_in_fp32(dtype):
    """512 chunks add same-signed parts into one row of grad_weight (every token has label 0 and A > 0):
    accumulating in the input dtype rounds the running sum at every chunk, fp32 accumulation does not,
    so the error must be no worse than PyTorch's own single low-precision matmul."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 4096, 16, 257
    hidden = torch.rand(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.1).to(dtype)
    labels = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        old = reference.token_logprobs_and_entropy(hidden.double() @ weight.double().T, labels)[0].float()
    adv = torch.ones(n)
    kwargs = dict(loss_weights=torch.full((n,), 1.0 / n))
    chunk_budget = 8 * v * (2 + 4)
    assert chunk_tokens(v, dtype, chunk_budget) == 8
    _, _, gh64, gw64 = reference_grads(hidden, weight, labels, old, adv, kwargs)
    hf, wf = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused_linear_policy_loss(hf, wf, labels, old, adv, chunk_budget_bytes=chunk_budget, **kwargs).loss.backward()
    assert hf.grad.dtype == wf.grad.dtype == dtype
    ht, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    reference.linear_policy_loss(
        ht, wt, labels, old.to(dtype), adv.to(dtype), loss_weights=kwargs["loss_weights"].to(dtype)
    )[0].backward()
    for name, ours, torchs, exact in (("hidden", hf.grad, ht.grad, gh64), ("weight", wf.grad, wt.grad, gw64)):
        err_ours = (ours.double() - exact).abs().max().item()
        err_torch = (torchs.double() - exact).abs().max().item()
        assert err_ours <= 1.1 * err_torch + 1e-6 * exact.abs().max().item(), f"{name}: {err_ours} vs torch {err_torch}"


def test_linear_logprobs_match_reference():
    hidden, weight, labels, *_ = make_case(seed=2)
    lp, ent = fused_linear_logprobs(
        hidden, weight, labels, temperature=0.7, with_entropy=True, chunk_budget_bytes=5 * 1009 * 4
    )
    lp_ref, ent_ref = reference.logprobs(hidden.double() @ weight.double().T, labels, temperature=0.7)
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, atol=1e-4, rtol=1e-5)


def test_chunk_size_follows_the_memory_budget():
    # bf16 logits and their fp32 copy for the weight gradient: 6 bytes per logit
    assert chunk_tokens(151_936, torch.bfloat16, 2**30) == 2**30 // (151_936 * 6)
    assert chunk_tokens(151_936, torch.float32, 2**30) == 2**30 // (151_936 * 4)
    assert chunk_tokens(32_000, torch.float32, 1) == 1


def test_the_default_chunk_fills_gpu_matmul_tiles_and_stays_small_on_cpu():
    from capo_fast.kernels.linear_policy_loss import default_chunk_budget

    cuda_rows = chunk_tokens(151_936, torch.bfloat16, default_chunk_budget(torch.device("cuda")))
    assert cuda_rows >= 512  # at least four 128-row tensor-core tiles per GEMM for a Qwen vocabulary
    assert chunk_tokens(49_152, torch.float32, default_chunk_budget(torch.device("cpu"))) == 341


@pytest.mark.parametrize("dtype, rel_tol", [(torch.bfloat16, 2**-8), (torch.float16, 2**-10)])
def test_low_precision_label_gradient_is_rounded_once_through_the_chunks(dtype, rel_tol):
    """The chunks run the in-place op on low-precision logits: the label's 1 - p must be rounded once.
    With weight = I the logits are the hidden states and d loss / d hidden is d loss / d logits exactly."""
    v, label, p_label = 67, 5, 0.999
    z = torch.zeros(2, v, dtype=torch.float64)
    z[:, label] = torch.log(torch.tensor(p_label * (v - 1) / (1 - p_label)))
    labels = torch.tensor([label, label])
    h = z.to(dtype).requires_grad_(True)
    w = torch.eye(v, dtype=dtype)
    h64 = h.detach().double().requires_grad_(True)
    logp = reference.token_logprobs_and_entropy(h64.detach(), labels)[0]
    old, adv = logp.float(), torch.ones(2)
    fused_linear_policy_loss(h, w, labels, old, adv, chunk_budget_bytes=v * 6).loss.backward()
    reference.linear_policy_loss(h64, w.double(), labels, old.double(), adv.double())[0].backward()
    exact = h64.grad[:, label]
    assert exact.abs().min().item() == pytest.approx((1 - p_label) / 2, rel=0.05)
    torch.testing.assert_close(h.grad[:, label].double(), exact, atol=0, rtol=rel_tol)
