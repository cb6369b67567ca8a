"""Policy losses by name (`algorithm.policy_loss`): one registry, one decorated function per loss.

Every loss takes the final hidden states of the response tokens and the lm_head weight, so none of
them holds [N, V] logits:

- `ppo`: the clipped PPO loss with CAPO token credit, fused over the vocabulary
  (`capo_fast.kernels.fused_linear_policy_loss`); the default.
- `gspo`: GSPO (arXiv 2507.18071), the sequence-level ratio s_i = exp(mean_t(logp - old_logp)) in
  the paper's GSPO-token form, so CAPO's per-token advantage reaches every token.
- `cispo`: CISPO (MiniMax-M1, arXiv 2506.13585), the REINFORCE term weighted by the clipped,
  stop-gradient importance-sampling ratio.

`gspo` and `cispo` are written in PyTorch on [N] vectors: per-token log-probs come from
`fused_linear_logprobs`, whose backward takes per-token upstream gradients. A loss of that kind is
one function `(logp, inputs, options) -> (token_loss, clip_code)` under `@register_logprob_loss`;
the k3 KL, the entropy bonus and the aggregation weights are added by `aggregate` for all of them,
exactly as the fused kernel adds them. A loss that brings its own kernel registers a function
`(hidden, weight, inputs, options) -> PolicyLossOutput` under `@register_policy_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from capo_fast.kernels import (
    PolicyLossInputs,
    PolicyLossOptions,
    PolicyLossOutput,
    apply_linear_policy_loss,
    fused_linear_logprobs,
)
from capo_fast.kernels.reference import LOG_RATIO_CLAMP

__all__ = [
    "POLICY_LOSSES",
    "PolicyLoss",
    "PolicyLossInputs",  # the per-token record, defined with the ops (capo_fast.kernels) that take it
    "aggregate",
    "compute_policy_loss",
    "policy_loss",
    "register_logprob_loss",
    "register_policy_loss",
]


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, PolicyLossInputs, PolicyLossOptions], PolicyLossOutput]
TokenLossFn = Callable[[torch.Tensor, PolicyLossInputs, PolicyLossOptions], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss and what it accepts.

    fn: (hidden [N, H], weight [V, H], inputs, options) -> PolicyLossOutput, gradients to hidden and weight.
    dual_clip: whether `options.dual_clip` means something to this loss (else it must be 0).
    token_loss: for losses on [N] log-probs, the per-token term itself (what the tests state by hand).
    """

    fn: PolicyLossFn
    dual_clip: bool = False
    token_loss: TokenLossFn | None = None


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, *, dual_clip: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Registers `fn(hidden, weight, inputs, options) -> PolicyLossOutput` as `algorithm.policy_loss=name`."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        _add(name, PolicyLoss(fn, dual_clip=dual_clip))
        return fn

    return decorator


def register_logprob_loss(name: str, *, dual_clip: bool = False) -> Callable[[TokenLossFn], TokenLossFn]:
    """Registers a loss written on [N] log-probs: `fn(logp, inputs, options) -> (token_loss [N], clip_code [N])`.

    The log-probs come from `fused_linear_logprobs` (differentiable, no [N, V] logits); `aggregate`
    adds the KL and entropy terms and applies the loss weights.
    """

    def decorator(token_loss: TokenLossFn) -> TokenLossFn:
        def fn(hidden, weight, inputs, options):
            logp, entropy = fused_linear_logprobs(
                hidden, weight, inputs.labels, temperature=options.temperature, with_entropy=True
            )
            return aggregate(token_loss, logp, entropy, inputs, options, vocab_size=weight.shape[0])

        _add(name, PolicyLoss(fn, dual_clip=dual_clip, token_loss=token_loss))
        return token_loss

    return decorator


def _add(name: str, loss: PolicyLoss) -> None:
    if name in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is registered twice")
    POLICY_LOSSES[name] = loss


