"""Fused PPO policy loss over vocabulary logits: log-probs, CAPO token credit and the clipped loss.

One program handles one token row. The first sweep over the vocabulary keeps an online
log-sum-exp and the softmax's first moment (giving log-prob and entropy); the per-token PPO
terms follow; when a gradient is wanted a second sweep writes d(loss)/d(logits), into a new buffer
or over the logits themselves. Two reads and one write of the logits, nothing else of size [N, V].

Layers, top to bottom: Triton kernels, launchers, op registration (CUDA kernels, fake kernels,
autograd), the public functional API.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

import capo_fast._C  # noqa: F401  (defines the capo:: op schemas and their CPU kernels)

LOG_RATIO_CLAMP = 20.0  # exp(logp - old_logp) stays finite; the same clamp in C++ and the reference


@triton.jit
def _row_stats(logits_row_ptr, V, inv_t, BLOCK_V: tl.constexpr):
    """Log-sum-exp and entropy of softmax(z * inv_t) for one row, in one sweep.

    Online softmax (the running-maximum rescaling trick): s = sum exp(z - m) and
    t = sum exp(z - m) * (z - m) are rescaled whenever the running maximum m grows. Keeping t
    relative to m avoids the cancellation that lse - E[z] would suffer for large logits.
    """
    m = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(s > 0, m - m_new, 0.0)  # s > 0 implies m and m_new are finite
        alpha = tl.exp(shift)
        u = tl.where(z != float("-inf"), z - m_new, float("-inf"))
        e = tl.exp(u)
        t = alpha * (t + shift * s) + tl.sum(tl.where(e > 0, e * u, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = tl.where(s > 0, m + log_s, float("-inf"))
    entropy = tl.where(s > 0, log_s - t / s, 0.0)
    return lse, entropy


@triton.jit
def _policy_loss_fwd_kernel(
    token_loss_ptr,
    logprobs_ptr,
    entropy_ptr,
    clip_ptr,
    grad_ptr,
    logits_ptr,
    labels_ptr,
    old_logprobs_ptr,
    advantages_ptr,
    credit_ptr,
    penalty_ptr,
    ref_logprobs_ptr,
    weights_ptr,
    stride_logits,
    stride_grad,
    V,
    inv_t,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    entropy_coef,
    HAS_CREDIT: tl.constexpr,
    HAS_REF: tl.constexpr,
    USE_DUAL_CLIP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_logits
    lse, entropy = _row_stats(logits_row_ptr, V, inv_t, BLOCK_V)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)  # out-of-range labels (ignore_index) count as masked
    z_label = tl.load(logits_row_ptr + tl.where(valid, label, 0)).to(tl.float32) * inv_t
    logp = tl.where(valid, z_label - lse, 0.0)

    adv = tl.load(advantages_ptr + row).to(tl.float32)
    if HAS_CREDIT:  # CAPO token-credit masking: A_t = a - p * e_t
        adv -= tl.load(penalty_ptr + row).to(tl.float32) * tl.load(credit_ptr + row).to(tl.float32)
    raw_log_ratio = logp - tl.load(old_logprobs_ptr + row).to(tl.float32)
    log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    ratio = tl.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    clipped = pg_clipped > pg_unclipped
    loss = tl.where(clipped, pg_clipped, pg_unclipped)
    dloss_dlogp = tl.where(clipped | (raw_log_ratio != log_ratio), 0.0, -adv * ratio)
    clip_code = tl.where(clipped, tl.where(adv < 0, 1, 2), 0)
    if USE_DUAL_CLIP:
        dual = (adv < 0) & (-adv * dual_clip < loss)
        loss = tl.where(dual, -adv * dual_clip, loss)
        dloss_dlogp = tl.where(dual, 0.0, dloss_dlogp)
        clip_code = tl.where(dual, 3, clip_code)
    if HAS_REF:  # k3 estimator of KL(pi || ref)
        d = tl.load(ref_logprobs_ptr + row).to(tl.float32) - logp
        ed = tl.exp(d)
        loss += kl_coef * (ed - d - 1.0)
        dloss_dlogp += kl_coef * (1.0 - ed)
    loss -= entropy_coef * entropy

    w = tl.where(valid, tl.load(weights_ptr + row).to(tl.float32), 0.0)
    live = w != 0.0
    tl.store(token_loss_ptr + row, tl.where(live, w * loss, 0.0))
    tl.store(logprobs_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(clip_ptr + row, clip_code.to(tl.int8))

    if COMPUTE_GRAD:
        # d loss / d z_j = g_label * [j == label] - g_logp * p_j + g_ent * p_j * (log p_j + H), times 1/T
        g_logp = tl.where(live, w * dloss_dlogp, 0.0) * inv_t
        g_ent = tl.where(live, w * entropy_coef, 0.0) * inv_t
        grad_row_ptr = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            z = tl.load(logits_row_ptr + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
            logp_j = z * inv_t - lse
            finite = z != float("-inf")  # -inf logits (and rows of nothing else) get no gradient
            p = tl.where(finite, tl.exp(logp_j), 0.0)
            g = tl.where(finite, p * (g_ent * (logp_j + entropy) - g_logp), 0.0)
            g += tl.where(valid & (offs == label), g_logp, 0.0)
            tl.store(grad_row_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=in_vocab)


@triton.jit
def _logprobs_kernel(
    logprobs_ptr,
    entropy_ptr,
    logits_ptr,
    labels_ptr,
    stride_logits,
    V,
    inv_t,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_logits
    lse, entropy = _row_stats(logits_row_ptr, V, inv_t, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)
    z_label = tl.load(logits_row_ptr + tl.where(valid, label, 0)).to(tl.float32) * inv_t
    tl.store(logprobs_ptr + row, tl.where(valid, z_label - lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def _check_rows(logits: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [N, V] with contiguous rows, got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    for name, t in per_token.items():
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match logits, got {tuple(t.shape)}")


def policy_loss_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    credit: torch.Tensor | None,
    penalty: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    loss_weights: torch.Tensor,
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float,
    kl_coef: float,
    entropy_coef: float,
    grad_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the Triton forward; writes the logits gradient into `grad_out` when given (may be `logits`).

    Works on any device Triton runs on, CPU tensors included under TRITON_INTERPRET=1.
    Returns (loss, logprobs, entropy, clip_code).
    """
    _check_rows(
        logits,
        labels=labels,
        old_logprobs=old_logprobs,
        advantages=advantages,
        credit=credit,
        penalty=penalty,
        ref_logprobs=ref_logprobs,
        loss_weights=loss_weights,
    )
    if (credit is None) != (penalty is None):
        raise ValueError("credit and penalty must be given together")
    n, v = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    token_loss = torch.empty(n, **f32)
    logprobs = torch.empty(n, **f32)
    entropy = torch.empty(n, **f32)
    clip = torch.empty(n, device=logits.device, dtype=torch.int8)
    if n > 0:
        _policy_loss_fwd_kernel[(n,)](
            token_loss_ptr=token_loss,
            logprobs_ptr=logprobs,
            entropy_ptr=entropy,
            clip_ptr=clip,
            grad_ptr=grad_out if grad_out is not None else logits,
            logits_ptr=logits,
            labels_ptr=labels,
            old_logprobs_ptr=old_logprobs,
            advantages_ptr=advantages,
            credit_ptr=credit if credit is not None else advantages,
            penalty_ptr=penalty if penalty is not None else advantages,
            ref_logprobs_ptr=ref_logprobs if ref_logprobs is not None else advantages,
            weights_ptr=loss_weights,
            stride_logits=logits.stride(0),
            stride_grad=grad_out.stride(0) if grad_out is not None else 0,
            V=v,
            inv_t=1.0 / temperature,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            kl_coef=kl_coef,
            entropy_coef=entropy_coef,
            HAS_CREDIT=credit is not None,
            HAS_REF=ref_logprobs is not None,
            USE_DUAL_CLIP=dual_clip > 1.0,
            COMPUTE_GRAD=grad_out is not None,
            BLOCK_V=_block_v(v),
            num_warps=8 if v >= 8192 else 4,
        )
    return token_loss.sum(), logprobs, entropy, clip


