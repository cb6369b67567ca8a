"""Per-GPU memory from the config: the policy engine's KV cache sized from the rank's demand, a colocated
judge held to its share, model shapes as their config.json states them, and every config's header."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from capo_fast.config import ConfigError, load_config
from capo_fast.memory_budget import budget, markdown, stated_budget
from capo_fast.model_shapes import (
    ARCHITECTURES,
    GIB,
    GPUS,
    QWEN25_7B,
    Architecture,
    architecture_of,
    judge_memory,
    kv_bytes_per_token,
    kv_cache_bytes,
    rank_token_demand,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# The models' config.json figures as their model cards count parameters (safetensors totals).
MODEL_CARD_PARAMS = {
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
}
QWEN3_4B = {  # Qwen/Qwen3-4B's config.json: head_dim 128 where hidden / heads is 80
    "model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 2560, "intermediate_size": 9728,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "tie_word_embeddings": True, "attention_bias": False,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODEL_CARD_PARAMS))
def test_known_shapes_count_their_model_cards_parameters(name):
    assert ARCHITECTURES[name].params == MODEL_CARD_PARAMS[name]


def test_qwen25_7b_kv_bytes():
    assert kv_bytes_per_token(QWEN25_7B, 2) == 28 * 2 * 4 * 128 * 2  # 57,344 B a token in bf16


def test_an_explicit_head_dim_sizes_the_kv_cache():
    qwen3 = Architecture.from_hf_config(QWEN3_4B)
    assert qwen3.head_dim == 128
    assert kv_bytes_per_token(qwen3, 2) == 36 * 2 * 8 * 128 * 2  # 147,456 B, not 36*2*8*80*2 = 92,160
    assert qwen3.params == 4_022_468_096  # Qwen3-4B's safetensors total (q/k norms, no biases)
    assert Architecture.from_hf_config({**QWEN3_4B, "head_dim": None}).head_dim == 80  # null: hidden / heads


def test_a_model_shape_comes_from_its_folder_or_its_name(tiny_model_dir, tmp_path):
    assert architecture_of("/models/Qwen2.5-7B-SFT-NuminaMath") == QWEN25_7B
    assert architecture_of("/models/Llama-3.2-1B-Instruct") == ARCHITECTURES["Llama-3.2-1B"]
    tiny = architecture_of(str(tiny_model_dir))
    assert (tiny.layers, tiny.hidden) == (2, 64)  # the folder's config.json wins
    with pytest.raises(ConfigError, match=r"critic\.model: '/models/Mystery-9B' has no config\.json"):
        architecture_of("/models/Mystery-9B", "critic.model")


def test_7b_config_fits_an_80gb_gpu_in_both_phases(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    assert rank_token_demand(config, 4) == 3 * 16 * (1024 + 3072)
    assert rank_token_demand(config, 8) == 2 * 16 * (1024 + 3072)  # 12 prompts on 8 ranks: 1 or 2 each
    assert kv_cache_bytes(config, QWEN25_7B, 4) == int(1.2 * 3 * 16 * 4096 * 57_344)
    for phase, items in budget(config, QWEN25_7B, 4).items():
        assert sum(items.values()) < 0.9 * 79.19 * GIB, phase


def test_tensor_parallel_gpus_hold_a_slice_of_the_policy_and_a_rank_of_kv(monkeypatch):
    """kv_cache_memory_bytes is per GPU (vllm/config/cache.py:257): a group of 2 serves both ranks' requests,
    so each GPU holds one rank's demand of keys and values, and half the weights."""
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml", ["--rollout.tensor_parallel_size=2"])
    rollout = budget(config, QWEN25_7B, 4)["rollout"]
    assert rollout["policy engine: weights"] == 7_615_616_512 * 2 / 2
    assert rollout["policy engine: KV cache (sized from demand)"] == int(1.2 * 3 * 16 * 4096 * 57_344)


