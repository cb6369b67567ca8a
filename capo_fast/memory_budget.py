"""Per-GPU memory of a run in its two phases, computed from the run config and the model's shape.

    python -m capo_fast.memory_budget --config configs/gpu-qwen2.5-7b.yaml --world 4
    python -m capo_fast.memory_budget --config X.yaml --world 8 --model-config /models/M/config.json

The policy engine's KV cache, and a local judge's, are sized from the same numbers (`kv_cache_bytes`,
`critic_kv_cache_bytes`): what one rank can ask for in a step, with headroom, instead of a fixed
fraction of the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from capo_fast.config import Config, load_config

GIB = 2**30
KV_HEADROOM = 1.2  # vLLM needs some blocks beyond the exact demand (partial blocks, scheduling slack)


@dataclass(frozen=True)
class Architecture:
    """What the budget needs to know of a decoder-only transformer (an HF config.json has it all)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        attention += (self.hidden + 2 * kv) if self.attention_bias else 0
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + self.hidden

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Architecture:
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab=cfg["vocab_size"],
            tied_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("model_type") == "qwen2" or cfg.get("attention_bias", False),
        )


# Qwen/Qwen2.5-7B's config.json, for the README's budget on a machine without the weights.
QWEN25_7B = Architecture(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
                         tied_embeddings=False, attention_bias=True)  # fmt: skip


def kv_bytes_per_token(arch: Architecture, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token."""
    return arch.layers * 2 * arch.kv_heads * arch.head_dim * dtype_bytes


def rank_token_demand(config: Config, world: int) -> int:
    """Tokens one rank's policy engine holds at most in a step: its prompts x n x (prompt + answer)."""
    d, r = config.data, config.rollout
    per_rank = config.trainer.prompts_per_step // world * r.n * (d.max_prompt_tokens + r.sampling.max_tokens)
    return max(per_rank, r.max_model_len)  # at least one full-length sequence (evaluation included)


def _dtype_bytes(config: Config) -> int:
    return 4 if config.model.dtype == "float32" else 2


def kv_cache_bytes(config: Config, arch: Architecture, world: int, headroom: float = KV_HEADROOM) -> int:
    return int(headroom * rank_token_demand(config, world) * kv_bytes_per_token(arch, _dtype_bytes(config)))


def critic_token_demand(config: Config, world: int) -> int:
    """Tokens one rank's local judge holds at most: per rollout, its prompt (the judge skips prompts past
    max_model_len - max_tokens) once, shared by the N critiques through vLLM's prefix caching, plus N
    critiques."""
    c, r = config.critic, config.rollout
    rollouts = config.trainer.prompts_per_step // world * r.n
    per_rollout = c.max_model_len - c.sampling.max_tokens + c.num_critiques * c.sampling.max_tokens
    return max(rollouts * per_rollout, c.max_model_len)


def critic_kv_cache_bytes(config: Config, arch: Architecture, world: int, headroom: float = KV_HEADROOM) -> int:
    return int(headroom * critic_token_demand(config, world) * kv_bytes_per_token(arch, _dtype_bytes(config)))


def _zero(config: Config) -> tuple[int, bool]:
    from capo_fast.trainer import deepspeed_config, offload_device

    ds = deepspeed_config(config, fused_adam=True)
    return ds["zero_optimization"].get("stage", 0), offload_device(ds) != "none"


def budget(config: Config, arch: Architecture, world: int, gpu_bytes: float = 80e9) -> dict[str, dict[str, float]]:
    """Bytes per GPU of each resident item, in the rollout phase and in the training phase."""
    from capo_fast.kernels.linear_policy_loss import DEFAULT_CHUNK_BUDGET_BYTES

    p = arch.params
    half = _dtype_bytes(config)
    stage, optimizer_offloaded = _zero(config)
    share = lambda partitioned: world if partitioned else 1  # noqa: E731
    weights = p * half / share(stage == 3)
    # the reference is an inference-only ZeRO-3 engine: partitioned over the ranks (layers gathered in forward)
    reference = p * half / world if config.algorithm.kl_coef > 0 else 0.0
    critic = 0.0
    if config.critic.backend == "vllm" and config.needs_judge():
        # the policy's starting weights judge (critic.model empty): sized from demand like the policy;
        # another model's shape is not known here, so its share of the GPU stands for it
        own = p * half + critic_kv_cache_bytes(config, arch, world)
        critic = own if not config.critic.model else config.critic.gpu_memory_utilization * gpu_bytes
    tokens = config.trainer.micro_batch_tokens
    if config.model.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        activations = (
            tokens * arch.hidden * half * arch.layers + tokens * (4 * arch.hidden + 3 * arch.intermediate) * half
        )
    else:
        activations = tokens * (8 * arch.hidden + 3 * arch.intermediate) * half * arch.layers
    rollout = {
        "policy engine: weights": p * half,
        "policy engine: KV cache (sized from demand)": kv_cache_bytes(config, arch, world),
        "trainer: parameters (kept for the weight sync)": weights,
        "reference model (ZeRO-3 partition)": reference,
        "colocated critic (its share, all run long)": critic,
    }
    training = {
        "trainer: parameters": weights,
        "trainer: gradients": p * half / share(stage >= 2),
        "trainer: fp32 master weights + Adam moments": 0.0 if optimizer_offloaded else 12 * p / share(stage >= 1),
        "activations (micro-batch)": activations,
        "fused loss: logits chunk + fp32 grad_weight": DEFAULT_CHUNK_BUDGET_BYTES["cuda"]
        + 4 * arch.vocab * arch.hidden,
        "reference model (ZeRO-3 partition)": reference,
        "colocated critic (its share, all run long)": critic,
    }
    return {"rollout": rollout, "training": training}


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
    parser.add_argument("--model-config", type=Path, help="the model's config.json (default: Qwen2.5-7B's shape)")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    arch = Architecture.from_hf_config(json.loads(args.model_config.read_text())) if args.model_config else QWEN25_7B
    print(f"{arch.params / 1e9:.2f}B parameters, {args.world} ranks, {args.gpu_gb:.0f} GB per GPU")
    print(markdown(budget(config, arch, args.world, args.gpu_gb * 1e9)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
