"""Where capo-fast and liger-kernel define the same loss (GRPO, per-sequence advantages), they agree."""

import torch

from capo_fast.kernels import aggregation_weights, fused_linear_policy_loss, fused_policy_loss, reference

B, L, H, V = 3, 7, 16, 97
BETA, EPS_LOW, EPS_HIGH, TEMPERATURE = 0.05, 0.2, 0.28, 0.8


def grpo_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        logp = reference.token_logprobs_and_entropy(
            (hidden @ weight.T).reshape(-1, V) / 1.0, ids.reshape(-1), TEMPERATURE
        )[0].reshape(B, L)
    old = logp + 0.3 * torch.randn(B, L, generator=g)
    ref = logp + 0.2 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    return hidden, weight, ids, mask, adv, old, ref


def capo_inputs(ids, mask, adv, old, ref):
    seq_ids = torch.arange(B).repeat_interleave(L)
    weights = aggregation_weights(mask.reshape(-1), seq_ids, "seq-mean-token-mean")
    return (
        ids.reshape(-1),
        old.reshape(-1),
        adv.repeat_interleave(L),
        dict(
            ref_logprobs=ref.reshape(-1),
            loss_weights=weights,
            kl_coef=BETA,
            eps_low=EPS_LOW,
            eps_high=EPS_HIGH,
            temperature=TEMPERATURE,
        ),
    )


def test_fused_linear_matches_liger_fused_linear_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, ids, mask, adv, old, ref = grpo_case()
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(
        beta=BETA,
        compiled=False,
        use_ref_model=True,
        loss_type="grpo",
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        temperature=TEMPERATURE,
    )
    liger_loss = liger(h1, w1, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    liger_loss.backward()

    h2, w2 = hidden.reshape(-1, H).clone().requires_grad_(True), weight.clone().requires_grad_(True)
    labels, old_flat, adv_flat, kwargs = capo_inputs(ids, mask, adv, old, ref)
    ours = fused_linear_policy_loss(h2, w2, labels, old_flat, adv_flat, **kwargs).loss
    ours.backward()
    torch.testing.assert_close(ours, liger_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad.reshape(-1, H), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-5, rtol=1e-4)


def test_fused_matches_liger_triton_grpo_loss(triton_device):
    """Liger's Triton loss runs where Triton does (tests/conftest.py); ours on the CPU (C++)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    hidden, weight, ids, mask, adv, old, ref = grpo_case(seed=1)
    logits = (hidden @ weight.T).detach()
    padded = torch.cat([logits, torch.zeros(B, 1, V)], dim=1)  # liger drops the last position
    padded = padded.to(triton_device).requires_grad_(True)
    liger_loss = triton_grpo_loss(
        padded,
        *(t.to(triton_device) for t in (old, ref, ids, adv, mask)),
        temperature=TEMPERATURE,
        beta=BETA,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        inplace=False,
        loss_type="grpo",
        reduce=True,
    )[0]
    liger_loss.backward()

    x = logits.reshape(-1, V).clone().requires_grad_(True)
    labels, old_flat, adv_flat, kwargs = capo_inputs(ids, mask, adv, old, ref)
    ours = fused_policy_loss(x, labels, old_flat, adv_flat, **kwargs).loss
    ours.backward()
    torch.testing.assert_close(ours, liger_loss.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, padded.grad.cpu()[:, :L].reshape(-1, V), atol=1e-6, rtol=1e-4)
