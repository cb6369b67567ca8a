"""What the memory budget, the step cost model and the loop read of a run's models and GPUs: a model's shape
(its config.json's numbers), GPU datasheets, and what vLLM sizes from them: the policy engine's KV cache
from what one rank asks for in a step (`kv_cache_bytes`, which the loop gives the engine) and a colocated
judge's share of the GPU (`judge_memory`).

A model's shape comes from its folder's config.json when the path has one, else from `ARCHITECTURES` (the
config.json numbers of the models the shipped configs name), else from --model-config / --judge-config
(`architectures`, for the tools' command lines).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from capo_fast.config import Config
from capo_fast.errors import ConfigError

GIB = 2**30
KV_HEADROOM = 1.2  # vLLM needs some blocks beyond the exact demand (partial blocks, scheduling slack)


@dataclass(frozen=True)
class GPU:
    """Datasheet numbers of one GPU; memory as CUDA reports it (torch.cuda.mem_get_info's total)."""

    name: str
    memory_bytes: float
    hbm_bytes_per_s: float
    bf16_flops_per_s: float  # dense tensor-core peak
    nvlink_bytes_per_s: float  # one direction (half the bidirectional figure)
    pcie_bytes_per_s: float  # host link, one direction


GPUS = {
    # memory: the total capacity CUDA reports (79.19 and 139.80 GiB in PyTorch's out-of-memory messages)
    "H100": GPU("H100 SXM 80 GB", 79.19 * GIB, 3.35e12, 989e12, 450e9, 64e9),
    "H200": GPU("H200 141 GB", 139.80 * GIB, 4.8e12, 989e12, 450e9, 64e9),
}


@dataclass(frozen=True)
class Architecture:
    """What the budget needs to know of a decoder-only transformer (an HF config.json has it all).

    head_dim 0 means hidden / heads; models such as Qwen3 and Llama-3.2-1B state their own.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False
    head_dim: int = 0
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's queries and keys

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def attention_matmul(self) -> int:
        """Weights of q, k, v and o projections of one layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * self.hidden * kv

    @property
    def matmul_params(self) -> int:
        """Weights a token is multiplied by: every layer's projections and the LM head (the input
        embedding is a lookup). Forward FLOPs are 2 x this per token, before attention."""
        return self.layers * (self.attention_matmul + 3 * self.hidden * self.intermediate) + self.vocab * self.hidden

    @property
    def params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = self.attention_matmul + 3 * self.hidden * self.intermediate + 2 * self.hidden
        layer += (q + 2 * kv) if self.attention_bias else 0
        layer += 2 * self.head_dim if self.qk_norm else 0
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + self.hidden

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Architecture:
        model_type = cfg.get("model_type", "")
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab=cfg["vocab_size"],
            tied_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            head_dim=cfg.get("head_dim") or 0,  # null in some configs: hidden / heads then
            qk_norm=model_type.startswith("qwen3"),
        )


# The config.json numbers of the models the shipped configs name, for machines without the weights.
QWEN25_7B = Architecture(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
                         tied_embeddings=False, attention_bias=True)  # fmt: skip
ARCHITECTURES = {
    "Qwen2.5-1.5B": Architecture(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936,
                                 tied_embeddings=True, attention_bias=True),
    "Qwen2.5-7B": QWEN25_7B,
    "Llama-3.2-1B": Architecture(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256,
                                 tied_embeddings=True, head_dim=64),
    "Llama-3.2-3B": Architecture(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=128256,
                                 tied_embeddings=True, head_dim=128),
}  # fmt: skip


def architecture_of(model: str, key: str = "model.path") -> Architecture:
    """A model's shape: its folder's config.json, else the known model whose name its folder name starts
    with (`/models/Qwen2.5-7B-SFT-NuminaMath` is a Qwen2.5-7B)."""
    path = Path(model)
    if (path / "config.json").exists():
        return Architecture.from_hf_config(json.loads((path / "config.json").read_text()))
    name = path.name.lower()
    known = [k for k in ARCHITECTURES if name.startswith(k.lower())]
    if not known:
        raise ConfigError(
            f"{key}: {model!r} has no config.json and is none of {sorted(ARCHITECTURES)}: pass its config.json "
            "(--model-config / --judge-config)"
        )
    return ARCHITECTURES[max(known, key=len)]


def vllm_batch_limits(gpu_bytes: float) -> tuple[int, int]:
    """vLLM's defaults for an `LLM` object: tokens per forward (max_num_batched_tokens) and sequences in
    flight (max_num_seqs); 16384 and 1024 on GPUs of 70 GiB and more (A100 aside), else 8192 and 256
    (vllm/engine/arg_utils.py:2922-2951)."""
    return (16384, 1024) if gpu_bytes >= 70 * GIB else (8192, 256)


