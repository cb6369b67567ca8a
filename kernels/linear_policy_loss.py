"""The policy loss from final hidden states and the lm_head weight, never holding [N, V] logits.

Token chunks of logits are produced by a matmul, consumed at once by the in-place policy-loss op
(which overwrites them with their gradient), and turned into gradients for the hidden states and
the weight before the next chunk. Peak extra memory is one chunk of logits plus grad_weight.
"""

from __future__ import annotations

import torch

from capo_fast.kernels.policy_loss import PolicyLossOutput, _per_token, _token_mean_weights

DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20


def chunk_tokens(vocab_size: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk so that one chunk of logits fits in `budget_bytes`."""
    per_token = vocab_size * torch.empty((), dtype=dtype).element_size()
    return max(1, budget_bytes // per_token)


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def _take(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


@torch.library.custom_op("capo::linear_policy_loss", mutates_args=())
def _linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    chunk_size: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    loss = torch.zeros((), **f32)
    logprobs, entropy = torch.empty(n, **f32), torch.empty(n, **f32)
    clip = torch.empty(n, device=hidden.device, dtype=torch.int8)
    grad_hidden = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight) if compute_grad else weight.new_empty(0)
    for rows in _chunks(n, chunk_size):
        logits = hidden[rows] @ weight.T
        chunk = torch.ops.capo.policy_loss_(
            logits,
            labels[rows],
            old_logprobs[rows],
            advantages[rows],
            _take(credit, rows),
            _take(penalty, rows),
            _take(ref_logprobs, rows),
            loss_weights[rows],
            temperature,
            eps_low,
            eps_high,
            dual_clip,
            kl_coef,
            entropy_coef,
        )
        loss += chunk[0]
        logprobs[rows], entropy[rows], clip[rows] = chunk[1], chunk[2], chunk[3]
        if compute_grad:  # `logits` now holds d loss / d logits for this chunk
            torch.mm(logits, weight, out=grad_hidden[rows])
            grad_weight.addmm_(logits.T, hidden[rows])
    return loss, logprobs, entropy, clip, grad_hidden, grad_weight


@_linear_policy_loss.register_fake
def _(hidden, weight, labels, *args):
    n = hidden.shape[0]
    compute_grad = args[-1]
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.int8),
        torch.empty_like(hidden) if compute_grad else hidden.new_empty(0),
        torch.empty_like(weight) if compute_grad else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.grad_hidden, ctx.grad_weight = output[4], output[5]


def _backward(ctx, grad_loss, *unused):
    if ctx.grad_hidden.numel() == 0:
        raise RuntimeError("capo::linear_policy_loss was called with compute_grad=False; it has no gradient")
    grad_hidden = (ctx.grad_hidden * grad_loss).to(ctx.grad_hidden.dtype)
    grad_weight = (ctx.grad_weight * grad_loss).to(ctx.grad_weight.dtype)
    return (grad_hidden, grad_weight) + (None,) * 15


_linear_policy_loss.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("capo::linear_logprobs", mutates_args=())
def _linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    logprobs = torch.empty(n, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(n if with_entropy else 0, device=hidden.device, dtype=torch.float32)
    for rows in _chunks(n, chunk_size):
        lp, ent = torch.ops.capo.logprobs(hidden[rows] @ weight.T, labels[rows], temperature, with_entropy)
        logprobs[rows] = lp
        if with_entropy:
            entropy[rows] = ent
    return logprobs, entropy


@_linear_logprobs.register_fake
def _(hidden, weight, labels, temperature, with_entropy, chunk_size):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
) -> PolicyLossOutput:
    """`fused_policy_loss(hidden @ weight.T, ...)` without materialising the [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (after the last norm), one row per token.
        weight: [V, H] lm_head weight (no bias).
        chunk_budget_bytes: memory allowed for one chunk of logits; sets the tokens per matmul.
        The other arguments are those of `fused_policy_loss`.

    Returns:
        PolicyLossOutput; gradients flow to `hidden` and `weight`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if loss_weights is None:
        loss_weights = _token_mean_weights(labels)
    compute_grad = hidden.requires_grad or weight.requires_grad
    loss, logprobs, entropy, clip, _, _ = torch.ops.capo.linear_policy_loss(
        hidden,
        weight,
        labels,
        old_logprobs,
        advantages,
        credit,
        _per_token(penalty, hidden),
        ref_logprobs,
        loss_weights,
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(dual_clip),
        float(kl_coef),
        float(entropy_coef),
        chunk_tokens(weight.shape[0], hidden.dtype, chunk_budget_bytes),
        compute_grad,
    )
    return PolicyLossOutput(loss, logprobs, entropy, clip)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of `labels` under `hidden @ weight.T`, chunked, no gradient."""
    logprobs, entropy = torch.ops.capo.linear_logprobs(
        hidden.detach(),
        weight.detach(),
        labels,
        float(temperature),
        with_entropy,
        chunk_tokens(weight.shape[0], hidden.dtype, chunk_budget_bytes),
    )
    return logprobs, (entropy if with_entropy else None)
