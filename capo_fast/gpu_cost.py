"""A lower bound on the time of one training step per phase on a named GPU, from the config and the models'
shapes, readable without a GPU.

    python -m capo_fast.gpu_cost                                  # every shipped config, at its launch's ranks
    python -m capo_fast.gpu_cost --config configs/gpu-qwen2.5-7b.yaml --world 4 --markdown

Each phase of a step is counted per GPU as HBM bytes, bf16 FLOPs, NVLink bytes (received) and PCIe bytes
(both directions); its bound is the largest of bytes / bandwidth and FLOPs / peak on that GPU, and a
step's bound is the sum over phases, which run one after another. Assumptions:
- the longest step the config allows: the busiest rank's prompt groups, every prompt at
  data.max_prompt_tokens, every response and critique at its max_tokens, a local judge's prompt at
  critic.max_model_len - max_tokens;
- forward FLOPs are 2 x matmul parameters x tokens (every layer's projections and the LM head) plus
  attention, 4 x layers x heads x head_dim per key a token attends to (itself included); backward is
  twice the forward, gradient checkpointing adds one forward;
- decoding is bandwidth bound: each decode step reads the weights once (per wave of at most vLLM's
  max_num_seqs sequences, or what a judge's KV cache holds) and each sequence's keys and values; prompts
  are prefilled once per prompt (prefix caching shares them among its children), reading the weights
  once per max_num_batched_tokens;
- training reads the weights once per micro-batch and forward unit; Adam on the GPU reads and writes
  fp32 master weights and moments, reads the gradient and writes the bf16 weights (28 B a parameter);
- weight sync: ZeRO-3 gathers the weights over NVLink, the engine reads and writes them in HBM; with
  trainer.offload_states_while_generating the trainer's optimizer state goes to the CPU and back.
Activation traffic, kernel launch gaps, the verifier, CPU Adam under optimizer offload and a remote
judge (on its own server) are not counted: real steps take longer.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

from capo_fast.config import Config, load_config
from capo_fast.deepspeed_settings import zero_setup
from capo_fast.errors import ConfigError
from capo_fast.model_shapes import (
    GPU,
    GPUS,
    Architecture,
    add_model_arguments,
    architectures,
    dtype_bytes,
    judge_memory,
    kv_bytes_per_token,
    rank_prompts,
    vllm_batch_limits,
)

ROOT = Path(__file__).resolve().parents[1]
ADAM_BYTES_PER_PARAM = 28  # fp32 master, m, v read and written (24), bf16 gradient read (2), bf16 weight written (2)


class Work(NamedTuple):
    """What one phase moves and computes on one GPU."""

    hbm_bytes: float = 0.0
    flops: float = 0.0
    nvlink_bytes: float = 0.0
    pcie_bytes: float = 0.0

    def plus(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(self, other, strict=True)))

    def seconds_by_resource(self, gpu: GPU) -> dict[str, float]:
        return {
            "HBM": self.hbm_bytes / gpu.hbm_bytes_per_s,
            "compute": self.flops / gpu.bf16_flops_per_s,
            "NVLink": self.nvlink_bytes / gpu.nvlink_bytes_per_s,
            "PCIe": self.pcie_bytes / gpu.pcie_bytes_per_s,
        }

    def seconds(self, gpu: GPU) -> float:
        return max(self.seconds_by_resource(gpu).values())

    def bound_by(self, gpu: GPU) -> str:
        times = self.seconds_by_resource(gpu)
        return max(times, key=times.__getitem__) if any(times.values()) else "-"


class Phase(NamedTuple):
    name: str
    work: Work
    note: str = ""


def context_sum(start: int, count: int) -> int:
    """Keys attended to by `count` tokens that follow `start` tokens, each attending to itself too."""
    return count * start + count * (count + 1) // 2


def forward_flops(arch: Architecture, tokens: int, keys: int) -> float:
    """A forward over `tokens` tokens that attend to `keys` keys in all: matmuls and attention."""
    return 2 * arch.matmul_params * tokens + 4 * arch.layers * arch.heads * arch.head_dim * keys


def generation(
    arch: Architecture, dtype: int, gpu: GPU, *, prompts: int, prompt_tokens: int, children: int, new_tokens: int,
    tensor_parallel: int = 1, kv_tokens: int | None = None,
) -> Work:  # fmt: skip
    """One GPU's share of an engine generating `children` completions of `new_tokens` tokens for each of its
    rank's `prompts` prompts; the engine's `tensor_parallel` GPUs serve their ranks' requests together, each
    reading its 1/tensor_parallel of the weights. `kv_tokens`: what the KV cache holds (None: all at once)."""
    weights = arch.matmul_params * dtype / tensor_parallel
    batched_tokens, max_seqs = vllm_batch_limits(gpu.memory_bytes)
    sequences = prompts * children
    prefill_passes = math.ceil(prompts * tensor_parallel * prompt_tokens / batched_tokens)
    prefill = Work(
        hbm_bytes=prefill_passes * weights,
        flops=forward_flops(arch, prompts * prompt_tokens, prompts * context_sum(0, prompt_tokens)),
    )
    in_flight = min(sequences * tensor_parallel, max_seqs)
    if kv_tokens is not None:  # whole prompt groups: a prompt's blocks and its children's
        in_flight = min(in_flight, max(kv_tokens // (prompt_tokens + children * new_tokens), 1) * children)
    waves = math.ceil(sequences * tensor_parallel / in_flight)
    keys = sequences * context_sum(prompt_tokens, new_tokens)
    decode = Work(
        hbm_bytes=waves * new_tokens * weights + keys * kv_bytes_per_token(arch, dtype),
        flops=forward_flops(arch, sequences * new_tokens, keys),
    )
    return prefill.plus(decode)


class Batch(NamedTuple):
    """One rank's share of a step, as the trainer sees it: sequences of prompt + response tokens."""

    prompts: int
    sequences: int
    tokens: int
    keys: int  # keys the tokens attend to in all
    micro_batches: int  # in one mini-epoch

    @classmethod
    def of(cls, config: Config, world: int) -> Batch:
        d, r, t = config.data, config.rollout, config.trainer
        prompts = rank_prompts(config, world)  # the busiest rank's: a step waits for it
        sequences = prompts * r.n
        length = d.max_prompt_tokens + r.sampling.max_tokens
        tokens = sequences * length
        micro_batches = t.mini_batches * math.ceil(tokens / t.mini_batches / t.micro_batch_tokens)
        return cls(prompts, sequences, tokens, sequences * context_sum(0, length), micro_batches)


