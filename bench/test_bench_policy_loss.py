"""Throughput of the policy loss over [N, V] logits: capo (fused) against eager torch, torch.compile, liger.

    make bench ARGS="bench/test_bench_policy_loss.py --benchmark-json bench/results/<machine>.json"

`capo` is the default path (gradient in a new buffer), `capo_inplace` writes it over the logits.
`floor` computes no loss: it reads the logits and, for forward+backward, copies them once more (two
reads and one write, the traffic of the fused op), so its time is this machine's bandwidth bound. Sizes follow the
device: on CUDA the realistic set in bf16, on CPU fp32 sizes a 2-core machine finishes in minutes.
"""

from __future__ import annotations

import pytest
import torch
from measure import CUDA, DEVICE, PeakMemory, sync

from capo_fast.kernels import fused_policy_loss, reference

DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = (
    [(2048, 32_000), (8192, 32_000), (16384, 32_000), (2048, 151_936), (8192, 151_936)]
    if CUDA
    else [(4096, 32_000), (1024, 151_936)]
)
PROVIDERS = ["capo", "capo_inplace", "torch", "compile", "liger", "floor"]
MODES = ["fwd", "full"]


def make_inputs(n, v):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(n, v, device=DEVICE, dtype=DTYPE, generator=g)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    old = torch.randn(n, device=DEVICE, generator=g) * 0.1 - 10.0
    adv = torch.randn(n, device=DEVICE, generator=g)
    credit = (torch.rand(n, device=DEVICE, generator=g) > 0.7).float()
    return logits, labels, old, adv, credit


_compiled_reference = None


def loss_fn(provider, mode):
    """A callable(logits, labels, old, adv, credit) running one forward (and backward for `full`)."""
    needs_grad = mode == "full"

    def capo(logits, labels, old, adv, credit, inplace=False):
        x = logits.requires_grad_(needs_grad)
        out = fused_policy_loss(x, labels, old, adv, credit=credit, group_penalty=0.5, inplace_backward=inplace)
        if needs_grad:
            out.loss.backward()
            x.grad = None
        return out.loss

    def torch_eager(logits, labels, old, adv, credit, fn=reference.policy_loss):
        x = logits.detach().requires_grad_(needs_grad)
        loss = fn(x, labels, old, adv, credit=credit, group_penalty=0.5)[0]
        if needs_grad:
            loss.backward()
        return loss

    def compiled(*args):
        global _compiled_reference
        if _compiled_reference is None:
            _compiled_reference = torch.compile(reference.policy_loss, dynamic=False)
        return torch_eager(*args, fn=_compiled_reference)

    def liger(logits, labels, old, adv, credit):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        # One sequence of n - 1 tokens: liger reads L + 1 logit rows and takes per-sequence advantages.
        n = logits.shape[0]
        x = logits.view(1, n, -1).requires_grad_(needs_grad)
        loss = triton_grpo_loss(x, old[None, 1:], None, labels[None, 1:], adv[:1], beta=0.0, temperature=1.0,
                                inplace=True, loss_type="grpo", reduce=True)[0]  # fmt: skip
        if needs_grad:
            loss.backward()
        return loss

    return {
        "capo": capo,
        "capo_inplace": lambda *a: capo(*a, inplace=True),
        "torch": torch_eager,
        "compile": compiled,
        "liger": liger,
    }[provider]


def floor_fn(mode, logits):
    """One read (fwd) or two reads and one write (full) of the logits, nothing else."""
    out = torch.empty_like(logits)

    def move(logits, *unused):
        logits.sum()
        if mode == "full":
            out.copy_(logits)

    return move


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_policy_loss(benchmark, shape, provider, mode):
    if provider == "liger" and not CUDA:
        pytest.skip("liger's Triton GRPO kernel needs CUDA (the interpreter is not a benchmark)")
    n, v = shape
    benchmark.group = f"policy_loss {mode} N={n} V={v} {str(DTYPE).removeprefix('torch.')} {DEVICE}"
    logits_bytes = n * v * torch.empty((), dtype=DTYPE).element_size()
    accesses = 3 if mode == "full" else 1  # full: read twice, write the gradient once
    inputs = make_inputs(n, v)
    fn = floor_fn(mode, inputs[0]) if provider == "floor" else loss_fn(provider, mode)

    def run():
        fn(*inputs)
        sync()

    run()  # warm-up: compilation, autotuning, allocator
    with PeakMemory() as mem:
        run()
    benchmark.pedantic(run, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        logits_bytes=logits_bytes,
        bytes_moved=accesses * logits_bytes,
        gb_per_s=accesses * logits_bytes / seconds / 1e9,
        peak_extra_bytes=mem.extra_bytes,
        peak_extra_over_logits=mem.extra_bytes / logits_bytes,
        threads=torch.get_num_threads(),
    )
