"""The policy loss from hidden states and the lm_head weight: capo against torch, torch.compile, Liger.

    make bench ARGS="bench/test_bench_linear_policy_loss.py --benchmark-json bench/results/<machine>-linear.json"

Forward+backward with gradients for both hidden states and weight. Time comes from pytest-benchmark;
peak memory above the inputs is measured for each provider in a process of its own (this file run
with --peak), so no provider's caches or allocator pools count against another.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from measure import CUDA, DEVICE, peak_in_own_process, rss_bytes, sync

from capo_fast.kernels import fused_linear_policy_loss, reference

DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(8192, 3584, 151_936), (16384, 2048, 151_936)] if CUDA else [(2048, 576, 49_152)]
PROVIDERS = ["capo", "torch", "compile", "liger"]
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_inputs(n, h, v):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, h, device=DEVICE, generator=g).to(DTYPE)
    weight = (torch.randn(v, h, device=DEVICE, generator=g) / h**0.5).to(DTYPE)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    old = torch.randn(n, device=DEVICE, generator=g) * 0.1 - 10.0
    adv = torch.randn(n, device=DEVICE, generator=g)
    return hidden, weight, labels, old, adv


def make_call(provider):
    """A callable(hidden, weight, labels, old, adv) running forward and backward once."""

    def capo(hidden, weight, labels, old, adv):
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        fused_linear_policy_loss(h, w, labels, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH).loss.backward()

    def torch_eager(hidden, weight, labels, old, adv, fn=reference.linear_policy_loss):
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        fn(h, w, labels, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH)[0].backward()

    compiled_fn = []

    def compiled(*args):
        if not compiled_fn:
            compiled_fn.append(torch.compile(reference.linear_policy_loss, dynamic=False))
        torch_eager(*args, fn=compiled_fn[0])

    liger_loss = []

    def liger(hidden, weight, labels, old, adv):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        if not liger_loss:  # one sequence of n tokens: the same token-mean loss, no KL
            liger_loss.append(LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                                       epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH))  # fmt: skip
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        n = hidden.shape[0]
        loss = liger_loss[0](h[None], w, labels[None], torch.ones(1, n, device=DEVICE), adv[:1],
                             old_per_token_logps=old[None])[0]  # fmt: skip
        loss.backward()

    return {"capo": capo, "torch": torch_eager, "compile": compiled, "liger": liger}[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES])
def test_linear_policy_loss(benchmark, shape, provider):
    n, h, v = shape
    inputs = make_inputs(n, h, v)
    call = make_call(provider)

    def run():
        call(*inputs)
        sync()

    run()  # warm-up: compilation, allocator
    benchmark.group = f"linear_policy_loss full N={n} H={h} V={v} {str(DTYPE).removeprefix('torch.')} {DEVICE}"
    benchmark.pedantic(run, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=0)
    peak = peak_in_own_process(__file__, provider, str(n), str(h), str(v))
    logits_bytes = n * v * torch.empty((), dtype=DTYPE).element_size()
    flops = 3 * 2 * n * h * v  # logits, grad_hidden, grad_weight matmuls
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        logits_bytes=logits_bytes,
        tflop_per_s=flops / benchmark.stats.stats.median / 1e12,
        peak_extra_bytes=peak,
        peak_extra_over_logits=peak / logits_bytes,
        threads=torch.get_num_threads(),
    )


def _peak_main(argv):
    """--peak PROVIDER N H V: one warm-up call, then the peak memory of one more call above the inputs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", required=True)
    parser.add_argument("shape", nargs=3, type=int)
    args = parser.parse_args(argv)
    inputs = make_inputs(*args.shape)
    call = make_call(args.peak)
    call(*inputs)
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call(*inputs)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the kernel's peak-RSS counter
            f.write("5")
        base = rss_bytes()
        call(*inputs)
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        peak = hwm - base
    print(json.dumps({"provider": args.peak, "peak_extra_bytes": peak}))


if __name__ == "__main__":
    _peak_main(sys.argv[1:])
