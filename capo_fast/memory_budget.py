"""Per-GPU memory of a run in its two phases, computed from the run config and the models' shapes.

    python -m capo_fast.memory_budget --config configs/gpu-qwen2.5-7b.yaml --world 4
    python -m capo_fast.memory_budget --config X.yaml --world 8 --model-config /models/M/config.json --gpu H200

A model's shape comes from its folder's config.json when the path has one, else from `ARCHITECTURES`
(the config.json numbers of the models the shipped configs name), else from --model-config /
--judge-config. The policy engine's KV cache is sized from what one rank asks for in a step
(`kv_cache_bytes`, in capo_fast.model_shapes, as the run sizes it); a colocated judge gets
`critic.gpu_memory_utilization` of the GPU, as vLLM gives it, and its KV cache is what that share leaves
(`judge_memory`). `--header` prints the budget line the shipped configs carry in their header comment
(tests/test_memory_budget.py holds them to it). The time a step takes on a named GPU: python -m capo_fast.gpu_cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capo_fast.config import Config, load_config
from capo_fast.deepspeed_settings import zero_setup
from capo_fast.model_shapes import (
    GIB,
    GPU,
    GPUS,
    Architecture,
    add_model_arguments,
    architectures,
    dtype_bytes,
    engine_activation_bytes,
    judge_architecture,
    judge_memory,
    kv_cache_bytes,
)


def budget(
    config: Config, arch: Architecture, world: int, gpu_bytes: float = GPUS["H100"].memory_bytes,
    judge: Architecture | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Bytes per GPU of each resident item, in the rollout phase and in the training phase."""
    from capo_fast.kernels.linear_policy_loss import DEFAULT_CHUNK_BUDGET_BYTES

    p = arch.params
    half = dtype_bytes(config)
    stage, optimizer_offloaded = zero_setup(config)
    share = lambda partitioned: world if partitioned else 1  # noqa: E731
    weights = p * half / share(stage == 3)
    # the reference is an inference-only ZeRO-3 engine: partitioned over the ranks (layers gathered in forward)
    reference = p * half / world if config.algorithm.kl_coef > 0 else 0.0
    critic = 0.0
    if config.local_judge():  # its whole share, whatever the step asks of it (JudgeMemory)
        critic = judge_memory(config, judge or judge_architecture(config, arch), world, gpu_bytes).share
    tokens = config.trainer.micro_batch_tokens
    if config.model.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        activations = (
            tokens * arch.hidden * half * arch.layers + tokens * (4 * arch.hidden + 3 * arch.intermediate) * half
        )
    else:
        activations = tokens * (8 * arch.hidden + 3 * arch.intermediate) * half * arch.layers
    rollout = {
        "policy engine: weights": p * half / config.rollout.tensor_parallel_size,  # each GPU its slice
        "policy engine: KV cache (sized from demand)": kv_cache_bytes(config, arch, world),
        "policy engine: activations (estimate)": engine_activation_bytes(arch, half, gpu_bytes),
        "trainer: parameters (kept for the weight sync)": weights,
        "reference model (ZeRO-3 partition)": reference,
        "colocated judge: critic.gpu_memory_utilization (all run long)": critic,
    }
    training = {
        "trainer: parameters": weights,
        "trainer: gradients": p * half / share(stage >= 2),
        "trainer: fp32 master weights + Adam moments": 0.0 if optimizer_offloaded else 12 * p / share(stage >= 1),
        "activations (micro-batch)": activations,
        "fused loss: logits chunk + fp32 grad_weight": DEFAULT_CHUNK_BUDGET_BYTES["cuda"]
        + 4 * arch.vocab * arch.hidden,
        "reference model (ZeRO-3 partition)": reference,
        "colocated judge: critic.gpu_memory_utilization (all run long)": critic,
    }
    return {"rollout": rollout, "training": training}


def stated_budget(config: Config, arch: Architecture, world: int, gpu: GPU) -> dict[str, float]:
    """The GiB figures a config's header states, by the name they carry there."""
    phases = budget(config, arch, world, gpu.memory_bytes)
    stated = {phase: sum(items.values()) / GIB for phase, items in phases.items()}
    if config.local_judge():
        j = judge_memory(config, judge_architecture(config, arch), world, gpu.memory_bytes)
        stated.update({"judge": j.share / GIB, "judge weights": j.weights / GIB, "judge KV cache": j.kv_cache / GIB})
    return stated


def header_comment(config_path: Path, config: Config, arch: Architecture, world: int, gpu: GPU) -> str:
    """The budget line(s) of a config's header: every figure as `<name> <GiB> GiB`."""
    s = stated_budget(config, arch, world, gpu)
    lines = [
        f"# Memory per GPU on {world} x {gpu.name} (python -m capo_fast.memory_budget --config {config_path} "
        f"--world {world}): rollout {s['rollout']:.1f} GiB, training {s['training']:.1f} GiB."
    ]
    if "judge" in s:
        j = judge_memory(config, judge_architecture(config, arch), world, gpu.memory_bytes)
        lines.append(
            f"# The colocated judge keeps its share all run long: judge {s['judge']:.1f} GiB = judge weights "
            f"{s['judge weights']:.1f} GiB + activations + judge KV cache {s['judge KV cache']:.1f} GiB "
            f"({j.kv_tokens / 1000:.0f}k tokens of the {j.demand_tokens / 1000:.0f}k a step's critiques ask for "
            f"at once: {j.waves} wave{'s' if j.waves > 1 else ''})."
        )
    return "\n".join(lines)


def markdown(phases: dict[str, dict[str, float]]) -> str:
    lines = ["| phase | item | GiB |", "| --- | --- | ---: |"]
    for phase, items in phases.items():
        for item, value in items.items():
            if value:
                lines.append(f"| {phase} | {item} | {value / GIB:.1f} |")
        lines.append(f"| {phase} | **total** | **{sum(items.values()) / GIB:.1f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--world", type=int, required=True, help="ranks (GPUs) of the launch command")
    add_model_arguments(parser)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100")
    parser.add_argument("--header", action="store_true", help="print the budget line of the config's header")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    arch, judge = architectures(config, args)
    gpu = GPUS[args.gpu]
    if args.header:
        print(header_comment(args.config, config, arch, args.world, gpu))
        return 0
    print(f"{arch.params / 1e9:.2f}B parameters, {args.world} ranks, {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB)")
    print(markdown(budget(config, arch, args.world, gpu.memory_bytes, judge)))
    if judge is not None:
        j = judge_memory(config, judge, args.world, gpu.memory_bytes)
        print(
            f"colocated judge: {j.share / GIB:.1f} GiB = {j.weights / GIB:.1f} weights + {j.activations / GIB:.1f} "
            f"activations + {j.kv_cache / GIB:.1f} KV cache, {j.kv_tokens} tokens of the {j.demand_tokens} a step's "
            f"critiques on one rank ask for at once ({j.waves} wave{'s' if j.waves > 1 else ''})"
        )
        if j.kv_tokens < config.critic.max_model_len:  # vLLM refuses to start an engine that cannot hold one
            print(
                f"critic.gpu_memory_utilization={config.critic.gpu_memory_utilization} leaves the judge no KV cache "
                f"for one sequence of critic.max_model_len={config.critic.max_model_len} tokens: raise it"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
