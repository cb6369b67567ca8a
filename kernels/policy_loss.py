"""Fused PPO policy loss over vocabulary logits: log-probs, CAPO token credit and the clipped loss.

One program handles one token row. The forward sweep over the vocabulary keeps an online
log-sum-exp and the softmax's first moment (giving log-prob and entropy); the per-token PPO terms
follow, and their derivatives with respect to the token's log-prob and entropy are kept ([N] each).
The backward sweep turns those into d(loss)/d(logits) from the logits and the saved log-sum-exp:
two reads and one write of the logits in all, nothing else of size [N, V], no host synchronisation.
The in-place variant writes the gradient over the logits during forward (one read, one write).

Layers, top to bottom: Triton kernels, launchers, op registration (CUDA kernels, fake kernels,
autograd), the public functional API.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

import capo_fast._C  # noqa: F401  (defines the capo:: op schemas and their CPU kernels)

# Globals read inside @triton.jit must be constexpr: the GPU compiler rejects plain Python globals
# (the interpreter does not), see tests/test_aot_compile.py. The same clamp in C++ and the reference.
LOG_RATIO_CLAMP = tl.constexpr(20.0)


@triton.jit
def _row_stats(logits_row_ptr, V, inv_t, BLOCK_V: tl.constexpr):
    """Softmax statistics of z * inv_t for one row, in one sweep: (lse, entropy, max z, log s).

    Online softmax (the running-maximum rescaling trick): s = sum exp(u) and t = sum exp(u) * u with
    u = (z - m) * inv_t are rescaled whenever the running maximum m of the raw logits grows. Keeping t
    relative to m avoids the cancellation that lse - E[z] would suffer for large logits, and forming
    u from z - m (exact where exp(u) matters) leaves no rounding residue of z * inv_t in the exponent.
    log p_j = (z_j - m) * inv_t - log s.
    """
    m = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(s > 0, (m - m_new) * inv_t, 0.0)  # s > 0 implies m and m_new are finite
        alpha = tl.exp(shift)
        u = tl.where(z != float("-inf"), (z - m_new) * inv_t, float("-inf"))
        e = tl.exp(u)
        t = alpha * (t + shift * s) + tl.sum(tl.where(e > 0, e * u, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = tl.where(s > 0, m * inv_t + log_s, float("-inf"))
    entropy = tl.where(s > 0, log_s - t / s, 0.0)
    return lse, entropy, m, log_s


@triton.jit
def _row_grad(grad_row_ptr, logits_row_ptr, V, label, inv_t, pivot, offset, entropy, g_lp, g_h, BLOCK_V: tl.constexpr):
    """Writes d/dz of (g_lp * logp_label + g_h * H) for one row (label < 0: no label term).

    g_j = (g_lp * ([j == label] - p_j) - g_h * p_j * (log p_j + H)) / T; may overwrite the logits.
    log p_j = (z_j - pivot) * inv_t - offset: (max z, log s) right after `_row_stats` (exact for any
    logits), (0, lse) from a saved log-sum-exp; clamped to <= 0 so that extreme logits keep p_j <= 1.
    """
    a = g_lp * inv_t
    b = g_h * inv_t
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_vocab = offs < V
        z = tl.load(logits_row_ptr + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
        logp_j = tl.minimum((z - pivot) * inv_t - offset, 0.0)
        finite = z != float("-inf")  # -inf logits (and rows of nothing else) get no gradient
        p = tl.where(finite, tl.exp(logp_j), 0.0)
        g = tl.where(finite, -p * (a + b * (logp_j + entropy)), 0.0)
        g += tl.where(offs == label, a, 0.0)
        tl.store(grad_row_ptr + offs, g.to(grad_row_ptr.dtype.element_ty), mask=in_vocab)


@triton.jit
def _policy_loss_fwd_kernel(
    token_loss_ptr,
    logprobs_ptr,
    entropy_ptr,
    clip_ptr,
    lse_ptr,
    dlogp_ptr,
    dent_ptr,
    logits_ptr,
    labels_ptr,
    old_logprobs_ptr,
    advantages_ptr,
    credit_ptr,
    penalty_ptr,
    ref_logprobs_ptr,
    weights_ptr,
    stride_logits,
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
    IN_PLACE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_logits
    lse, entropy, z_max, log_s = _row_stats(logits_row_ptr, V, inv_t, BLOCK_V)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)  # out-of-range labels (ignore_index) count as masked
    z_label = tl.load(logits_row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    logp = tl.where(valid, (z_label - z_max) * inv_t - log_s, 0.0)

    adv = tl.load(advantages_ptr + row)
    if HAS_CREDIT:  # CAPO token-credit masking: A_t = a - p * e_t
        adv -= tl.load(penalty_ptr + row) * tl.load(credit_ptr + row)
    raw_log_ratio = logp - tl.load(old_logprobs_ptr + row)
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
        d = tl.load(ref_logprobs_ptr + row) - logp
        ed = tl.exp(d)
        loss += kl_coef * (ed - d - 1.0)
        dloss_dlogp += kl_coef * (1.0 - ed)
    loss -= entropy_coef * entropy

    w = tl.where(valid, tl.load(weights_ptr + row), 0.0)
    live = w != 0.0
    g_lp = tl.where(live, w * dloss_dlogp, 0.0)
    g_h = tl.where(live, -w * entropy_coef, 0.0)
    tl.store(token_loss_ptr + row, tl.where(live, w * loss, 0.0))
    tl.store(logprobs_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(clip_ptr + row, clip_code.to(tl.int8))
    tl.store(lse_ptr + row, lse)
    tl.store(dlogp_ptr + row, g_lp)
    tl.store(dent_ptr + row, g_h)
    if IN_PLACE:
        label_or_none = tl.where(valid, label, -1)
        _row_grad(logits_row_ptr, logits_row_ptr, V, label_or_none, inv_t, z_max, log_s, entropy, g_lp, g_h, BLOCK_V)


@triton.jit
def _logprobs_fwd_kernel(
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    logits_ptr,
    labels_ptr,
    stride_logits,
    V,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_logits
    lse, entropy, z_max, log_s = _row_stats(logits_row_ptr, V, inv_t, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)
    z_label = tl.load(logits_row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(logprobs_ptr + row, tl.where(valid, (z_label - z_max) * inv_t - log_s, 0.0))
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logits_grad_kernel(
    grad_ptr,
    logits_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    stride_grad,
    stride_logits,
    V,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)
    _row_grad(
        grad_ptr + row * stride_grad,
        logits_ptr + row * stride_logits,
        V,
        tl.where(valid, label, -1),
        inv_t,
        0.0,
        tl.load(lse_ptr + row),
        tl.load(entropy_ptr + row),
        tl.where(valid, tl.load(grad_logprobs_ptr + row), 0.0),
        tl.load(grad_entropy_ptr + row),
        BLOCK_V,
    )


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """x *= scale, read from device memory; no memory traffic at all when scale == 1."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------