def weight_sync(config: Config, policy: Architecture, world: int) -> Work:
    """The trainer's weights into the engine (gathered first under ZeRO-3), and the optimizer state the
    trainer moves to the CPU while the engines generate and back (deepspeed_settings.states_to_offload)."""
    stage, optimizer_offloaded = zero_setup(config)
    p, weights = policy.params, policy.params * dtype_bytes(config)
    state = 0.0
    if config.trainer.offload_states_while_generating:
        state += 0.0 if optimizer_offloaded else 12 * p / (world if stage >= 1 else 1)  # fp32 master + Adam
        state += 0.0 if (optimizer_offloaded and stage == 3) else 2 * p / (world if stage >= 2 else 1)  # grads
    gathered = (world - 1) / world * weights if stage == 3 else 0.0
    return Work(hbm_bytes=2 * weights, nvlink_bytes=gathered, pcie_bytes=2 * state)


def critique(config: Config, judge: Architecture | None, world: int, gpu: GPU) -> tuple[Work, str]:
    """A local judge's N critiques of each of the rank's rollouts, in as many waves as its KV cache needs."""
    c = config.critic
    if not config.needs_judge():
        return Work(), "no judge"
    if not config.local_judge() or judge is None:
        return Work(), f"{c.backend} judge: not on these GPUs"
    j = judge_memory(config, judge, world, gpu.memory_bytes)
    work = generation(
        judge, dtype_bytes(config), gpu, prompts=Batch.of(config, world).sequences,
        prompt_tokens=c.max_model_len - c.sampling.max_tokens, children=c.num_critiques,
        new_tokens=c.sampling.max_tokens, kv_tokens=j.kv_tokens,
    )  # fmt: skip
    return work, f"local judge, KV cache for {j.kv_tokens / 1000:.0f}k of {j.demand_tokens / 1000:.0f}k tokens"


def training(config: Config, policy: Architecture, world: int) -> tuple[Work, Work]:
    """Old (and reference) log-probs, then the PPO mini-epochs with their optimizer steps."""
    t, a = config.trainer, config.algorithm
    stage, optimizer_offloaded = zero_setup(config)
    b, p, dtype = Batch.of(config, world), policy.params, dtype_bytes(config)
    read = policy.matmul_params * dtype  # what a forward or backward pass reads
    gathered = (world - 1) / world * p * dtype  # what a ZeRO-3 all-gather brings to each GPU
    forward = forward_flops(policy, b.tokens, b.keys)

    models = 1 + (a.kl_coef > 0)  # the reference is a ZeRO-3 engine, gathered like a ZeRO-3 policy
    gathers = (stage == 3) + (a.kl_coef > 0)
    logprobs = Work(
        hbm_bytes=models * b.micro_batches * read,
        flops=models * forward,
        nvlink_bytes=gathers * b.micro_batches * gathered,
    )

    units = 4 if config.model.gradient_checkpointing else 3  # forward, backward (2), recompute
    passes = a.mini_epochs * b.micro_batches
    steps = a.mini_epochs * t.mini_batches
    adam = 0.0 if optimizer_offloaded else steps * ADAM_BYTES_PER_PARAM * p / (world if stage >= 1 else 1)
    reduced = (world - 1) / world * p * dtype * (2 if stage <= 1 else 1)  # all-reduce or reduce-scatter of grads
    update = Work(
        hbm_bytes=passes * units * read + adam,
        flops=a.mini_epochs * units * forward,
        nvlink_bytes=passes * (reduced + (units - 1) * gathered * (stage == 3)),
        pcie_bytes=steps * 2 * dtype * p / world if optimizer_offloaded else 0.0,  # grads out, weights back
    )
    return logprobs, update


