"""The policy loss and log-probs from final hidden states and the lm_head weight, never holding [N, V] logits.

Token chunks of logits are produced by a matmul and consumed at once. For the loss, the in-place
policy-loss op overwrites each chunk with its gradient, which is turned into gradients for the hidden
states and the weight before the next chunk (three matmuls per chunk, all in forward). For the
differentiable log-probs, backward recomputes each chunk (the upstream per-token gradients are only
known then). grad_weight is accumulated over chunks in fp32 whatever the input dtype, as Liger and
Cut Cross-Entropy do. Peak extra memory: one chunk of logits (DEFAULT_CHUNK_BUDGET_BYTES, per device)
plus the fp32 gradient accumulator.
"""

from __future__ import annotations

import torch

from capo_fast.kernels.op_checks import check_matrix, check_per_token, check_temperature
from capo_fast.kernels.policy_loss import (
    PolicyLossInputs,
    PolicyLossOptions,
    PolicyLossOutput,
    check_loss_inputs,
    prepare_loss_call,
)

# Memory for one chunk of logits. On CUDA a chunk's token count is the M dimension of three GEMMs:
# 64 MiB holds 73 tokens of a 151,936-word bf16 vocabulary (with the chunk's fp32 copy), under one
# 128-row tensor-core tile, while 512 MiB holds 589 (Liger's fused linear cross-entropy picks 512 rows
# for 16k tokens at H=3584, liger_kernel/ops/fused_linear_cross_entropy.py:103-105). On CPU larger
# chunks gained about 2% at N=2048, H=576, V=49152: the small budget stays.
DEFAULT_CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}


def default_chunk_budget(device: torch.device) -> int:
    return DEFAULT_CHUNK_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]