# One launch configuration for every vocabulary, so the ahead-of-time compilation test
# (capo_fast.kernels.aot) covers every variant a launcher can choose. 4096 lanes over 8 warps is 16
# elements per thread per block; vocabularies of LLMs (32k-256k) take 8 to 63 blocks per row.
BLOCK_V = 4096
NUM_WARPS = 8
SCALE_BLOCK = 1024
SCALE_NUM_WARPS = 4


def rows_contiguous(t: torch.Tensor) -> bool:
    """Rows the kernels can read as `row_ptr + j`: unit column stride, or nothing that the stride could reach."""
    return t.shape[0] == 0 or t.shape[1] <= 1 or t.stride(1) == 1


def _check_rows(logits: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    if logits.dim() != 2 or not rows_contiguous(logits):
        raise ValueError(
            f"logits must be [N, V] with contiguous rows, got shape {tuple(logits.shape)}, strides {logits.stride()}"
        )
    n = logits.shape[0]
    for name, t in per_token.items():
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match logits, got {tuple(t.shape)}")


# The kernels read every [N] input at `ptr + row`: each is made a contiguous copy where it is not one
# (a label column `ids[:, 1:]` or `x[:, 0]` of a batch has stride > 1). [N] copies cost nothing next to [N, V].
def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def launch_guard(device: torch.device):
    """The context every Triton launch runs in: the tensors' own CUDA device current (Triton launches on the
    current device and its current stream, triton/runtime/jit.py:739-740), nothing for CPU tensors
    (the interpreter). Logits on cuda:1 while cuda:0 is current happen with `device_map="auto"`."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class LossOutputs(NamedTuple):
    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    clipped: torch.Tensor
    lse: torch.Tensor
    dloss_dlogprobs: torch.Tensor
    dloss_dentropy: torch.Tensor


def policy_loss_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    credit: torch.Tensor | None,
    penalty: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    loss_weights: torch.Tensor,
    options: PolicyLossOptions,
    in_place: bool = False,
) -> LossOutputs:
    """Launches the Triton forward; with `in_place` the logits are overwritten by d(loss)/d(logits).

    Works on any device Triton runs on, CPU tensors included under TRITON_INTERPRET=1.
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
    token_loss, logprobs, entropy, lse, dlogp, dent = (torch.empty(n, **f32) for _ in range(6))
    clip = torch.empty(n, device=logits.device, dtype=torch.int8)
    advantages = _f32(advantages)
    if n > 0:
        with launch_guard(logits.device):
            _policy_loss_fwd_kernel[(n,)](
                token_loss_ptr=token_loss,
                logprobs_ptr=logprobs,
                entropy_ptr=entropy,
                clip_ptr=clip,
                lse_ptr=lse,
                dlogp_ptr=dlogp,
                dent_ptr=dent,
                logits_ptr=logits,
                labels_ptr=_i64(labels),
                old_logprobs_ptr=_f32(old_logprobs),
                advantages_ptr=advantages,
                credit_ptr=_f32(credit) if credit is not None else advantages,
                penalty_ptr=_f32(penalty) if penalty is not None else advantages,
                ref_logprobs_ptr=_f32(ref_logprobs) if ref_logprobs is not None else advantages,
                weights_ptr=_f32(loss_weights),
                stride_logits=logits.stride(0),
                V=v,
                inv_t=1.0 / options.temperature,
                eps_low=options.eps_low,
                eps_high=options.eps_high,
                dual_clip=options.dual_clip,
                kl_coef=options.kl_coef,
                entropy_coef=options.entropy_coef,
                HAS_CREDIT=credit is not None,
                HAS_REF=ref_logprobs is not None,
                USE_DUAL_CLIP=options.dual_clip > 1.0,
                IN_PLACE=in_place,
                BLOCK_V=BLOCK_V,
                num_warps=NUM_WARPS,
            )
    return LossOutputs(token_loss.sum(), logprobs, entropy, clip, lse, dlogp, dent)


def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the Triton log-prob kernel. Returns (logprobs, entropy, lse), each [N] fp32."""
    _check_rows(logits, labels=labels)
    n, v = logits.shape
    logprobs, entropy, lse = (torch.empty(n, device=logits.device, dtype=torch.float32) for _ in range(3))
    if n > 0:
        with launch_guard(logits.device):
            _logprobs_fwd_kernel[(n,)](
                logprobs_ptr=logprobs,
                entropy_ptr=entropy,
                lse_ptr=lse,
                logits_ptr=logits,
                labels_ptr=_i64(labels),
                stride_logits=logits.stride(0),
                V=v,
                inv_t=1.0 / temperature,
                BLOCK_V=BLOCK_V,
                num_warps=NUM_WARPS,
            )
    return logprobs, entropy, lse


def logits_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes d/d(logits) of sum(grad_logprobs * logp + grad_entropy * H) into `out` (may be `logits`)."""
    _check_rows(logits, labels=labels, lse=lse, entropy=entropy, grad_logprobs=grad_logprobs, grad_entropy=grad_entropy)
    if out.shape != logits.shape or not rows_contiguous(out):
        raise ValueError(f"the gradient buffer must be {tuple(logits.shape)} with contiguous rows, got {out.shape}")
    n, v = logits.shape
    if n > 0:
        with launch_guard(logits.device):
            _logits_grad_kernel[(n,)](
                grad_ptr=out,
                logits_ptr=logits,
                labels_ptr=_i64(labels),
                lse_ptr=_f32(lse),
                entropy_ptr=_f32(entropy),
                grad_logprobs_ptr=_f32(grad_logprobs),
                grad_entropy_ptr=_f32(grad_entropy),
                stride_grad=out.stride(0),
                stride_logits=logits.stride(0),
                V=v,
                inv_t=1.0 / temperature,
                BLOCK_V=BLOCK_V,
                num_warps=NUM_WARPS,
            )
    return out


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x *= scale (a one-element tensor) without reading `scale` on the host."""
    if x.device.type == "cpu":  # reading a CPU scalar costs no device synchronisation
        return x if scale.item() == 1.0 else x.mul_(scale.to(x.dtype))
    if not x.is_contiguous():  # the kernel walks x as one flat range; logits with padded rows are not one
        return x.mul_(scale.to(x.dtype))
    numel = x.numel()
    if numel > 0:
        with launch_guard(x.device):
            _scale_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](
                x_ptr=x, scale_ptr=scale.to(torch.float32), numel=numel, BLOCK=SCALE_BLOCK, num_warps=SCALE_NUM_WARPS
            )
    return x


# ---- op registration: CUDA kernels, fake kernels, autograd -------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyLossOptions:
    """The scalar options of the loss; the field order is the C++ schema's (csrc/policy_loss.cpp).

    temperature: logits are divided by it, as in sampling.
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (clip-higher when eps_high > eps_low).
    dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A; 0 disables.
    kl_coef: weight of the k3 KL penalty to the reference policy (needs ref_logprobs).
    entropy_coef: weight of the entropy bonus (subtracted from the loss).
    """

    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 0.0
    kl_coef: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"eps_low and eps_high must be >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip != 0.0 and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be 0 (off) or > 1, got {self.dual_clip}")

    def as_args(self) -> tuple[float, ...]:
        """The options as the op schemas take them."""
        return tuple(float(getattr(self, name)) for name in OPTION_NAMES)


# Field names in schema order, computed once (torch.compile does not trace dataclasses.fields).
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PolicyLossOptions))


N_LOSS_INPUTS = 7  # labels, old_logprobs, advantages, credit, penalty, ref_logprobs, loss_weights


@torch.library.register_kernel("capo::policy_loss", "cuda")
def _policy_loss_cuda(logits, *args):
    return tuple(policy_loss_fwd(logits, *args[:N_LOSS_INPUTS], PolicyLossOptions(*args[N_LOSS_INPUTS:])))


@torch.library.register_kernel("capo::policy_loss_", "cuda")
def _policy_loss_inplace_cuda(logits, *args):
    out = policy_loss_fwd(logits, *args[:N_LOSS_INPUTS], PolicyLossOptions(*args[N_LOSS_INPUTS:]), in_place=True)
    return tuple(out[:4])


@torch.library.register_kernel("capo::logprobs", "cuda")
def _logprobs_cuda(logits, labels, temperature):
    return logprobs_fwd(logits, labels, temperature)


@torch.library.register_kernel("capo::logits_grad", "cuda")
def _logits_grad_cuda(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature):
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits_grad(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, out)


@torch.library.register_kernel("capo::logits_grad_", "cuda")
def _logits_grad_inplace_cuda(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature):
    logits_grad(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, logits)


def _vectors(logits: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(count)]


@torch.library.register_fake("capo::policy_loss")
def _policy_loss_fake(logits, *args):
    loss = logits.new_empty((), dtype=torch.float32)
    clip = logits.new_empty(logits.shape[0], dtype=torch.int8)
    logprobs, entropy, lse, dlogp, dent = _vectors(logits, 5)
    return loss, logprobs, entropy, clip, lse, dlogp, dent


@torch.library.register_fake("capo::policy_loss_")
def _policy_loss_inplace_fake(logits, *args):
    return _policy_loss_fake(logits, *args)[:4]


@torch.library.register_fake("capo::logprobs")
def _logprobs_fake(logits, labels, temperature):
    return tuple(_vectors(logits, 3))


@torch.library.register_fake("capo::logits_grad")
def _logits_grad_fake(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("capo::logits_grad_")
def _logits_grad_inplace_fake(logits, *args):
    return None


def _policy_loss_setup_context(ctx, inputs, output):
    logits, labels = inputs[0], inputs[1]
    ctx.temperature = inputs[1 + N_LOSS_INPUTS]
    ctx.num_inputs = len(inputs)
    _, _, entropy, _, lse, dloss_dlogp, dloss_dentropy = output
    ctx.save_for_backward(logits, labels, lse, entropy, dloss_dlogp, dloss_dentropy)


def _policy_loss_backward(ctx, grad_loss, *unused_grads):
    logits, labels, lse, entropy, dlogp, dent = ctx.saved_tensors
    # [N]-sized products with the upstream scalar: no host synchronisation, no second [N, V] buffer.
    grad = torch.ops.capo.logits_grad(
        logits, labels, lse, entropy, dlogp * grad_loss, dent * grad_loss, ctx.temperature
    )
    return (grad,) + (None,) * (ctx.num_inputs - 1)


torch.library.register_autograd("capo::policy_loss", _policy_loss_backward, setup_context=_policy_loss_setup_context)


def _logprobs_setup_context(ctx, inputs, output):
    logits, labels, ctx.temperature = inputs
    ctx.save_for_backward(logits, labels, output[2], output[1])


def _logprobs_backward(ctx, grad_logprobs, grad_entropy, unused_grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    grad = torch.ops.capo.logits_grad(logits, labels, lse, entropy, grad_logprobs, grad_entropy, ctx.temperature)
    return grad, None, None


torch.library.register_autograd("capo::logprobs", _logprobs_backward, setup_context=_logprobs_setup_context)


class _InplacePolicyLoss(torch.autograd.Function):
    """Overwrites the logits with their gradient during forward: no extra [N, V] buffer at all."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, logprobs, entropy, clip = torch.ops.capo.policy_loss_(logits.detach(), *args)
        ctx.save_for_backward(logits.detach())
        ctx.num_inputs = 1 + len(args)
        ctx.mark_non_differentiable(logprobs, entropy, clip)
        return loss, logprobs, entropy, clip

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad_logits,) = ctx.saved_tensors
        return (scale_(grad_logits, grad_loss),) + (None,) * (ctx.num_inputs - 1)