def test_a_colocated_judge_is_counted_at_its_share(monkeypatch):
    """vLLM gives a judge without kv_cache_memory_bytes ceil(total x gpu_memory_utilization) bytes
    (vllm/v1/worker/utils.py:724-726) and its KV cache what weights and profiled activations leave
    (vllm/v1/worker/gpu_worker.py:740-744). Hand arithmetic for the node config's Qwen2.5-7B judge, 8 ranks."""
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "node-qwen2.5-1.5b-colocated.yaml")
    total = 79.19 * GIB
    j = judge_memory(config, QWEN25_7B, 8, total)
    assert j.share == pytest.approx(0.3 * total)
    assert j.weights == 7_615_616_512 * 2
    # start-up profile: 16384 tokens x 3 x 18944 (MLP) x 2 B + 1024 sequences x 152064 x 4 B x 2 (logits, probs)
    assert j.activations == 16384 * 3 * 18944 * 2 + 1024 * 152064 * 8
    assert j.kv_cache == pytest.approx(0.3 * total - 15_231_233_024 - 1_862_270_976 - 1_245_708_288)
    assert j.kv_tokens == int(j.kv_cache // 57_344)
    # 16 prompts / 8 ranks x 16 rollouts, each (8192 - 2048) prompt tokens + 4 critiques x 2048
    assert j.demand_tokens == 32 * (6144 + 4 * 2048) == 458_752
    assert j.kv_tokens // 14336 == 8 and j.waves == 32 // 8  # 8 whole rollouts (prompt + critiques) at a time
    policy = ARCHITECTURES["Qwen2.5-1.5B"]
    for items in budget(config, policy, 8, total, QWEN25_7B).values():
        assert items["colocated judge: critic.gpu_memory_utilization (all run long)"] == j.share


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
    from capo_fast.engines import VLLMEngine

    seen = engine_kwargs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    VLLMEngine("model", kv_cache_memory_bytes=123 << 20, sleep_mode=False)
    assert seen["kv_cache_memory_bytes"] == 123 << 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    VLLMEngine("model", kv_cache_memory_bytes=123 << 20, sleep_mode=False)
    assert seen["kv_cache_memory_bytes"] is None  # the CPU build sizes it by VLLM_CPU_KVCACHE_SPACE


def test_a_local_judge_gets_its_share_in_training_and_in_evaluation(engine_kwargs, monkeypatch, tiny_model_dir):
    """No kv_cache_memory_bytes: with one vLLM skips its memory profile and ignores gpu_memory_utilization
    (vllm/config/cache.py:257-264, vllm/v1/worker/gpu_worker.py:649-675)."""
    from capo_fast.critics import build_critic

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = load_config(None, ["--critic.backend=vllm", "--critic.gpu_memory_utilization=0.8"])
    build_critic(config.critic, tiny_model_dir, voting="majority", dtype="float32", seed=0)
    assert engine_kwargs["kv_cache_memory_bytes"] is None and engine_kwargs["gpu_memory_utilization"] == 0.8


def launch(path: Path) -> tuple[int, list[str]]:
    """Ranks the header's launch command starts, and the overrides it passes."""
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("# deepspeed"))
    argv = shlex.split(line[2:])
    gpus = int(argv[argv.index("--num_gpus") + 1]) if "--num_gpus" in argv else 1
    nodes = int(argv[argv.index("--num_nodes") + 1]) if "--num_nodes" in argv else 1
    return gpus * nodes, [a for a in argv if a.startswith("--") and "=" in a]


def stated(path: Path) -> tuple[str, int, dict[str, float]]:
    """The GPU, ranks and `<name> <x> GiB` figures of a config's budget comment (its header lines)."""
    header = "\n".join(ln[1:] for ln in path.read_text().splitlines() if ln.startswith("#"))
    match = re.search(r"Memory per GPU on (\d+) x (\w+)", header)
    if not match:
        return "", 0, {}
    figures = {name.strip(): float(x) for name, x in re.findall(r"([A-Za-z][A-Za-z ]*?) (\d+\.\d) GiB", header)}
    return match[2], int(match[1]), figures


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_states_its_computed_budget(path, monkeypatch):
    """Every GPU config states its budget per GPU at its launch command's world size, and every figure it
    states is the computed one (to its 0.1 GiB rounding)."""
    monkeypatch.chdir(ROOT)
    world, overrides = launch(path)
    config = load_config(path, overrides)
    if path.name.startswith("cpu-"):  # the offline models of the CPU runs: no GPU budget to state
        assert not stated(path)[2], path.name
        return
    arch = architecture_of(config.model.path)
    gpu, ranks, figures = stated(path)
    assert gpu in GPUS and ranks == world, f"{path.name}: no budget line for {world} GPUs in its header"
    computed = stated_budget(config, arch, world, GPUS[gpu])
    assert set(figures) == set(computed), path.name
    for name, value in figures.items():
        assert value == pytest.approx(computed[name], abs=0.051), f"{path.name}: {name}"


def test_the_readme_table_is_the_computed_one(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- memory-budget -->\n(.*?)\n<!-- /memory-budget -->", readme, re.S)[1]
    assert table == markdown(budget(config, QWEN25_7B, 4))
