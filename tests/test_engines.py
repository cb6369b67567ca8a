"""vLLM engines on CPU: reproducible sampling, weight sync, one engine per rank."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from capo_fast.config import SamplingConfig  # noqa: E402
from capo_fast.engines import VLLMEngine  # noqa: E402
from capo_fast.weights import model_weights  # noqa: E402

pytestmark = pytest.mark.slow
SAMPLING = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=12)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return VLLMEngine(tiny_model_dir, seed=0, max_model_len=256)


def _hf_prompt_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_generation_is_reproducible_per_prompt_seed(tiny_engine):
    prompts = [[5, 6, 7], [8, 9]]
    first = tiny_engine.generate(prompts, SAMPLING, n=3, seeds=[11, 12])
    # Same seed, other batch: a sample depends on its prompt's seed only.
    again = tiny_engine.generate([prompts[1]], SAMPLING, n=3, seeds=[12])
    other = tiny_engine.generate([prompts[1]], SAMPLING, n=3, seeds=[13])
    assert [c.token_ids for c in first[1]] == [c.token_ids for c in again[0]]
    assert [c.token_ids for c in first[1]] != [c.token_ids for c in other[0]]
    for completion in first[0]:
        assert len(completion.token_ids) == len(completion.logprobs) == 12
        assert completion.finish_reason == "length"
        assert all(lp <= 0 for lp in completion.logprobs)


def _check_sync(engine, model_dir, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    ids = [int(t) for t in torch.randint(3, model.config.vocab_size, (40,), generator=generator)]
    before = engine.prompt_logprobs(ids)
    torch.testing.assert_close(before.double(), _hf_prompt_logprobs(model, ids), atol=1e-4, rtol=0)
    with torch.no_grad():
        for p in model.parameters():  # a relative change: a trained model stays in its numeric range
            p.mul_(1 + 0.05 * torch.randn_like(p))
    engine.load_weights(model_weights(model))
    after = engine.prompt_logprobs(ids)
    torch.testing.assert_close(after.double(), _hf_prompt_logprobs(model, ids), atol=1e-4, rtol=0)
    assert (after - before).abs().max() > 1e-2, "the engine still computes with the old weights"
    return model


def test_weight_sync_tiny(tiny_engine, tiny_model_dir):
    _check_sync(tiny_engine, tiny_model_dir, seed=0)


@pytest.mark.gpu
def test_a_sleep_wake_sync_generate_cycle_on_cuda_sees_the_new_weights(tiny_engine, tiny_model_dir):
    """The policy engine's step on a GPU: a level-2 sleep discards the weights, the sync wakes the engine and
    loads new ones, and what it then computes is the new model's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    ids = [int(t) for t in torch.randint(3, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))]
    assert tiny_engine.sleep_enabled and tiny_engine.sleep_discards_weights
    tiny_engine.sleep()
    assert tiny_engine.asleep
    tiny_engine.load_weights(model_weights(model))
    assert not tiny_engine.asleep
    torch.testing.assert_close(tiny_engine.prompt_logprobs(ids).double(), _hf_prompt_logprobs(model, ids),
                               atol=1e-3, rtol=0)  # fmt: skip
    completion = tiny_engine.generate([ids[:8]], SamplingConfig(temperature=0.0, max_tokens=4), n=1, seeds=[0])[0][0]
    with torch.no_grad():  # the new model's greedy continuation, from HF
        expected = model.generate(torch.tensor([ids[:8]]), max_new_tokens=4, do_sample=False)[0, 8:].tolist()
    assert completion.token_ids == expected[: len(completion.token_ids)] and completion.token_ids
    tiny_engine.load_weights(model_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))  # for other tests


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir):
    # Module-scoped like the tiny one: tearing an engine down resets vLLM's process-wide parallel
    # state, which would break the other engine still in use.
    return VLLMEngine(smollm2_dir, seed=0, max_model_len=256)


def test_weight_sync_smollm2(smollm2_engine, smollm2_dir):
    engine = smollm2_engine
    model = _check_sync(engine, smollm2_dir, seed=1)
    answer = engine.generate([[1, 2, 3]], SamplingConfig(temperature=0.0, max_tokens=4), n=1, seeds=[0])[0][0]
    with torch.no_grad():  # the synced model's greedy continuation and its log-probs, from HF
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)[0].tolist()
    assert answer.token_ids == out[3:]
    torch.testing.assert_close(
        torch.tensor(answer.logprobs, dtype=torch.float64), _hf_prompt_logprobs(model, out)[2:], atol=1e-3, rtol=0
    )


def test_each_rank_generates_for_its_own_prompts(tiny_engine, tiny_model_dir, tmp_path, free_port):
    script = Path(__file__).parent / "scripts" / "generate_per_rank.py"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"],
         str(script), str(tiny_model_dir), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["prompt"] != ranks[1]["prompt"]
    from transformers import AutoModelForCausalLM

    tiny_engine.load_weights(model_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))  # undo other tests
    sampling = SamplingConfig(temperature=1.0, max_tokens=8)
    for rank in ranks:  # what a single engine draws for that prompt and seed
        expected = tiny_engine.generate([rank["prompt"]], sampling, n=2, seeds=[rank["seed"]])
        assert rank["token_ids"] == [c.token_ids for c in expected[0]]