def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the Triton log-prob kernel. Returns (logprobs [N], entropy [N] or empty)."""
    _check_rows(logits, labels=labels)
    n, v = logits.shape
    logprobs = torch.empty(n, device=logits.device, dtype=torch.float32)
    entropy = torch.empty(n if with_entropy else 0, device=logits.device, dtype=torch.float32)
    if n > 0:
        _logprobs_kernel[(n,)](
            logprobs_ptr=logprobs,
            entropy_ptr=entropy if with_entropy else logprobs,
            logits_ptr=logits,
            labels_ptr=labels,
            stride_logits=logits.stride(0),
            V=v,
            inv_t=1.0 / temperature,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=_block_v(v),
            num_warps=8 if v >= 8192 else 4,
        )
    return logprobs, entropy


# ---- op registration: CUDA kernels, fake kernels, autograd -------------------------------------------


# The op arguments after `logits` are passed through in schema order (see csrc/policy_loss.cpp).


@torch.library.register_kernel("capo::policy_loss", "cuda")
def _policy_loss_cuda(logits, *args):
    compute_grad = args[-1]
    grad = torch.empty_like(logits) if compute_grad else None
    outs = policy_loss_fwd(logits, *args[:-1], grad_out=grad)
    return (*outs, grad if compute_grad else logits.new_empty(0))


@torch.library.register_kernel("capo::policy_loss_", "cuda")
def _policy_loss_inplace_cuda(logits, *args):
    return policy_loss_fwd(logits, *args, grad_out=logits)


@torch.library.register_kernel("capo::logprobs", "cuda")
def _logprobs_cuda(logits, labels, temperature, with_entropy):
    return logprobs_fwd(logits, labels, temperature, with_entropy)


def _token_outputs_like(logits: torch.Tensor):
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty(n, **f32),
        logits.new_empty(n, **f32),
        logits.new_empty(n, dtype=torch.int8),
    )


@torch.library.register_fake("capo::policy_loss")
def _policy_loss_fake(logits, *args):
    compute_grad = args[-1]
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    return (*_token_outputs_like(logits), grad)


@torch.library.register_fake("capo::policy_loss_")
def _policy_loss_inplace_fake(logits, *args):
    return _token_outputs_like(logits)


@torch.library.register_fake("capo::logprobs")
def _logprobs_fake(logits, labels, temperature, with_entropy):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n if with_entropy else 0, dtype=torch.float32))


def _policy_loss_setup_context(ctx, inputs, output):
    ctx.grad_logits = output[4]
    ctx.logits_dtype = inputs[0].dtype


def _policy_loss_backward(ctx, grad_loss, *unused_grads):
    # The gradient was computed in the forward sweep; only the upstream scalar remains to apply.
    if ctx.grad_logits.numel() == 0:
        raise RuntimeError("capo::policy_loss was called with compute_grad=False; it has no gradient")
    grad_logits = (ctx.grad_logits * grad_loss).to(ctx.logits_dtype)
    return (grad_logits,) + (None,) * 14


torch.library.register_autograd("capo::policy_loss", _policy_loss_backward, setup_context=_policy_loss_setup_context)


class _InplacePolicyLoss(torch.autograd.Function):
    """Overwrites the logits with their gradient during forward: no extra [N, V] buffer at all."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, logprobs, entropy, clip = torch.ops.capo.policy_loss_(logits.detach(), *args)
        ctx.save_for_backward(logits.detach())
        ctx.mark_non_differentiable(logprobs, entropy, clip)
        return loss, logprobs, entropy, clip

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad_logits,) = ctx.saved_tensors
        if not (isinstance(grad_loss, torch.Tensor) and grad_loss.numel() == 1 and grad_loss.item() == 1.0):
            grad_logits = grad_logits.mul_(grad_loss.to(grad_logits.dtype))
        return (grad_logits,) + (None,) * 13


