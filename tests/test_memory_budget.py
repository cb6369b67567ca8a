"""Per-GPU memory from the config, and the policy engine's KV cache sized from the rank's demand."""

from pathlib import Path

import pytest
import torch

from capo_fast.config import load_config
from capo_fast.memory_budget import QWEN25_7B, budget, kv_bytes_per_token, kv_cache_bytes, rank_token_demand

ROOT = Path(__file__).resolve().parents[1]


def test_qwen25_7b_shape():
    assert QWEN25_7B.params == pytest.approx(7.62e9, rel=2e-3)  # the model card's 7.61B
    assert kv_bytes_per_token(QWEN25_7B, 2) == 28 * 2 * 4 * 128 * 2  # 57,344 B a token in bf16


def test_7b_config_fits_an_80gb_gpu_in_both_phases(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    assert rank_token_demand(config, 4) == 3 * 16 * (1024 + 3072)
    assert kv_cache_bytes(config, QWEN25_7B, 4) == int(1.2 * 3 * 16 * 4096 * 57_344)
    for phase, items in budget(config, QWEN25_7B, 4).items():
        assert sum(items.values()) < 0.9 * 80e9, phase


@pytest.fixture
def engine_kwargs(monkeypatch):
    """What an engine passes to vllm.LLM, recorded instead of starting one."""
    import vllm

    seen = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    return seen


def test_engine_receives_the_sized_kv_cache_on_cuda(engine_kwargs, monkeypatch):
    from capo_fast.rollout import VLLMEngine

    seen = engine_kwargs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    VLLMEngine("model", kv_cache_memory_bytes=123 << 20, sleep_mode=False)
    assert seen["kv_cache_memory_bytes"] == 123 << 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    VLLMEngine("model", kv_cache_memory_bytes=123 << 20, sleep_mode=False)
    assert seen["kv_cache_memory_bytes"] is None  # the CPU build sizes it by VLLM_CPU_KVCACHE_SPACE


def test_a_local_judges_kv_cache_is_sized_from_its_demand(monkeypatch):
    from capo_fast.memory_budget import critic_kv_cache_bytes, critic_token_demand

    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "cpu-smoke.yaml")
    c, per_rank = config.critic, config.trainer.prompts_per_step // 2 * config.rollout.n
    # each rollout: one prompt of at most max_model_len - max_tokens, shared by the N critiques
    per_rollout = c.max_model_len - c.sampling.max_tokens + c.num_critiques * c.sampling.max_tokens
    assert critic_token_demand(config, 2) == max(per_rank * per_rollout, c.max_model_len)
    assert critic_kv_cache_bytes(config, QWEN25_7B, 2) == int(
        1.2
        * critic_token_demand(config, 2)
        * kv_bytes_per_token(QWEN25_7B, 4 if config.model.dtype == "float32" else 2)
    )
    judged = budget(config, QWEN25_7B, 2)["rollout"]["colocated critic (its share, all run long)"]
    assert judged == QWEN25_7B.params * (4 if config.model.dtype == "float32" else 2) + critic_kv_cache_bytes(
        config, QWEN25_7B, 2
    )


def test_a_local_judge_engine_receives_its_sized_kv_cache_on_cuda(engine_kwargs, monkeypatch):
    from capo_fast.config import CriticConfig
    from capo_fast.rollout import LocalCritic

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    LocalCritic(CriticConfig(), "judge", dtype="bfloat16", seed=0, sleep_mode=False, kv_cache_memory_bytes=77 << 20)
    assert engine_kwargs["kv_cache_memory_bytes"] == 77 << 20 and engine_kwargs["gpu_memory_utilization"] == 0.35


def test_a_training_judge_is_sized_for_one_step_and_an_evaluated_one_gets_its_share(
    engine_kwargs, monkeypatch, tiny_model_dir
):
    """In training, a local judge's KV cache holds what one step asks of this rank. The judge evaluation
    runs it alone with a whole batch: sized for that, a 7B judge would ask for more than the GPU, so vLLM
    takes critic.gpu_memory_utilization of the GPU instead (vllm/v1/worker/gpu_worker.py:649-675 and
    :740-744)."""
    import json

    from capo_fast.memory_budget import Architecture, critic_kv_cache_bytes
    from capo_fast.rollout import build_critic

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = load_config(None, ["--critic.gpu_memory_utilization=0.8"])
    arch = Architecture.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()))
    build_critic(config, tiny_model_dir, world=2)
    assert engine_kwargs["kv_cache_memory_bytes"] == critic_kv_cache_bytes(config, arch, 2)
    build_critic(config, tiny_model_dir)
    assert engine_kwargs["kv_cache_memory_bytes"] is None and engine_kwargs["gpu_memory_utilization"] == 0.8
