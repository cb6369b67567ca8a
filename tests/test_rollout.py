"""vLLM engines on CPU: reproducible sampling, weight sync, remote judge, one engine per rank."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from capo_fast.config import CriticConfig, SamplingConfig  # noqa: E402
from capo_fast.critique import split_steps  # noqa: E402
from capo_fast.rollout import CritiqueRequest, RemoteCritic, VLLMEngine, model_weights  # noqa: E402

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
    seconds = engine.load_weights(model_weights(model))
    after = engine.prompt_logprobs(ids)
    torch.testing.assert_close(after.double(), _hf_prompt_logprobs(model, ids), atol=1e-4, rtol=0)
    assert (after - before).abs().max() > 1e-2, "the engine still computes with the old weights"
    return seconds


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
    _check_sync(engine, smollm2_dir, seed=1)
    answer = engine.generate([[1, 2, 3]], SamplingConfig(max_tokens=4), n=1, seeds=[0])[0][0]
    assert len(answer.token_ids) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_tiny_model(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(
        # The OpenAI server behind `vllm serve` (whose CLI wrapper looks for a dist named "vllm",
        # while the CPU build's is "vllm-cpu"). Whole prefills: the CPU build cannot rewind a seeded
        # request's generator after a chunk ("CPU Generator does not use offset"), as in VLLMEngine.
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
         "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
         "--gpu-memory-utilization", "0.3", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("vllm serve did not come up")
                time.sleep(2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


REQUESTS = [
    CritiqueRequest("What is 2 + 2?", split_steps("2 + 2 = 4\n\nSo the answer is \\boxed{4}.")),
    CritiqueRequest("What is 3 * 3?", split_steps("3 * 3 = 6\n\n\\boxed{6}")),
]


def test_remote_critic_against_vllm_serve(served_tiny_model, tiny_model_dir):
    config = CriticConfig(
        backend="remote", url=served_tiny_model, num_critiques=3, max_concurrency=2, retries=0, timeout_s=60,
        sampling=SamplingConfig(temperature=1.0, max_tokens=48, stop=[" "]),
    )  # fmt: skip
    critic = RemoteCritic(config)
    assert critic.model == str(tiny_model_dir)
    texts = critic._complete([[{"role": "user", "content": "hi"}]] * 2, [0, 1], [None, None])
    assert len(texts) == 2 and all(len(t) == 3 for t in texts)
    assert all(isinstance(t, str) for per in texts for t in per), "the server's answers did not come back"
    critiques = critic.critique(REQUESTS, seed=0)
    assert [len(c) for c in critiques] == [3, 3]
    # A random model writes no <incorrect_steps> block: every critique is an abstention.
    assert all(not c.valid for per in critiques for c in per)


def test_remote_critic_failures_become_failed_critiques():
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = CriticConfig(backend="remote", url=f"http://127.0.0.1:{port}/v1", num_critiques=2, retries=1, timeout_s=2)
    critic = RemoteCritic(config, model="judge")
    critiques = critic.critique(REQUESTS, seed=0)
    assert critiques == [[critiques[0][0]] * 2] * 2 and not critiques[0][0].valid


def test_a_judge_server_that_is_down_stops_the_run_before_the_first_rollout():
    from capo_fast.config import Config
    from capo_fast.rollout import JudgeError, build_critic

    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    config = Config()
    config.critic = CriticConfig(backend="remote", url=url, model="judge", retries=0, timeout_s=2)
    with pytest.raises(JudgeError, match=rf"critic\.url='{url}': the judge server did not answer"):
        build_critic(config, None)


def test_a_judge_server_serving_another_model_is_named():
    from types import SimpleNamespace

    from capo_fast.rollout import JudgeError

    critic = RemoteCritic(CriticConfig(backend="remote", url="http://judge:8000/v1"), model="Qwen2.5-72B-Instruct")
    served = SimpleNamespace(data=[SimpleNamespace(id="Llama-3-70B-Instruct")])
    critic.client = SimpleNamespace(models=SimpleNamespace(list=lambda: served))
    with pytest.raises(JudgeError, match=r"critic\.model='Qwen2\.5-72B-Instruct' is not served .*Llama-3-70B"):
        critic.probe()
    critic.model = "Llama-3-70B-Instruct"
    critic.probe()


def test_the_judge_evaluation_reaches_a_remote_judge(served_tiny_model, tmp_path):
    """evaluate_judge with critic.backend=remote: every critique comes back from the server (a random model
    writes no block: abstentions, not failures), and the tokens are the server's count."""
    from capo_fast.evaluate_judge import main

    out = tmp_path / "remote.json"
    shipped = Path(__file__).parent / "data" / "chain-annotated.jsonl"
    argv = ["--sets", f"chain={shipped}", "--limit", "3", "--out", str(out), "--critic.backend=remote",
            f"--critic.url={served_tiny_model}", "--critic.num_critiques=2", "--critic.answer_format=free",
            "--critic.sampling.max_tokens=16", "--critic.retries=0"]  # fmt: skip
    assert main(argv) == 0
    critique = json.loads(out.read_text())["sets"]["chain"]["critique"]
    assert critique["critiques"] == 6 and critique["failure_rate"] == 0.0 and critique["abstention_rate"] == 1.0
    assert 0 < critique["tokens_per_critique"] <= 16


def test_each_rank_generates_for_its_own_prompts(tiny_engine, tiny_model_dir, tmp_path):
    script = Path(__file__).parent / "scripts" / "generate_per_rank.py"
    env = {**os.environ, "MASTER_PORT": str(_free_port())}
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
