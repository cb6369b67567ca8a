"""Fused PPO policy loss over vocabulary logits: log-probs, CAPO token credit and the clipped loss.

One program handles one token row. The forward sweep over the vocabulary keeps an online
log-sum-exp and the softmax's first moment (giving log-prob and entropy); the per-token PPO terms
follow, and their derivatives with respect to the token's log-prob and entropy are kept ([N] each).
The backward sweep turns those into d(loss)/d(logits) from the logits and the saved log-sum-exp:
two reads and one write of the logits in all, nothing else of size [N, V], no host synchronisation.
The in-place variant writes the gradient over the logits during forward (one read, one write).

Layers, top to bottom: Triton kernels, launchers, op registration (CUDA kernels, fake kernels whose checks
are in op_checks.py, autograd), the public functional API.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

import capo_fast._C  # noqa: F401  (defines the capo:: op schemas and their CPU kernels)
from capo_fast.kernels.op_checks import (
    check_options,
    check_per_token,
    check_rows,
    check_temperature,
    rows_contiguous,
)

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
    group_penalty_ptr,
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
    if HAS_CREDIT:  # CAPO token-credit masking: A_t = a - p_g * e_t
        adv -= tl.load(group_penalty_ptr + row) * tl.load(credit_ptr + row)
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
    logits: torch.Tensor, inputs: PolicyLossInputs, options: PolicyLossOptions, in_place: bool = False
) -> LossOutputs:
    """Launches the Triton forward; with `in_place` the logits are overwritten by d(loss)/d(logits).

    Works on any device Triton runs on, CPU tensors included under TRITON_INTERPRET=1.
    """
    _check_rows(logits, **dict(zip(LOSS_TENSORS, inputs.op_args(), strict=True)))
    labels, credit, group_penalty = inputs.labels, inputs.credit, inputs.group_penalty
    ref_logprobs = inputs.ref_logprobs
    if (credit is None) != (group_penalty is None):
        raise ValueError("credit and group_penalty must be given together")
    n, v = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    token_loss, logprobs, entropy, lse, dlogp, dent = (torch.empty(n, **f32) for _ in range(6))
    clip = torch.empty(n, device=logits.device, dtype=torch.int8)
    advantages = _f32(inputs.advantages)
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
                old_logprobs_ptr=_f32(inputs.old_logprobs),
                advantages_ptr=advantages,
                credit_ptr=_f32(credit) if credit is not None else advantages,
                group_penalty_ptr=_f32(group_penalty) if group_penalty is not None else advantages,
                ref_logprobs_ptr=_f32(ref_logprobs) if ref_logprobs is not None else advantages,
                weights_ptr=_f32(inputs.loss_weights),
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


# ---- op registration: the records, CUDA kernels, fake kernels, autograd ---------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyLossOptions:
    """The scalar options of the loss.

    The ops take them as one `float[] options` argument, in the order of these fields (`OPTION_NAMES`,
    see `as_list`); csrc/policy_loss.cpp reads option k as its field k (its `Option` enum), which
    tests/test_op_registration.py pins.

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

    def as_list(self) -> list[float]:
        """The options as the op schemas take them (`float[] options`): the fields in `OPTION_NAMES` order."""
        return [float(getattr(self, name)) for name in OPTION_NAMES]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> PolicyLossOptions:
        """The inverse of `as_list`: an op's `options` argument as the option object."""
        if len(values) != len(OPTION_NAMES):
            raise ValueError(f"options must hold {len(OPTION_NAMES)} values {OPTION_NAMES}, got {len(values)}")
        return cls(**dict(zip(OPTION_NAMES, values, strict=True)))


# Field names in schema order, computed once (torch.compile does not trace dataclasses.fields).
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PolicyLossOptions))


