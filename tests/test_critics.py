"""Remote critics against `vllm serve` on CPU, and a judge server that is down or serves another model."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from capo_fast.config import CriticConfig, SamplingConfig  # noqa: E402
from capo_fast.critics import CritiqueRequest, RemoteCritic  # noqa: E402
from capo_fast.critique import split_steps  # noqa: E402
from capo_fast.errors import JudgeError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_tiny_model(tiny_model_dir, free_port):
    port = free_port()
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
    from capo_fast.critics import build_critic

    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    config = Config()
    config.critic = CriticConfig(backend="remote", url=url, model="judge", retries=0, timeout_s=2)
    with pytest.raises(JudgeError, match=rf"critic\.url='{url}': the judge server did not answer"):
        build_critic(config.critic, None, voting="majority", dtype="float32", seed=0)


def test_a_judge_server_serving_another_model_is_named():
    from types import SimpleNamespace

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


