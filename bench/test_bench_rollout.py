"""Generation throughput and weight-sync time of the vLLM rollout engine.

    pytest bench/test_bench_rollout.py --benchmark-only --benchmark-json bench/results/rollout-<machine>.json

Models: the tiny Qwen2 and SmolLM2-135M-Instruct (both offline). Generation runs 16 prompts x 4
samples with a fixed length (ignore_eos), so tokens/s compares across runs; a sync reloads every
weight from a transformers model into the engine in place.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from capo_fast.config import SamplingConfig  # noqa: E402
from capo_fast.engines import VLLMEngine  # noqa: E402
from capo_fast.local_models import build_tiny_model, default_cache_dir, smollm2_instruct  # noqa: E402
from capo_fast.weights import model_weights  # noqa: E402

MODELS = {
    "tiny": lambda: build_tiny_model(default_cache_dir() / "tiny-qwen2"),
    "smollm2-135m": smollm2_instruct,
}
PROMPTS, SAMPLES, NEW_TOKENS = 16, 4, 64
_engines: dict[str, VLLMEngine] = {}  # one per model for the whole session (see tests/test_engines.py)


def engine_for(name: str) -> VLLMEngine:
    if name not in _engines:
        _engines[name] = VLLMEngine(MODELS[name](), seed=0, max_model_len=512)
    return _engines[name]


@pytest.mark.parametrize("model", list(MODELS))
def test_generation(benchmark, model):
    from vllm import SamplingParams

    engine = engine_for(model)
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(PROMPTS)]
    params = SamplingParams(n=SAMPLES, temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=0)
    engine.generate([[5, 6]], SamplingConfig(max_tokens=4), n=1, seeds=[0])  # warm-up
    benchmark.group = "generation"
    outputs = benchmark.pedantic(lambda: engine.llm.generate(prompts, params, use_tqdm=False), rounds=3)
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    assert tokens == PROMPTS * SAMPLES * NEW_TOKENS
    benchmark.extra_info.update(
        {"model": model, "tokens": tokens, "tokens_per_s": tokens / benchmark.stats.stats.median}
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_weight_sync(benchmark, model):
    from transformers import AutoModelForCausalLM

    engine = engine_for(model)
    hf = AutoModelForCausalLM.from_pretrained(MODELS[model](), dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    benchmark.group = "weight-sync"
    benchmark.pedantic(lambda: engine.load_weights(model_weights(hf)), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"model": model, "bytes": size, "gb_per_s": size / benchmark.stats.stats.median / 1e9})