def chunk_tokens(vocab_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """Tokens per chunk so that one chunk of logits, and its fp32 copy for low-precision inputs, fit the budget."""
    size = torch.empty((), dtype=dtype).element_size()
    per_token = vocab_size * (size + (4 if size < 4 else 0))
    return max(1, budget_bytes // per_token)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int):
    """Yields (rows, hidden[rows] @ weight.T) chunk by chunk, every chunk in the same buffer.

    One buffer per call instead of one per chunk: a fresh allocation is paid for again on first touch.
    """
    n = hidden.shape[0]
    buffer = hidden.new_empty(min(chunk_size, n), weight.shape[0])
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits = buffer[: rows.stop - rows.start]
        torch.mm(hidden[rows], weight.T, out=logits)
        yield rows, logits


def gemm_accumulates_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(..., out_dtype=torch.float32)` takes operands of `dtype` on `device`: bf16/fp16
    on CUDA only (torch/_torch_docs.py:602-611 of torch 2.13; the overload exists since torch 2.8, which Liger
    checks before using it, liger_kernel/ops/fused_linear_cross_entropy.py:29, so torch 2.11 has it), on
    GPUs of compute capability 8 or more (Ampere on; Liger checks the same at line 329)."""
    return (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc[V, H] (fp32) += grad_logits.T @ hidden, accumulated in fp32.

    On CUDA the low-precision operands go to the tensor cores as they are and the product is accumulated
    into the fp32 buffer (`out_dtype`); elsewhere (CPU has no such overload) both are widened to fp32 first.
    """
    if grad_logits.dtype == hidden.dtype and gemm_accumulates_in_fp32(acc.device, grad_logits.dtype):
        torch.addmm(acc, grad_logits.T, hidden, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(grad_logits.T.to(torch.float32), hidden.to(torch.float32))


# The schema of capo::policy_loss with hidden states and the lm_head weight in place of the logits: the
# per-token tensors in `LOSS_TENSORS` order, the options as one list (`PolicyLossOptions.as_list`).
@torch.library.custom_op("capo::linear_policy_loss", mutates_args=())
def _linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_weights: torch.Tensor,
    credit: torch.Tensor | None,
    group_penalty: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    options: list[float],
    chunk_size: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = (labels, old_logprobs, advantages, loss_weights, credit, group_penalty, ref_logprobs)
    inputs = PolicyLossInputs.from_op_args(tensors)
    n = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    loss = torch.zeros((), **f32)
    logprobs, entropy = torch.empty(n, **f32), torch.empty(n, **f32)
    clip = torch.empty(n, device=hidden.device, dtype=torch.int8)
    grad_hidden = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, **f32) if compute_grad else weight.new_empty(0, dtype=torch.float32)
    for rows, logits in _chunk_logits(hidden, weight, chunk_size):
        chunk = torch.ops.capo.policy_loss_(logits, *inputs.rows(rows).op_args(), options)
        loss += chunk[0]
        logprobs[rows], entropy[rows], clip[rows] = chunk[1], chunk[2], chunk[3]
        if compute_grad:  # `logits` now holds d loss / d logits for this chunk
            torch.mm(logits, weight, out=grad_hidden[rows])
            _accumulate_weight_grad(grad_weight, logits, hidden[rows])
    return loss, logprobs, entropy, clip, grad_hidden, grad_weight


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """hidden [N, H] and weight [V, H]: floating point, one dtype, one device (the matmuls need all three)."""
    check_matrix("hidden", hidden)
    check_matrix("weight", weight)
    torch._check(
        hidden.shape[1] == weight.shape[1],
        lambda: f"capo: hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}",
    )
    torch._check(hidden.dtype == weight.dtype, lambda: f"capo: hidden is {hidden.dtype}, weight {weight.dtype}")
    torch._check(
        hidden.device == weight.device, lambda: f"capo: hidden is on {hidden.device}, weight on {weight.device}"
    )


@_linear_policy_loss.register_fake
def _(hidden, weight, *args):
    *tensors, options, chunk_size, compute_grad = args
    _check_linear(hidden, weight)
    n = hidden.shape[0]
    check_loss_inputs("hidden states", n, hidden.device, tensors, options)
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.int8),
        torch.empty_like(hidden) if compute_grad else hidden.new_empty(0),
        weight.new_empty(weight.shape if compute_grad else (0,), dtype=torch.float32),
    )


def _loss_setup_context(ctx, inputs, output):
    ctx.num_inputs = len(inputs)
    ctx.compute_grad = inputs[-1]
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(output[4], output[5])  # tensors reach backward only this way: no leak per call


def _loss_backward(ctx, grad_loss, *unused):
    grad_hidden, grad_weight = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("capo::linear_policy_loss was called with compute_grad=False; it has no gradient")
    # The gradients were computed in forward for an upstream gradient of 1; scale them on the device.
    # Eagerly in place, so no second [V, H] fp32 buffer exists (a second backward through the graph then
    # fails autograd's version check instead of scaling twice); out of place while a graph is traced
    # (fake/functional tensor subclasses), as torch.compile's partitioner rejects mutating a saved
    # forward output in backward.
    if type(grad_weight) is torch.Tensor and not torch.compiler.is_compiling():
        grad_weight.mul_(grad_loss)
    else:
        grad_weight = grad_weight * grad_loss
    grad_weight = grad_weight.to(ctx.weight_dtype)
    return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight) + (None,) * (ctx.num_inputs - 2)


_linear_policy_loss.register_autograd(_loss_backward, setup_context=_loss_setup_context)


@torch.library.custom_op("capo::linear_logprobs", mutates_args=())
def _linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    logprobs, entropy, lse = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3))
    for rows, logits in _chunk_logits(hidden, weight, chunk_size):
        logprobs[rows], entropy[rows], lse[rows] = torch.ops.capo.logprobs(logits, labels[rows], temperature)
    return logprobs, entropy, lse


@_linear_logprobs.register_fake
def _(hidden, weight, labels, temperature, chunk_size):
    _check_linear(hidden, weight)
    check_per_token("hidden states", hidden.shape[0], hidden.device, labels=labels)
    check_temperature(temperature)
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))


def _logprobs_setup_context(ctx, inputs, output):
    hidden, weight, labels, ctx.temperature, ctx.chunk_size = inputs
    ctx.save_for_backward(hidden, weight, labels, output[2], output[1])


def _logprobs_backward(ctx, grad_logprobs, grad_entropy, unused_grad_lse):
    hidden, weight, labels, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[:2]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    for rows, logits in _chunk_logits(hidden, weight, ctx.chunk_size):  # recomputed, then overwritten
        torch.ops.capo.logits_grad_(
            logits, labels[rows], lse[rows], entropy[rows], grad_logprobs[rows], grad_entropy[rows], ctx.temperature
        )
        if need_hidden:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if need_weight:
            _accumulate_weight_grad(grad_weight, logits, hidden[rows])
    return grad_hidden, (grad_weight.to(weight.dtype) if need_weight else None), None, None, None


_linear_logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    credit: torch.Tensor | None = None,
    group_penalty: torch.Tensor | float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    chunk_budget_bytes: int | None = None,
    **option_overrides: float,
) -> PolicyLossOutput:
    """`fused_policy_loss(hidden @ weight.T, ...)` without materialising the [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (after the last norm), one row per token.
        weight: [V, H] lm_head weight (no bias).
        chunk_budget_bytes: memory allowed for one chunk of logits; sets the tokens per matmul
            (default: DEFAULT_CHUNK_BUDGET_BYTES of the device).
        The other arguments are those of `fused_policy_loss`.

    Returns:
        PolicyLossOutput; gradients flow to `hidden` and `weight`.
    """
    inputs, opts = prepare_loss_call(
        hidden, weight.shape[0], labels, old_logprobs, advantages, credit=credit, group_penalty=group_penalty,
        ref_logprobs=ref_logprobs, loss_weights=loss_weights, options=options, overrides=option_overrides,
    )  # fmt: skip
    return apply_linear_policy_loss(hidden, weight, inputs, opts, chunk_budget_bytes=chunk_budget_bytes)


def apply_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    inputs: PolicyLossInputs,
    options: PolicyLossOptions,
    *,
    chunk_budget_bytes: int | None = None,
) -> PolicyLossOutput:
    """`fused_linear_policy_loss` on the per-token record: hidden [N, H], weight [V, H], `inputs` all [N]."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    out = torch.ops.capo.linear_policy_loss(
        hidden,
        weight,
        *inputs.op_args(),
        options.as_list(),
        chunk_tokens(weight.shape[0], hidden.dtype, chunk_budget_bytes or default_chunk_budget(hidden.device)),
        hidden.requires_grad or weight.requires_grad,
    )
    return PolicyLossOutput(out[0], out[1].detach(), out[2].detach(), out[3])


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_budget_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of `labels` under `hidden @ weight.T`, chunked; differentiable.

    Backward takes per-token upstream gradients and recomputes the logits chunk by chunk, so a loss
    written in PyTorch on the [N] log-probs never holds [N, V] logits. Returns ([N] fp32, [N] fp32 or None).
    """
    budget = chunk_budget_bytes or default_chunk_budget(hidden.device)
    logprobs, entropy, _ = torch.ops.capo.linear_logprobs(
        hidden, weight, labels, float(temperature), chunk_tokens(weight.shape[0], hidden.dtype, budget)
    )
    return logprobs, (entropy if with_entropy else None)
