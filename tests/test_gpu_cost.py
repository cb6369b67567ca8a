"""The step cost model against arithmetic done by hand for one small shape, and the bounds it prints."""

from pathlib import Path

import pytest

from capo_fast.config import load_config
from capo_fast.gpu_cost import GPUS, Batch, Work, generation, launch_world, main, step_phases
from capo_fast.model_shapes import QWEN25_7B, Architecture

ROOT = Path(__file__).resolve().parents[1]

# 2 layers, hidden 8, MLP 16, 2 query heads and 1 KV head of 4, vocabulary 32, tied embeddings.
# Weights a token multiplies: per layer q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192 and MLP 3x8x16 = 384; LM head 32x8:
# 2 x (192 + 384) + 256 = 1408, i.e. 2816 bytes in bf16. All parameters: + 2 norms of 8 per layer, the
# final norm (8), tied embedding counted once: 2 x 592 + 256 + 8 = 1448, 2896 bytes.
# KV bytes a token: 2 layers x (K, V) x 1 head x 4 x 2 B = 32. Attention FLOPs per key: 4 x 2 x 2 x 4 = 64.
TINY = Architecture(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32, tied_embeddings=True)
OVERRIDES = [
    "--model.dtype=bfloat16", "--model.gradient_checkpointing=true", "--data.max_prompt_tokens=3", "--rollout.n=2",
    "--rollout.sampling.max_tokens=2", "--rollout.max_model_len=8", "--critic.num_critiques=2",
    "--critic.max_model_len=10", "--critic.sampling.max_tokens=3", "--trainer.prompts_per_step=4",
    "--trainer.micro_batch_tokens=64", "--trainer.zero_stage=2", "--algorithm.kl_coef=0.01",
    "--algorithm.mini_epochs=2", "--trainer.mini_batches=1", "--critic.backend=vllm", "--algorithm.reward_mode=capo",
    "--algorithm.penalty=1.0", "--trainer.offload_optimizer=false", "--trainer.offload_states_while_generating=true",
]  # fmt: skip


def test_the_tiny_shape():
    assert (TINY.matmul_params, TINY.params) == (1408, 1448)


def test_a_step_of_the_tiny_shape_by_hand():
    """4 prompts on 2 ranks: 2 prompts a rank, n = 2, prompts of 3 tokens, responses of 2; ZeRO-2, KL on,
    2 mini-epochs of one optimizer step, gradient checkpointing; the judge is the policy itself (N = 2,
    prompts of 10 - 3 = 7 tokens, critiques of 3)."""
    config = load_config(None, OVERRIDES)
    phases = {ph.name.split(" (")[0]: ph.work for ph in step_phases(config, TINY, 2, GPUS["H100"], TINY)}
    assert list(phases) == ["weight sync", "rollout", "critique", "old + reference log-probs", "update"]

    # sync: the engine reads and writes 2896 B; optimizer state to the CPU and back:
    # (12 B fp32 master + Adam) / 2 ranks + (2 B grads) / 2 ranks, per parameter = 7 x 1448 = 10136, twice
    assert phases["weight sync"] == Work(hbm_bytes=5792, flops=0, nvlink_bytes=0, pcie_bytes=20272)

    # prefill of 2 prompts x 3 tokens, keys 2 x (1 + 2 + 3) = 12: 2 x 1408 x 6 + 64 x 12 = 17664 FLOPs, one
    # pass over the weights (2816 B). Decode 2 steps of 4 sequences, keys 4 x (4 + 5) = 36: weights 2 x 2816,
    # KV 36 x 32 = 1152 -> 6784 B; 2 x 1408 x 8 + 64 x 36 = 24832 FLOPs.
    assert phases["rollout"] == Work(hbm_bytes=2816 + 6784, flops=17664 + 24832)

    # the judge: 4 rollouts' prompts of 7 tokens (keys 4 x 28 = 112): 2 x 1408 x 28 + 64 x 112 = 86016 FLOPs,
    # 2816 B; 8 critiques of 3 tokens (keys 8 x (8 + 9 + 10) = 216): 3 x 2816 + 216 x 32 = 15360 B,
    # 2 x 1408 x 24 + 64 x 216 = 81408 FLOPs (an H100's share holds them all: one wave)
    assert phases["critique"] == Work(hbm_bytes=2816 + 15360, flops=86016 + 81408)

    # 4 sequences of 5 tokens = 20 tokens (one micro-batch of 64), keys 4 x 15 = 60:
    # a forward is 2 x 1408 x 20 + 64 x 60 = 60160 FLOPs; policy and reference read 2816 B each, and the
    # ZeRO-3 reference gathers the other rank's half of 2896 B
    assert phases["old + reference log-probs"] == Work(hbm_bytes=5632, flops=120320, nvlink_bytes=1448)

    # 2 mini-epochs x 4 forward units (forward, recompute, backward x 2) x 60160 FLOPs = 481280;
    # weights 2 x 4 x 2816 = 22528 B and Adam 2 steps x 28 B x 1448 / 2 ranks = 40544 B;
    # each micro-batch reduce-scatters half of 2896 B of bf16 gradients: 2 x 1448
    assert phases["update"] == Work(hbm_bytes=22528 + 40544, flops=481280, nvlink_bytes=2896)


