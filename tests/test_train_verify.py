"""How a training step scores its rollouts: r_v by the one rule of training and evaluation (reward.outcome_reward)."""

from types import SimpleNamespace

from capo_fast.config import Config
from capo_fast.credit import Rollout
from capo_fast.data import Problem, PromptGroup
from capo_fast.reward import OutcomeScore
from capo_fast.train import Run, step_metrics


class RecordingVerifier:
    """Says every answer it reads is correct (math-verify might read "(B) 7" as 7 = 7) and records what it read."""

    def __init__(self):
        self.read = []

    def score(self, responses, golds):
        self.read.append(list(zip(responses, golds, strict=True)))
        return [OutcomeScore(1.0, 1.0, "ok") for _ in responses]


def rollout(text: str, truncated: bool = False) -> Rollout:
    return Rollout([1, 2, 3], text, truncated, [])


def test_multiple_choice_answers_are_scored_on_their_letter_and_never_verified():
    config = Config()
    config.algorithm.truncated_reward = "zero"
    verifier = RecordingVerifier()
    run = SimpleNamespace(config=config, verifier=verifier, critic=None)
    choice = PromptGroup(Problem("Which? (A) 7 (B) 8", "A", multiple_choice=True), [1])
    choice.rollouts = [rollout("The answer is (B) 7."), rollout("The answer is (A)."), rollout("(A)", truncated=True)]
    math = PromptGroup(Problem("1 + 6?", "7"), [2])
    math.rollouts = [rollout("\\boxed{7}"), rollout("\\boxed{7}", truncated=True)]

    scores = Run._verify_and_critique(run, [choice, math], seeds=[0] * 5)

    assert verifier.read == [[("\\boxed{7}", "7"), ("\\boxed{7}", "7")]]  # the math answers only
    assert [r.correct for r in choice.rollouts] == [0.0, 1.0, 0.0]  # wrong letter, right letter, cut off
    assert [r.correct for r in math.rollouts] == [1.0, 0.0]  # verified, cut off under truncated_reward=zero
    assert [r.formatted for r in choice.rollouts] == [0.0, 0.0, 0.0]  # no \boxed{} in a letter answer
    assert len(scores) == 2

    rollouts = choice.rollouts + math.rollouts
    stats = dict.fromkeys(("loss", "clipped", "entropy", "kl", "tokens", "skipped"), 0.0)
    times = {"time/rollout": 1.0}
    metrics = step_metrics(rollouts, scores, {}, stats, times, correct_reward=2.0, lr=1e-4)
    assert metrics["reward/accuracy"] == 2 / 5  # r_v as the advantages see it, not the verifier's 1s
    assert metrics["reward/verifier_timeouts"] == 0.0