class PolicyLossInputs(NamedTuple):
    """The per-token tensors of one packed micro-batch, all [N], as one record from the trainer to the launchers.

    labels: sampled tokens (negative or >= V: masked). old_logprobs: behaviour-policy log-probs.
    advantages: per-rollout a_i broadcast to its tokens. loss_weights: aggregation weight of each token
    (`capo_fast.kernels.aggregation_weights`; 0 masks a token). seq_ids: int64 sequence index of each
    token, read only by sequence-level losses (GSPO); the ops do not take it. credit, group_penalty: CAPO's e_t
    and p_g = P / (std_g + eps) of the token's prompt group, A_t = advantages - group_penalty * credit (both or
    neither). ref_logprobs: reference-policy log-probs
    (the k3 KL term, weighted by `options.kl_coef`).

    The ops take the other fields as named tensor arguments in field order (`LOSS_TENSORS`, `op_args`).
    """

    labels: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    loss_weights: torch.Tensor
    seq_ids: torch.Tensor | None = None
    credit: torch.Tensor | None = None
    group_penalty: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def token_advantages(self, dtype: torch.dtype) -> torch.Tensor:
        """A_t = a - p_g * e_t (CAPO's token-credit masking), in `dtype`."""
        adv = self.advantages.to(dtype)
        if self.credit is None:
            return adv
        return adv - self.group_penalty.to(dtype) * self.credit.to(dtype)

    def counted(self, vocab_size: int) -> torch.Tensor:
        """[N] bool: tokens that enter the loss, as the kernels count them: a label in [0, vocab_size) (an
        ignored or out-of-vocabulary label is no token, as in `token_mean_weights`) and a non-zero weight."""
        return (self.labels >= 0) & (self.labels < vocab_size) & (self.loss_weights != 0)

    def op_args(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors the loss ops take, in schema order (`LOSS_TENSORS`)."""
        return tuple(getattr(self, name) for name in LOSS_TENSORS)

    @classmethod
    def from_op_args(cls, tensors: Sequence[torch.Tensor | None]) -> PolicyLossInputs:
        """The inverse of `op_args`: a loss op's tensor arguments after the logits as the record."""
        return cls(**dict(zip(LOSS_TENSORS, tensors, strict=True)))

    def rows(self, rows: slice) -> PolicyLossInputs:
        """The record of the tokens `rows`."""
        return PolicyLossInputs(*(None if t is None else t[rows] for t in self))


# The per-token tensor arguments of the loss ops, in schema order (csrc/policy_loss.cpp `kLossArgs` and
# capo::linear_policy_loss): the record's fields but seq_ids.
LOSS_TENSORS = tuple(name for name in PolicyLossInputs._fields if name != "seq_ids")


def _op_args(args: Sequence) -> tuple[PolicyLossInputs, PolicyLossOptions]:
    """A loss op's arguments after the logits, `(*LOSS_TENSORS, options)`, as the record and the options."""
    *tensors, options = args
    return PolicyLossInputs.from_op_args(tensors), PolicyLossOptions.from_list(options)


def policy_loss_triton(logits, *args):
    """capo::policy_loss on CUDA (any Triton device: tests call it on CPU tensors under the interpreter)."""
    return tuple(policy_loss_fwd(logits, *_op_args(args)))


def policy_loss_inplace_triton(logits, *args):
    out = policy_loss_fwd(logits, *_op_args(args), in_place=True)
    return out.loss, out.logprobs, out.entropy, out.clipped


torch.library.register_kernel("capo::policy_loss", "cuda", policy_loss_triton)
torch.library.register_kernel("capo::policy_loss_", "cuda", policy_loss_inplace_triton)


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


# ---- fake kernels: the checks of the C++ ops, with torch._check, so a wrong call fails while tracing ----


def check_loss_inputs(rows: str, n, device: torch.device, tensors: Sequence[torch.Tensor | None], options):
    """The checks of the loss ops on their tensor arguments (`LOSS_TENSORS` order) and `options`; `rows` names
    the tensor the per-token ones follow (the logits, or the hidden states of the linear op)."""
    inputs = PolicyLossInputs.from_op_args(tensors)
    check_per_token(rows, n, device, **inputs._asdict())
    torch._check(
        (inputs.credit is None) == (inputs.group_penalty is None),
        lambda: "capo: credit and group_penalty must be given together",
    )
    check_options(options, OPTION_NAMES)


def _vectors(logits: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(count)]


@torch.library.register_fake("capo::policy_loss")
def _policy_loss_fake(logits, *args):
    check_rows("logits", logits)
    *tensors, options = args
    check_loss_inputs("logits", logits.shape[0], logits.device, tensors, options)
    loss = logits.new_empty((), dtype=torch.float32)
    clip = logits.new_empty(logits.shape[0], dtype=torch.int8)
    logprobs, entropy, lse, dlogp, dent = _vectors(logits, 5)
    return loss, logprobs, entropy, clip, lse, dlogp, dent


@torch.library.register_fake("capo::policy_loss_")
def _policy_loss_inplace_fake(logits, *args):
    return _policy_loss_fake(logits, *args)[:4]


@torch.library.register_fake("capo::logprobs")
def _logprobs_fake(logits, labels, temperature):
    check_rows("logits", logits)
    check_per_token("logits", logits.shape[0], logits.device, labels=labels)
    check_temperature(temperature)
    return tuple(_vectors(logits, 3))


def _check_grad_args(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature):
    check_rows("logits", logits)
    check_per_token(
        "logits", logits.shape[0], logits.device, labels=labels, lse=lse, entropy=entropy, grad_logprobs=grad_logprobs,
        grad_entropy=grad_entropy,
    )  # fmt: skip
    check_temperature(temperature)


@torch.library.register_fake("capo::logits_grad")
def _logits_grad_fake(logits, *args):
    _check_grad_args(logits, *args)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("capo::logits_grad_")
def _logits_grad_inplace_fake(logits, *args):
    _check_grad_args(logits, *args)
    return None


# ---- autograd ---------------------------------------------------------------------------------------


def _policy_loss_setup_context(ctx, inputs, output):
    logits, *args = inputs
    loss_inputs, options = _op_args(args)
    ctx.temperature = options.temperature
    ctx.num_inputs = len(inputs)
    _, _, entropy, _, lse, dloss_dlogp, dloss_dentropy = output
    ctx.save_for_backward(logits, loss_inputs.labels, lse, entropy, dloss_dlogp, dloss_dentropy)


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
    def forward(ctx, logits, inputs, options):
        loss, logprobs, entropy, clip = torch.ops.capo.policy_loss_(logits.detach(), *inputs.op_args(), options)
        ctx.save_for_backward(logits.detach())
        ctx.mark_non_differentiable(logprobs, entropy, clip)
        return loss, logprobs, entropy, clip

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad_logits,) = ctx.saved_tensors
        return scale_(grad_logits, grad_loss), None, None


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