# ---- public API --------------------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
    """loss: scalar (fp32). logprobs, entropy: [N] fp32, detached. clipped: [N] int8 clip code
    (0 none, 1 ratio clipped below with A < 0, 2 clipped above with A > 0, 3 dual clip)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    clipped: torch.Tensor


def token_mean_weights(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Default aggregation: mean over the tokens whose label is valid (in [0, vocab_size), as the kernels
    count them: an ignored or out-of-vocabulary label is no token)."""
    valid = ((labels >= 0) & (labels < vocab_size)).float()
    return valid / valid.sum().clamp_min(1.0)


def per_token(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((like.shape[0],), float(value), device=like.device, dtype=torch.float32)


def resolve_options(options: PolicyLossOptions | None, overrides: dict[str, float]) -> PolicyLossOptions:
    """`options` (default: PolicyLossOptions()) with keyword overrides; unknown names are an error."""
    base = options if options is not None else PolicyLossOptions()
    if not overrides:
        return base
    unknown = set(overrides) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown policy-loss option(s) {sorted(unknown)}; see PolicyLossOptions")
    return PolicyLossOptions(*(overrides.get(name, getattr(base, name)) for name in OPTION_NAMES))


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
    options: PolicyLossOptions | None = None,
    inplace_backward: bool = False,
    **option_overrides: float,
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
        options: `PolicyLossOptions` (temperature, clip range, dual clip, KL and entropy weights);
            keyword overrides such as `eps_high=0.28` are applied on top.
        inplace_backward: write the gradient over `logits` during forward (saves an [N, V] buffer;
            the logits are destroyed, so nothing else may read them afterwards).

    Returns:
        PolicyLossOutput. The loss equals, in PyTorch,
        `sum(w * (max(-A*r, -A*clamp(r, 1-eps_low, 1+eps_high)) + kl_coef*k3 - entropy_coef*H))`
        with `r = exp(clamp(logp - old_logprobs, -20, 20))` and `logp = log_softmax(logits / T)[label]`;
        see `capo_fast.kernels.reference.policy_loss`.
    """
    opts = resolve_options(options, option_overrides)
    if loss_weights is None:
        loss_weights = token_mean_weights(labels, logits.shape[-1])
    args = (labels, old_logprobs, advantages, credit, per_token(penalty, logits), ref_logprobs, loss_weights)
    if inplace_backward and logits.requires_grad:
        return PolicyLossOutput(*_InplacePolicyLoss.apply(logits, *args, *opts.as_args()))
    out = torch.ops.capo.policy_loss(logits, *args, *opts.as_args())
    return PolicyLossOutput(out[0], out[1].detach(), out[2].detach(), out[3])


def fused_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) without building log_softmax; differentiable.

    Equivalent to `torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[:, None])[:, 0]`
    (0 where the label is outside [0, V)). With `logits.requires_grad`, backward takes per-token upstream
    gradients of both outputs and keeps nothing of size [N, V] but the logits themselves, so any loss
    written in PyTorch on [N] vectors (GSPO, CISPO, ...) gets the fused memory footprint.
    Returns (logprobs [N] fp32, entropy [N] fp32 or None).
    """
    logprobs, entropy, _ = torch.ops.capo.logprobs(logits, labels, float(temperature))
    return logprobs, (entropy if with_entropy else None)