# ---- public API --------------------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
    """loss: scalar (fp32). logprobs, entropy: [N] fp32, detached. clipped: [N] int8 clip code
    (0 none, 1 ratio clipped below with A < 0, 2 clipped above with A > 0, 3 dual clip)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    clipped: torch.Tensor


def _token_mean_weights(labels: torch.Tensor) -> torch.Tensor:
    """Default aggregation: mean over the tokens whose label is valid."""
    valid = (labels >= 0).float()
    return valid / valid.sum().clamp_min(1.0)


def _per_token(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((like.shape[0],), float(value), device=like.device, dtype=torch.float32)


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    credit: torch.Tensor | None = None,
    penalty: torch.Tensor | float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 0.0,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    inplace_backward: bool = False,
) -> PolicyLossOutput:
    """Clipped PPO loss with CAPO token credit, fused over the vocabulary.

    Args:
        logits: [N, V] bf16, fp16 or fp32 (rows contiguous). N is tokens (packed or flattened).
        labels: [N] int, the sampled token of each row; negative labels are masked.
        old_logprobs: [N] log-probs of the behaviour policy.
        advantages: [N] per-token advantage, or the per-rollout CAPO value a_i broadcast to its tokens.
        credit: [N] e_t in [0, 1] (vote weight of the step holding the token); with `penalty`,
            the kernel uses A_t = advantages - penalty * credit.
        penalty: [N] or float, the per-group p = P / (std_g + eps).
        ref_logprobs: [N] reference-policy log-probs, enables the k3 KL term weighted by `kl_coef`.
        loss_weights: [N] aggregation weight of each token (see `aggregation_weights`); zero masks a
            token. Default: token mean over all rows.
        temperature: logits are divided by it, as in sampling.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (clip-higher when eps_high > eps_low).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A; 0 disables.
        kl_coef, entropy_coef: weights of the KL penalty and of the entropy bonus (subtracted).
        inplace_backward: write the gradient over `logits` during forward (saves an [N, V] buffer;
            the logits are destroyed, so nothing else may read them afterwards).

    Returns:
        PolicyLossOutput. The loss equals, in PyTorch,
        `sum(w * (max(-A*r, -A*clamp(r, 1-eps_low, 1+eps_high)) + kl_coef*k3 - entropy_coef*H))`
        with `r = exp(clamp(logp - old_logprobs, -20, 20))` and `logp = log_softmax(logits / T)[label]`;
        see `capo_fast.kernels.reference.policy_loss`.
    """
    if loss_weights is None:
        loss_weights = _token_mean_weights(labels)
    args = (
        labels,
        old_logprobs,
        advantages,
        credit,
        _per_token(penalty, logits),
        ref_logprobs,
        loss_weights,
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(dual_clip),
        float(kl_coef),
        float(entropy_coef),
    )
    if inplace_backward and logits.requires_grad:
        return PolicyLossOutput(*_InplacePolicyLoss.apply(logits, *args))
    loss, logprobs, entropy, clip, _ = torch.ops.capo.policy_loss(logits, *args, logits.requires_grad)
    return PolicyLossOutput(loss, logprobs, entropy, clip)


def fused_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) without building log_softmax; no gradient.

    Equivalent to `torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[:, None])[:, 0]`.
    Returns (logprobs [N] fp32, entropy [N] fp32 or None).
    """
    logprobs, entropy = torch.ops.capo.logprobs(logits.detach(), labels, float(temperature), with_entropy)
    return logprobs, (entropy if with_entropy else None)