def step_phases(
    config: Config, policy: Architecture, world: int, gpu: GPU, judge: Architecture | None = None
) -> list[Phase]:
    """The phases of one step on one GPU of `world` (judge: a local judge's shape; None for a remote one)."""
    r, a = config.rollout, config.algorithm
    rollout = generation(
        policy, dtype_bytes(config), gpu, prompts=Batch.of(config, world).prompts,
        prompt_tokens=config.data.max_prompt_tokens, children=r.n, new_tokens=r.sampling.max_tokens,
        tensor_parallel=r.tensor_parallel_size,
    )  # fmt: skip
    critiques, note = critique(config, judge, world, gpu)
    logprobs, update = training(config, policy, world)
    stage, optimizer_offloaded = zero_setup(config)
    adam = "Adam on the CPU (not counted)" if optimizer_offloaded else ""
    return [
        Phase("weight sync", weight_sync(config, policy, world), "ZeRO-3 gather" if stage == 3 else ""),
        Phase("rollout (prefill + decode)", rollout),
        Phase("critique", critiques, note),
        Phase("old + reference log-probs" if a.kl_coef > 0 else "old log-probs", logprobs),
        Phase(f"update ({a.mini_epochs} mini-epochs)", update, adam),
    ]


def markdown(by_gpu: dict[str, list[Phase]]) -> str:
    """One row per phase: the work on the first GPU named (the others differ only where a judge's KV cache
    holds more at once), and the bound on each GPU."""
    gpus = [GPUS[name] for name in by_gpu]
    first = next(iter(by_gpu.values()))
    head = "| phase | HBM GB | TFLOP | NVLink GB | PCIe GB | " + " | ".join(f"{name} s" for name in by_gpu)
    lines = [head + " | bound by | note |", "| --- |" + " ---: |" * (4 + len(gpus)) + " --- | --- |"]
    for i, ph in enumerate(first):
        w = ph.work
        times = " | ".join(f"{phases[i].work.seconds(g):.2f}" for g, phases in zip(gpus, by_gpu.values(), strict=True))
        lines.append(
            f"| {ph.name} | {w.hbm_bytes / 1e9:.1f} | {w.flops / 1e12:.1f} | {w.nvlink_bytes / 1e9:.1f} | "
            f"{w.pcie_bytes / 1e9:.1f} | {times} | {w.bound_by(gpus[0])} | {ph.note} |"
        )
    totals = " | ".join(f"**{step_seconds(phases, g):.2f}**" for g, phases in zip(gpus, by_gpu.values(), strict=True))
    lines.append(f"| **step** | | | | | {totals} | | |")
    return "\n".join(lines)


def step_seconds(phases: list[Phase], gpu: GPU) -> float:
    return sum(ph.work.seconds(gpu) for ph in phases)


def cost_table(config: Config, policy: Architecture, world: int, judge: Architecture | None = None) -> str:
    """The Markdown table of a config's step on the H100 and the H200, and the phase that bounds it."""
    by_gpu = {name: step_phases(config, policy, world, GPUS[name], judge) for name in ("H100", "H200")}
    lines = [markdown(by_gpu), ""]
    for name, phases in by_gpu.items():
        slowest = bounding_phase(phases, GPUS[name])
        share = slowest.work.seconds(GPUS[name]) / step_seconds(phases, GPUS[name])
        lines.append(
            f"On the {GPUS[name].name} the {slowest.name} phase bounds the step ({share:.0%} of its lower bound, "
            f"{slowest.work.bound_by(GPUS[name])} bound)."
        )
    return "\n".join(lines)


def bounding_phase(phases: list[Phase], gpu: GPU) -> Phase:
    return max(phases, key=lambda ph: ph.work.seconds(gpu))


def launch_world(path: Path) -> int:
    """Ranks of the launch command in a config's header (`deepspeed --num_gpus N [--num_nodes M]`)."""
    import shlex

    line = next((ln for ln in path.read_text().splitlines() if ln.startswith("# deepspeed")), "")
    argv = shlex.split(line[2:])
    count = lambda flag: int(argv[argv.index(flag) + 1]) if flag in argv else 1  # noqa: E731
    return count("--num_gpus") * count("--num_nodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="default: every configs/*.yaml of a known model")
    parser.add_argument("--world", type=int, help="ranks (default: the config header's launch command)")
    add_model_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    paths = [args.config] if args.config else sorted((ROOT / "configs").glob("*.yaml"))
    for path in paths:
        config = load_config(path, overrides)
        world = args.world or launch_world(path)
        try:
            policy, judge = architectures(config, args)
        except ConfigError as err:
            print(f"{path.name}: skipped ({err})\n")
            continue
        print(
            f"### {path.name}: {world} GPUs, one GPU's share of a step\n\n{cost_table(config, policy, world, judge)}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
