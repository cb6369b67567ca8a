"""Repeated calls of every op keep resident memory flat: nothing of a call outlives it.

A tensor kept as a ctx attribute (instead of `save_for_backward`) forms a reference cycle with the
autograd graph and survives every call until the garbage collector happens to run; 20 calls then
hold 20 gradient buffers. The bound here is one call's working set, far below 20 of anything.
"""

import ctypes

import pytest
import torch

from capo_fast.kernels import fused_linear_logprobs, fused_linear_policy_loss, fused_logprobs, fused_policy_loss

N, H, V = 512, 256, 32_000
CALLS = 20


def rss_bytes() -> int:
    """Resident memory after glibc hands its free heap pages back, so only live memory is counted."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        labels=torch.randint(0, V, (N,), generator=g),
        old_logprobs=torch.randn(N, generator=g) - 10.0,
        advantages=torch.randn(N, generator=g),
        credit=torch.rand(N, generator=g).round(),
        group_penalty=0.5,
    )


def policy_loss(grad, inplace=False):
    def call(logits, hidden, weight, kw):
        x = logits.clone().requires_grad_(grad)
        out = fused_policy_loss(x, **kw, inplace_backward=inplace, eps_high=0.28)
        if grad:
            out.loss.backward()

    return call


def logprobs(grad):
    def call(logits, hidden, weight, kw):
        x = logits.detach().requires_grad_(grad)
        lp, ent = fused_logprobs(x, kw["labels"], with_entropy=True)
        if grad:
            (lp.sum() - ent.sum()).backward()

    return call


def linear_policy_loss(grad):
    def call(logits, hidden, weight, kw):
        h, w = hidden.detach().requires_grad_(grad), weight.detach().requires_grad_(grad)
        out = fused_linear_policy_loss(h, w, **kw, chunk_budget_bytes=16 * 2**20)
        if grad:
            out.loss.backward()

    return call


def linear_logprobs(grad):
    def call(logits, hidden, weight, kw):
        h, w = hidden.detach().requires_grad_(grad), weight.detach().requires_grad_(grad)
        lp, ent = fused_linear_logprobs(h, w, kw["labels"], with_entropy=True, chunk_budget_bytes=16 * 2**20)
        if grad:
            (lp.sum() + ent.sum()).backward()

    return call


CASES = {
    "policy_loss": policy_loss(True),
    "policy_loss_inplace": policy_loss(True, inplace=True),
    "policy_loss_no_grad": policy_loss(False),
    "logprobs": logprobs(True),
    "logprobs_no_grad": logprobs(False),
    "linear_policy_loss": linear_policy_loss(True),
    "linear_policy_loss_no_grad": linear_policy_loss(False),
    "linear_logprobs": linear_logprobs(True),
    "linear_logprobs_no_grad": linear_logprobs(False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_repeated_calls_keep_resident_memory_flat(case):
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) / H**0.5
    logits = hidden @ weight.T
    kw = inputs()
    working_set = logits.nbytes  # one [N, V] buffer: more than any single call keeps
    for _ in range(3):  # warm-up: allocator pools, lazy initialisation
        case(logits, hidden, weight, kw)
    before = rss_bytes()
    for _ in range(CALLS):
        case(logits, hidden, weight, kw)
    growth = rss_bytes() - before
    assert growth < working_set, f"resident memory grew {growth / 2**20:.0f} MiB over {CALLS} calls"