def kv_bytes_per_token(arch: Architecture, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token."""
    return arch.layers * 2 * arch.kv_heads * arch.head_dim * dtype_bytes


def rank_prompts(config: Config, world: int) -> int:
    """Prompt groups the busiest rank holds in a step: train.my_share gives some ranks one more when the
    prompts do not split evenly (12 on 8 ranks: 1 or 2)."""
    return -(-config.trainer.prompts_per_step // world)


def rank_token_demand(config: Config, world: int) -> int:
    """Tokens one rank's policy engine holds at most in a step: its prompts x n x (prompt + answer)."""
    d, r = config.data, config.rollout
    per_rank = rank_prompts(config, world) * r.n * (d.max_prompt_tokens + r.sampling.max_tokens)
    return max(per_rank, r.max_model_len)  # at least one full-length sequence (evaluation included)


def dtype_bytes(config: Config) -> int:
    return 4 if config.model.dtype == "float32" else 2


def kv_cache_bytes(config: Config, arch: Architecture, world: int, headroom: float = KV_HEADROOM) -> int:
    """The policy engine's kv_cache_memory_bytes: vLLM allocates that many bytes in whole blocks, with no cap
    from its share (vllm/v1/core/kv_cache_utils.py:1627-1629)."""
    return int(headroom * rank_token_demand(config, world) * kv_bytes_per_token(arch, dtype_bytes(config)))


def critic_token_demand(config: Config, world: int) -> int:
    """Tokens one rank's local judge would hold to run a step's critiques at once: per rollout, its prompt
    (the judge skips prompts past max_model_len - max_tokens) once, shared by the N critiques through
    vLLM's prefix caching, plus N critiques."""
    c, r = config.critic, config.rollout
    rollouts = rank_prompts(config, world) * r.n
    per_rollout = c.max_model_len - c.sampling.max_tokens + c.num_critiques * c.sampling.max_tokens
    return max(rollouts * per_rollout, c.max_model_len)


def engine_activation_bytes(arch: Architecture, dtype: int, gpu_bytes: float) -> int:
    """An estimate of what a vLLM engine holds beside weights and KV cache: the peak of its start-up
    profile, a forward of max_num_batched_tokens tokens (widest at the MLP: gate and up projections and
    their product) and the sampler's fp32 logits and probabilities for max_num_seqs sequences
    (vllm/v1/worker/gpu_worker.py:687-744 measures it and takes it out of the engine's share). CUDA graphs
    (a few hundred MiB) are not counted."""
    tokens, seqs = vllm_batch_limits(gpu_bytes)
    return tokens * 3 * arch.intermediate * dtype + seqs * arch.vocab * 4 * 2


class JudgeMemory(NamedTuple):
    """A colocated judge on one GPU: vLLM requests gpu_memory_utilization x the GPU's memory
    (vllm/v1/worker/utils.py:724-726) and gives the KV cache what weights and activations leave of it
    (vllm/v1/worker/gpu_worker.py:740-744)."""

    share: float
    weights: float
    activations: float
    kv_cache: float
    kv_tokens: int  # tokens the KV cache holds
    demand_tokens: int  # tokens a step's critiques on one rank would hold at once
    rollouts: int  # a rank's rollouts to judge in a step
    rollout_tokens: int  # one rollout's judge prompt and its N critiques

    @property
    def waves(self) -> int:
        """Rounds a rank's critiques take at least: whole rollouts (a prompt and its critiques) at a time."""
        return math.ceil(self.rollouts / max(self.kv_tokens // self.rollout_tokens, 1))


def judge_memory(config: Config, judge: Architecture, world: int, gpu_bytes: float) -> JudgeMemory:
    c, dtype = config.critic, dtype_bytes(config)
    share = c.gpu_memory_utilization * gpu_bytes
    weights = judge.params * dtype
    activations = engine_activation_bytes(judge, dtype, gpu_bytes)
    kv = max(share - weights - activations, 0.0)
    return JudgeMemory(
        share, weights, activations, kv, int(kv // kv_bytes_per_token(judge, dtype)),
        critic_token_demand(config, world), rollouts=rank_prompts(config, world) * config.rollout.n,
        rollout_tokens=c.max_model_len - c.sampling.max_tokens + c.num_critiques * c.sampling.max_tokens,
    )  # fmt: skip


def judge_architecture(config: Config, policy: Architecture) -> Architecture:
    """A local judge's shape: critic.model's, or the policy's when the judge is the policy's start."""
    return architecture_of(config.critic.model, "critic.model") if config.critic.model else policy


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", type=Path, help="the policy's config.json (default: from model.path)")
    parser.add_argument("--judge-config", type=Path, help="a local judge's config.json (default: from critic.model)")


def architectures(config: Config, args: argparse.Namespace) -> tuple[Architecture, Architecture | None]:
    """The policy's shape and a local judge's (None without one), from the command line or the config."""
    read = lambda path: Architecture.from_hf_config(json.loads(path.read_text()))  # noqa: E731
    policy = read(args.model_config) if args.model_config else architecture_of(config.model.path)
    if not config.local_judge():
        return policy, None
    return policy, read(args.judge_config) if args.judge_config else judge_architecture(config, policy)
