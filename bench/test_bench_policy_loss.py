"""Throughput of the policy loss: capo (fused) against eager torch, torch.compile and liger.

    pytest bench/test_bench_policy_loss.py --benchmark-only --benchmark-json bench/results/<machine>.json

Sizes follow the device: on CUDA the realistic set (N 2k-16k tokens, V 32,000 and 151,936); on CPU a
set that a 2-core machine finishes in minutes. extra_info carries bytes moved (two reads and one
write of the logits for forward+backward), GB/s, and the peak memory above the inputs.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from capo_fast.kernels import fused_policy_loss, reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = (
    [(2048, 32_000), (8192, 32_000), (16384, 32_000), (2048, 151_936), (8192, 151_936)]
    if CUDA
    else [(2048, 32_000), (512, 151_936)]
)
PROVIDERS = ["capo", "torch", "compile", "liger"]
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
    global _compiled_reference
    needs_grad = mode == "full"

    def capo(logits, labels, old, adv, credit):
        x = logits.requires_grad_(needs_grad)
        out = fused_policy_loss(x, labels, old, adv, credit=credit, penalty=0.5, inplace_backward=True)
        if needs_grad:
            out.loss.backward()
        return out.loss

    def torch_eager(logits, labels, old, adv, credit, fn=reference.policy_loss):
        x = logits.detach().requires_grad_(needs_grad)
        loss = fn(x, labels, old, adv, credit=credit, penalty=0.5)[0]
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
        loss = triton_grpo_loss(
            x,
            old[None, 1:],
            None,
            labels[None, 1:],
            adv[:1],
            beta=0.0,
            temperature=1.0,
            inplace=True,
            loss_type="grpo",
            reduce=True,
        )[0]
        if needs_grad:
            loss.backward()
        return loss

    return {"capo": capo, "torch": torch_eager, "compile": compiled, "liger": liger}[provider]


class PeakMemory:
    """Peak memory above the starting point while the block runs (CUDA allocator, or sampled RSS on CPU)."""

    def __enter__(self):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if CUDA:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.extra_bytes = self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_policy_loss(benchmark, shape, provider, mode):
    if provider == "liger" and not CUDA:
        pytest.skip("liger's Triton GRPO kernel needs CUDA (the interpreter is not a benchmark)")
    n, v = shape
    inputs = make_inputs(n, v)
    fn = loss_fn(provider, mode)

    def run():
        fn(*inputs)
        sync()

    run()  # warm-up: compilation, autotuning, allocator
    with PeakMemory() as mem:
        run()
    benchmark.group = f"policy_loss {mode} N={n} V={v} {str(DTYPE).removeprefix('torch.')} {DEVICE}"
    benchmark.pedantic(run, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
    logits_bytes = n * v * inputs[0].element_size()
    moved = logits_bytes * (3 if mode == "full" else 1)  # full: read twice, write the gradient once
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        logits_bytes=logits_bytes,
        bytes_moved=moved,
        gb_per_s=moved / seconds / 1e9,
        peak_extra_bytes=mem.extra_bytes,
        peak_extra_over_logits=mem.extra_bytes / logits_bytes,
        threads=torch.get_num_threads(),
    )
