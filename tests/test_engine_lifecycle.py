"""The policy engine's lifecycle has one owner: offload, sync when needed, wake, generate, sleep.

A stand-in engine records what happens to it (no vLLM here); tests/test_engines.py runs the real one.
"""

import logging
from contextlib import contextmanager

import pytest
import torch

from capo_fast.config import CriticConfig, SamplingConfig
from capo_fast.critics import check_critique_failures
from capo_fast.engines import Completion, PolicyEngine, critic_sleep_mode
from capo_fast.errors import JudgeError


class RecordingEngine:
    """Generates the checksum of the weights it holds, as text; records every call."""

    def __init__(self, events: list, sleep_discards_weights: bool):
        self.events, self.sleep_discards_weights = events, sleep_discards_weights
        self.checksum = None

    def load_weights(self, weights) -> float:
        self.events.append("load_weights")
        self.checksum = round(sum(float(t.sum()) for _, t in weights), 4)
        return 0.01

    def generate(self, prompts, sampling, *, n, seeds):
        self.events.append("generate")
        if self.checksum is None:
            raise RuntimeError("generated from discarded weights")
        return [[Completion([1], [0.0], str(self.checksum), "stop")] * n for _ in prompts]

    def sleep(self):
        self.events.append("sleep")
        if self.sleep_discards_weights:
            self.checksum = None


class Trainer:
    def __init__(self, events: list):
        self.events = events
        self.layer = torch.nn.Linear(3, 2)
        self.version = 0

    def weights(self):
        return [(n, p.detach()) for n, p in self.layer.named_parameters()]

    @contextmanager
    def states_offloaded(self):
        self.events.append("offload")
        try:
            yield
        finally:
            self.events.append("reload")

    def step(self):
        with torch.no_grad():
            self.layer.weight.add_(1.0)
        self.version += 1

    def checksum(self) -> str:
        return str(round(sum(float(t.sum()) for _, t in self.weights()), 4))


SAMPLING = SamplingConfig(temperature=0.0, max_tokens=4)


@pytest.mark.parametrize("discards", [True, False], ids=["level-2 sleep (GPU)", "no sleep (CPU)"])
def test_generation_after_a_step_sees_the_current_weights(discards):
    events = []
    trainer = Trainer(events)
    policy = PolicyEngine(RecordingEngine(events, discards), trainer)
    assert policy.generate([[1]], SAMPLING, n=1, seeds=[0])[0][0].text == trainer.checksum()
    trainer.step()  # e.g. an evaluation right after a training step
    assert policy.generate([[1]], SAMPLING, n=1, seeds=[0])[0][0].text == trainer.checksum()
    policy.generate([[1]], SAMPLING, n=1, seeds=[0])  # unchanged weights
    # a level-2 sleep discards the weights, so every generation reloads; otherwise only after a change
    assert events.count("load_weights") == (3 if discards else 2)


def test_trainer_state_is_offloaded_before_the_engine_wakes_and_reloaded_after_it_sleeps():
    events = []
    PolicyEngine(RecordingEngine(events, True), Trainer(events)).generate([[1]], SAMPLING, n=2, seeds=[0])
    assert events == ["offload", "load_weights", "generate", "sleep", "reload"]


def test_a_failed_generation_still_puts_the_engine_to_sleep():
    events = []
    engine = RecordingEngine(events, True)

    def out_of_memory(*args, **kwargs):
        events.append("generate")
        raise RuntimeError("out of memory")

    engine.generate = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        PolicyEngine(engine, Trainer(events)).generate([[1]], SAMPLING, n=1, seeds=[0])
    assert events == ["offload", "load_weights", "generate", "sleep", "reload"]


def test_only_one_sleep_mode_engine_per_process():
    # vLLM's CuMemAllocator is process-wide (vllm/device_allocator/cumem.py:112-127)
    assert not critic_sleep_mode(requested=True, supported=True, policy_sleeps=True)
    assert critic_sleep_mode(requested=True, supported=True, policy_sleeps=False)
    assert not critic_sleep_mode(requested=True, supported=False, policy_sleeps=False)
    assert not critic_sleep_mode(requested=False, supported=True, policy_sleeps=False)


