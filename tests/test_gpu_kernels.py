"""The CUDA (Triton) path of every op against the float64 reference; skipped without a GPU."""

import pytest
import torch
from test_policy_loss import OPTION_SETS, make_case, run_reference

from capo_fast.kernels import fused_linear_policy_loss, fused_logprobs, fused_policy_loss, reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_policy_loss_matches_reference(options, dtype):
    logits, labels, old, adv, kwargs = make_case(257, 151_936, dtype=dtype, seed=20, mask_rows=(5,), **options)
    loss_ref, logp_ref, _, clip_ref, grad_ref = run_reference(logits, labels, old, adv, kwargs)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    x = logits.cuda().requires_grad_(True)
    out = fused_policy_loss(x, labels.cuda(), old.cuda(), adv.cuda(), **cuda)
    out.loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.loss.double().cpu(), loss_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double().cpu(), grad_ref, atol=tol * grad_ref.abs().max().item(), rtol=tol)
    valid = labels >= 0
    torch.testing.assert_close(out.logprobs.cpu()[valid].double(), logp_ref[valid], atol=tol * 10, rtol=tol)


def test_cuda_logprobs_and_linear():
    logits, labels, old, adv, kwargs = make_case(64, 32_000, seed=21)
    lp, ent = fused_logprobs(logits.cuda(), labels.cuda(), with_entropy=True)
    lp_ref, ent_ref = reference.logprobs(logits.double(), labels)
    torch.testing.assert_close(lp.cpu().double(), lp_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), ent_ref, atol=1e-4, rtol=1e-5)
    hidden = torch.randn(64, 128, device="cuda", requires_grad=True)
    weight = torch.randn(32_000, 128, device="cuda", requires_grad=True)
    out = fused_linear_policy_loss(hidden, weight, labels.cuda(), old.cuda(), adv.cuda(), chunk_budget_bytes=2**22)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