def test_a_judge_kv_cache_that_holds_part_of_the_critiques_takes_waves():
    """20 tokens hold one rollout's prompt (7) and its 2 critiques (2 x 3): 2 sequences at a time, so the 8
    critiques take 4 waves, each reading the weights at each of its 3 steps."""
    work = generation(TINY, 2, GPUS["H100"], prompts=4, prompt_tokens=7, children=2, new_tokens=3, kv_tokens=20)
    assert work.hbm_bytes == 2816 + 4 * 3 * 2816 + 216 * 32
    assert work.flops == 86016 + 81408  # the same work, in more passes


def test_tensor_parallel_gpus_read_their_slice_of_the_weights():
    """Two GPUs serve both ranks' 4 sequences: per GPU the same tokens and keys, half the weights per step."""
    work = generation(TINY, 2, GPUS["H100"], prompts=2, prompt_tokens=3, children=2, new_tokens=2, tensor_parallel=2)
    assert work.hbm_bytes == 1408 + 2 * 1408 + 36 * 32


def test_bounds_use_each_gpus_datasheet():
    h100, h200 = GPUS["H100"], GPUS["H200"]
    assert Work(hbm_bytes=6.7e12).seconds(h100) == pytest.approx(2.0)  # 3.35 TB/s
    assert Work(hbm_bytes=9.6e12).seconds(h200) == pytest.approx(2.0)  # 4.8 TB/s
    work = Work(hbm_bytes=3.35e12, flops=3 * 989e12)
    assert (work.seconds(h100), work.bound_by(h100)) == (pytest.approx(3.0), "compute")


def test_the_7b_decode_is_bandwidth_bound_and_the_update_bounds_the_step(monkeypatch):
    """3 prompts x 16 rollouts a rank, 3072 tokens each after a 1024-token prompt: each of 3072 steps reads
    7.07e9 bf16 weights; the update is 4 mini-epochs x 4 forward units over 48 x 4096 tokens."""
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    phases = {ph.name.split(" (")[0]: ph.work for ph in step_phases(config, QWEN25_7B, 4, GPUS["H100"])}
    decode_bytes = 3072 * 7_070_285_824 * 2 + 48 * 57_344 * (3072 * 1024 + 3072 * 3073 // 2)
    assert phases["rollout"].hbm_bytes == pytest.approx(decode_bytes, rel=1e-3)  # prefill adds one read
    assert phases["rollout"].bound_by(GPUS["H100"]) == "HBM"
    attention = 4 * 28 * 28 * 128 * 48 * (4096 * 4097 // 2)  # every token attends to those before it and itself
    assert phases["update"].flops == 4 * 4 * (2 * 7_070_285_824 * 48 * 4096 + attention)
    assert max(phases, key=lambda k: phases[k].seconds(GPUS["H100"])) == "update"
    assert phases["critique"] == Work()  # the judge is remote
    # on 8 ranks the busiest holds 2 of the 12 prompt groups (train.my_share): the step waits for it
    assert Batch.of(config, 8).sequences == 2 * 16


def test_the_cli_prints_every_config_of_a_known_model(capsys):
    main([])
    out = capsys.readouterr().out
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        expected = "skipped" if path.name.startswith("cpu-") else f"{launch_world(path)} GPUs"
        assert f"{path.name}: {expected}" in out


def test_the_readme_table_is_the_computed_one(monkeypatch):
    import re

    from capo_fast.gpu_cost import cost_table

    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- gpu-cost -->\n(.*?)\n<!-- /gpu-cost -->", readme, re.S)[1]
    assert table == cost_table(config, QWEN25_7B, 4)