def _per_token(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((like.shape[0],), float(value), device=like.device, dtype=torch.float32)


def resolve_options(options: PolicyLossOptions | None, overrides: dict[str, float]) -> PolicyLossOptions:
    """`options` (default: PolicyLossOptions()) with keyword overrides; an unknown name is a TypeError."""
    base = options if options is not None else PolicyLossOptions()
    if not overrides:
        return base
    if "penalty" in overrides:  # P is the config's; p_g must never be read from that name
        raise TypeError(
            "the keyword penalty= is now group_penalty=: pass the per-token p_g = P / (std_g + eps) as "
            "group_penalty (`penalty` is the config's P, algorithm.penalty)"
        )
    unknown = set(overrides) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown policy-loss option(s) {sorted(unknown)}; see PolicyLossOptions")
    return PolicyLossOptions(**{name: overrides.get(name, getattr(base, name)) for name in OPTION_NAMES})


def prepare_loss_call(
    rows: torch.Tensor,
    vocab_size: int,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    credit: torch.Tensor | None,
    group_penalty: torch.Tensor | float | None,
    ref_logprobs: torch.Tensor | None,
    loss_weights: torch.Tensor | None,
    options: PolicyLossOptions | None,
    overrides: dict[str, float],
) -> tuple[PolicyLossInputs, PolicyLossOptions]:
    """The record and the options of a call of `fused_policy_loss` or `fused_linear_policy_loss`.

    rows: the call's [N, ...] first argument (logits or hidden states): a float `group_penalty` becomes an
    [N] fp32 tensor on its device. vocab_size: V, for the default `loss_weights` (`token_mean_weights`).
    `options` and `overrides` as `resolve_options` takes them. The other arguments are the record's fields.
    """
    if loss_weights is None:
        loss_weights = token_mean_weights(labels, vocab_size)
    inputs = PolicyLossInputs(
        labels,
        old_logprobs,
        advantages,
        loss_weights,
        credit=credit,
        group_penalty=_per_token(group_penalty, rows),
        ref_logprobs=ref_logprobs,
    )
    return inputs, resolve_options(options, overrides)


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    credit: torch.Tensor | None = None,
    group_penalty: torch.Tensor | float | None = None,
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
        credit: [N] e_t in [0, 1] (vote weight of the step holding the token); with `group_penalty`,
            the kernel uses A_t = advantages - group_penalty * credit.
        group_penalty: [N] or float, p_g = P / (std_g + eps) of each token's prompt group (P is the
            config's `algorithm.penalty`).
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
    inputs, opts = prepare_loss_call(
        logits, logits.shape[-1], labels, old_logprobs, advantages, credit=credit, group_penalty=group_penalty,
        ref_logprobs=ref_logprobs, loss_weights=loss_weights, options=options, overrides=option_overrides,
    )  # fmt: skip
    return apply_policy_loss(logits, inputs, opts, inplace_backward=inplace_backward)


def apply_policy_loss(
    logits: torch.Tensor, inputs: PolicyLossInputs, options: PolicyLossOptions, *, inplace_backward: bool = False
) -> PolicyLossOutput:
    """`fused_policy_loss` on the per-token record: logits [N, V], `inputs` all [N] (loss_weights given)."""
    if inplace_backward and logits.requires_grad:
        return PolicyLossOutput(*_InplacePolicyLoss.apply(logits, inputs, options.as_list()))
    out = torch.ops.capo.policy_loss(logits, *inputs.op_args(), options.as_list())
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