def policy_loss(name: str) -> PolicyLoss:
    """The registered loss `name`, or a ValueError naming the choices."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; choose one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def compute_policy_loss(
    name: str, hidden: torch.Tensor, weight: torch.Tensor, inputs: PolicyLossInputs, options: PolicyLossOptions
) -> PolicyLossOutput:
    """The loss `name` on hidden states [N, H] and the lm_head weight [V, H]; see `PolicyLossInputs`."""
    loss = policy_loss(name)
    if options.dual_clip and not loss.dual_clip:
        raise ValueError(f"policy loss {name!r} has no dual clip; set dual_clip=0")
    return loss.fn(hidden, weight, inputs, options)


def aggregate(
    token_loss: TokenLossFn,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    inputs: PolicyLossInputs,
    options: PolicyLossOptions,
    *,
    vocab_size: int,
) -> PolicyLossOutput:
    """sum_t w_t * (token_loss_t + kl_coef * k3_t - entropy_coef * H_t) over the counted tokens.

    The same KL (k3 estimator of KL(pi || ref), with d = ref_logp - logp: exp(d) - d - 1) and entropy
    terms as the fused kernel (`capo_fast.kernels.reference.policy_loss`). `token_loss` sees the record
    with weight 0 on every token that is not counted (`PolicyLossInputs.counted`), so a weight != 0 is a
    counted token for it.
    """
    counted = inputs.counted(vocab_size)
    # Masked tokens get log-prob 0 from the op; zero them out of every term before weighting.
    logp = torch.where(counted, logp, torch.zeros_like(logp))
    w = torch.where(counted, inputs.loss_weights.to(logp.dtype), torch.zeros_like(logp))
    loss, clip_code = token_loss(logp, inputs._replace(loss_weights=w), options)
    if inputs.ref_logprobs is not None:
        d = inputs.ref_logprobs.to(logp.dtype) - logp
        loss = loss + options.kl_coef * (torch.exp(d) - d - 1.0)
    loss = loss - options.entropy_coef * entropy.to(logp.dtype)
    total = torch.where(counted, w * loss, torch.zeros_like(loss)).sum()
    clip_code = torch.where(counted, clip_code, torch.zeros_like(clip_code)).to(torch.int8)
    return PolicyLossOutput(total, logp.detach(), entropy.detach(), clip_code)


@register_policy_loss("ppo", dual_clip=True)
def ppo(hidden, weight, inputs, options):
    """Clipped PPO with CAPO token credit, fused: `capo_fast.kernels.fused_linear_policy_loss`."""
    return apply_linear_policy_loss(hidden, weight, inputs, options)


def _sequence_mean(values: torch.Tensor, inputs: PolicyLossInputs) -> torch.Tensor:
    """[N] -> [N]: the mean of `values` over the counted tokens (weight != 0, see `aggregate`) of each token's
    sequence."""
    if inputs.seq_ids is None:
        raise ValueError("a sequence-level loss needs PolicyLossInputs.seq_ids (the sequence index of each token)")
    counted = (inputs.loss_weights != 0).to(values.dtype)
    seq_ids = inputs.seq_ids.long()
    size = int(seq_ids.max()) + 1 if seq_ids.numel() else 1
    sums = values.new_zeros(size).index_add_(0, seq_ids, values * counted)
    counts = values.new_zeros(size).index_add_(0, seq_ids, counted)
    return (sums / counts.clamp_min(1.0))[seq_ids]


def _clip_code(clipped: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """PPO's codes: 1 clipped with A < 0, 2 clipped with A > 0, 0 not clipped."""
    return torch.where(clipped, torch.where(adv < 0, 1, 2), 0)


@register_logprob_loss("gspo")
def gspo(logp, inputs, options):
    """GSPO-token (arXiv 2507.18071): per token, max(-A_t * s_t, -A_t * clip(s_t, 1-eps_low, 1+eps_high))
    with s_t = sg[s_i] * exp(logp_t - sg[logp_t]) and s_i = exp(mean over the sequence of (logp - old_logp)).

    s_t equals s_i in value; its gradient is s_i * d logp_t, so with one advantage per sequence and
    seq-mean-token-mean weights this is GSPO's sequence-level objective and gradient exactly, while
    CAPO's per-token A_t = a - p * e_t still reaches every token. The sequence log-ratio is clamped
    to +-LOG_RATIO_CLAMP, as the fused kernel clamps the token log-ratio.
    """
    adv = inputs.token_advantages(logp.dtype)
    seq_log_ratio = _sequence_mean(logp - inputs.old_logprobs.to(logp.dtype), inputs).detach()
    seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(seq_log_ratio + logp - logp.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - options.eps_low, 1.0 + options.eps_high)
    return torch.maximum(unclipped, clipped), _clip_code(clipped > unclipped, adv)


@register_logprob_loss("cispo")
def cispo(logp, inputs, options):
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(clip(r_t, 1-eps_low, 1+eps_high)) * A_t * logp_t
    with r_t = exp(logp_t - old_logp_t).

    Every token keeps a gradient (the weight is clipped, not the update); its value at r = 1 is the
    REINFORCE term. Clip codes: 1 weight clipped below, 2 clipped above.
    """
    adv = inputs.token_advantages(logp.dtype)
    log_ratio = (logp - inputs.old_logprobs.to(logp.dtype)).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - options.eps_low, 1.0 + options.eps_high
    code = torch.where(ratio < low, 1, torch.where(ratio > high, 2, 0))
    return -ratio.clamp(low, high) * adv * logp, code
