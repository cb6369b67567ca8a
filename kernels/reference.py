"""Plain PyTorch versions of the capo ops, written to be read.

They are the oracle of the tests (run them in float64) and the `torch` / `compile` providers of the
benchmarks. Every formula here is the definition the fused kernels must reproduce.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0


def token_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T)[label] and the entropy of softmax(logits / T), per row.

    Labels outside [0, V) (ignore_index) get log-prob 0.
    """
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    safe = torch.where(valid, labels, 0).long()
    logp = log_probs.gather(-1, safe[:, None])[:, 0]
    probs = log_probs.exp()
    # 0 * log 0 is 0 for the entropy: -inf logits contribute nothing (and no NaN gradient).
    entropy = -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)), entropy


def policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    credit: torch.Tensor | None = None,
    group_penalty: torch.Tensor | float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 0.0,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of `capo_fast.kernels.fused_policy_loss`; differentiable with plain autograd.

    Returns (loss, logprobs, entropy, clip_code) with the same meaning as the fused op.
    """
    logp, entropy = token_logprobs_and_entropy(logits, labels, temperature)
    adv = advantages.to(logp.dtype)
    if credit is not None:
        adv = adv - group_penalty * credit.to(logp.dtype)  # CAPO: A_t = a - p_g * e_t

    ratio = torch.exp(torch.clamp(logp - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(pg_unclipped, pg_clipped)
    clip_code = torch.where(pg_clipped > pg_unclipped, torch.where(adv < 0, 1, 2), 0)
    if dual_clip > 1.0:
        dual = (adv < 0) & (-adv * dual_clip < loss)
        loss = torch.where(dual, -adv * dual_clip, loss)
        clip_code = torch.where(dual, 3, clip_code)
    if ref_logprobs is not None:
        d = ref_logprobs - logp
        loss = loss + kl_coef * (torch.exp(d) - d - 1.0)  # k3 estimator of KL(pi || ref)
    loss = loss - entropy_coef * entropy

    valid = (labels >= 0) & (labels < logits.shape[-1])
    if loss_weights is None:
        loss_weights = valid.to(logp.dtype) / valid.sum().clamp_min(1)
    w = torch.where(valid, loss_weights.to(logp.dtype), torch.zeros_like(logp))
    total = torch.where(w != 0, w * loss, torch.zeros_like(loss)).sum()
    return total, logp.detach(), entropy.detach(), clip_code.to(torch.int8)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of `fused_linear_policy_loss`: full logits = hidden @ weight.T, then `policy_loss`."""
    return policy_loss(hidden @ weight.T, labels, old_logprobs, advantages, **kwargs)


def logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `fused_logprobs`: (logprobs, entropy) without gradient."""
    with torch.no_grad():
        return token_logprobs_and_entropy(logits, labels, temperature)