def test_a_failing_judge_warns_then_stops_the_run(caplog):
    config = CriticConfig(backend="remote", url="http://judge:8000/v1", warn_failure_rate=0.2, max_failure_rate=0.5)
    with caplog.at_level(logging.WARNING):
        check_critique_failures(0.1, config, step=3)
        assert not caplog.records
        check_critique_failures(0.3, config, step=3)
        assert len(caplog.records) == 1 and "30%" in caplog.records[0].getMessage()
    with pytest.raises(JudgeError, match=r"step 3: 60% of critiques failed.*critic\.url='http://judge:8000/v1'"):
        check_critique_failures(0.6, config, step=3)


def test_a_dead_judge_stops_the_run_before_any_update(tiny_model_dir):
    """The step's critiques all failed: the run stops before the policy is updated on outcome reward alone."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from capo_fast.config import Config
    from capo_fast.credit import CreditConfig, VotingConfig
    from capo_fast.critique import FAILED, make_splitter
    from capo_fast.data import Problem, PromptSampler
    from capo_fast.reward import OutcomeScore
    from capo_fast.train import Run, RunData

    config = Config()
    config.trainer.prompts_per_step, config.rollout.n = 1, 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "1 + 1 = 2\n\nSo \\boxed{2}"
    answer = Completion(tokenizer(text)["input_ids"], [], text, "stop")
    updates = []
    run = Run.__new__(Run)  # the step's logic with stand-ins for the engines, the verifier and the trainer
    run.config, run.rank, run.world, run.step, run.tokenizer = config, 0, 1, 0, tokenizer
    run.data = RunData([Problem("1 + 1?", "2")], [[1, 2]], PromptSampler(1, 0), eval_sets={}, heldout_size=0)
    run.policy = SimpleNamespace(generate=lambda prompts, sampling, n, seeds: [[answer] * n], last_sync_s=0.0)
    run.split_steps = make_splitter("")
    run.verifier = SimpleNamespace(score=lambda texts, golds: [OutcomeScore(1.0, 1.0, "ok")] * len(texts))
    run.critic = SimpleNamespace(
        critique=lambda requests, seed: [[FAILED] * config.critic.num_critiques for _ in requests], sleep=lambda: None
    )
    run.voting, run.credit_config = VotingConfig(), CreditConfig()
    run.trainer = SimpleNamespace(compute_logprobs=updates.append, train_mini_batch=updates.append)
    with pytest.raises(JudgeError, match=r"step 1: 100% of critiques failed"):
        run.train_step()
    assert updates == []


def test_a_local_judge_counts_its_tokens_and_says_which_prompts_are_too_long(tiny_model_dir, caplog):
    """LocalCritic without vLLM: a prompt past critic.max_model_len - max_tokens is not sent (its critiques
    fail) and the log says so; the completions' tokens are counted for the judge's cost."""
    from transformers import AutoTokenizer

    from capo_fast.critics import ChatCritic, LocalCritic

    class StandInJudge:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        sent = []

        def generate(self, prompts, sampling, *, n, seeds, regex):
            self.sent += prompts
            return [[Completion([5, 6, 7], [0.0] * 3, "judged", "stop")] * n for _ in prompts]

    critic = LocalCritic.__new__(LocalCritic)  # the engine is the stand-in, not a vLLM one
    ChatCritic.__init__(critic, CriticConfig(max_model_len=256, sampling=SamplingConfig(max_tokens=128)))
    critic.engine = StandInJudge()
    chats = [[{"role": "user", "content": "short"}], [{"role": "user", "content": "long " * 300}]]
    with caplog.at_level(logging.WARNING, logger="capo_fast.critics"):
        texts = critic._complete(chats, [0, 1], [None, None])
    assert texts == [["judged", "judged"], [None, None]] and len(critic.engine.sent) == 1
    assert critic.tokens_generated == 6
    assert "1 of 2 critic prompts" in caplog.text and "exceed critic.max_model_len" in caplog.text
