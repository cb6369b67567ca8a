"""Evaluation metrics: unbiased pass@k, maj@k, greedy pass@1 over runs, multiple choice; the CLI end to end."""

import json
import math
import subprocess
import sys

import pytest

from capo_fast.data import DataError, Problem, as_multiple_choice
from capo_fast.evaluate import EvalOptions, choice_letter, evaluate_set, is_correct, load_set, pass_at_k
from capo_fast.reward import OutcomeVerifier
from capo_fast.rollout import Completion


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(8, 2, 1) == 0.25


def test_multiple_choice_options_are_shuffled_by_seed_and_scored_on_the_letter():
    p = Problem("Which is prime?", "C", choices=("4", "6", "7", "8"))
    a = as_multiple_choice(p, seed=0, index=3)
    assert a.multiple_choice and a.answer in "ABCD" and a == as_multiple_choice(p, seed=0, index=3)
    line = next(ln for ln in a.question.splitlines() if ln.endswith(". 7"))
    assert line[0] == a.answer  # the letter now in front of "7"
    shuffled = {as_multiple_choice(p, seed=s, index=3).answer for s in range(20)}
    assert len(shuffled) > 1
    assert choice_letter("It must be \\boxed{B}.") == "B" and choice_letter("The answer is (D).") == "D"
    assert choice_letter("no idea") is None
    # training and evaluation score an answer alike: the letter, never math-verify's reading of it
    assert is_correct(a, f"So \\boxed{{{a.answer}. 7}}", verified=0.0) == 1.0
    assert is_correct(a, "\\boxed{Z}", verified=1.0) == 0.0
    assert is_correct(Problem("1+1?", "2"), "\\boxed{2}", verified=1.0) == 1.0


def _correct_text(problem: Problem) -> str:
    """The option text behind a lettered problem's answer."""
    line = next(ln for ln in problem.question.splitlines() if ln.startswith(f"{problem.answer}. "))
    return line[3:]


def test_benchmark_rows_become_lettered_questions_whatever_their_shape(tmp_path):
    rows = {
        # ARC: options with labels, a numeric label as the key
        "arc": {"question": "Which is a gas?", "answerKey": "3",
                "choices": {"text": ["ice", "stone", "steam", "wood"], "label": ["1", "2", "3", "4"]}},
        "arc_letters": {"question": "Which is a gas?", "answerKey": "C",
                        "choices": {"text": ["ice", "stone", "steam", "wood"], "label": ["A", "B", "C", "D"]}},
        # GPQA: the correct answer and three incorrect ones in columns
        "gpqa": {"Question": "Which is a gas?", "Correct Answer": "steam", "Incorrect Answer 1": "ice",
                 "Incorrect Answer 2": "stone", "Incorrect Answer 3": "wood"},
        # MMLU-Pro: options list, a letter answer
        "mmlu_pro": {"question": "Which is a gas?", "options": ["ice", "stone", "steam", "wood"], "answer": "C",
                     "answer_index": 2},
        "by_text": {"question": "Which is a gas?", "choices": ["ice ", "stone", " steam", "wood"], "answer": "steam"},
        # MMLU: an integer answer is a 0-based index; AQuA: options that carry their own letters
        "mmlu": {"question": "Which is a gas?", "choices": ["ice", "stone", "steam", "wood"], "answer": 2},
        "aqua": {"question": "Which is a gas?", "options": ["A)ice", "B)stone", "C)steam", "D)wood"], "answer": "C"},
        "aqua_text": {"question": "Which is a gas?", "options": ["A)ice", "B)stone", "C)steam", "D)wood"],
                      "answer": "C)steam"},
    }  # fmt: skip
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        (p,) = load_set(str(path), seed=1)
        assert p.multiple_choice and _correct_text(p) == "steam", name
        assert all(f"{letter}. " in p.question for letter in "ABCD"), name
    numbers = tmp_path / "numbers.jsonl"  # option texts that look like indices: the integer answer wins
    numbers.write_text(json.dumps({"question": "1 + 1?", "choices": ["1", "2", "3", "4"], "answer": 1}) + "\n")
    (p,) = load_set(str(numbers), seed=0)
    assert _correct_text(p) == "2" and "A)" not in p.question
    (p,) = load_set(str(tmp_path / "aqua.jsonl"), seed=0)
    assert "A)ice" not in p.question and ". ice" in p.question
    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"question": "?", "choices": [str(i) for i in range(27)], "answer": 0}) + "\n")
    with pytest.raises(DataError, match=r"many\.jsonl:1: 27 options; at most 26"):
        load_set(str(many), seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?", "choices": ["a", "b"], "answer": "Z9"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: the answer 'Z9' is none of the 2 options"):
        load_set(str(bad), seed=0)


def test_eval_sets_read_the_configured_keys_and_held_out_rows_keep_their_options(tmp_path):
    from capo_fast.data import DataKeys, load_problems

    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"q": {"text": "1+1?"}, "gold": {"value": "2"}}) + "\n")
    (p,) = load_set(str(nested), seed=0, keys=DataKeys("q.text", "gold.value"))
    assert (p.question, p.answer) == ("1+1?", "2")
    usual = tmp_path / "usual.jsonl"  # a benchmark of the usual shape beside training data of another
    usual.write_text(json.dumps({"problem": "2+2?", "answer": "4"}) + "\n")
    (p,) = load_set(str(usual), seed=0, keys=DataKeys("q.text", "gold.value"))
    assert (p.question, p.answer) == ("2+2?", "4")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Pick 7.", "choices": ["5", "7"], "answer": "B"}) + "\n")
    (held_out,) = load_problems(str(mc), size=1, seed=3)  # the training loop's held-out path
    assert held_out.multiple_choice and _correct_text(held_out) == "7"


class ScriptedEngine:
    """Answers from a script: greedy runs get `greedy[run][i]`, sampling gets `sampled[i]`."""

    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.run = greedy, sampled, 0

    def generate(self, prompts, sampling, *, n, seeds):
        if sampling.temperature == 0:
            texts = self.greedy[self.run]
            self.run += 1
            return [[Completion([1] * 3, [0.0] * 3, texts[i], "stop")] for i in range(len(prompts))]
        return [[Completion([1] * 5, [0.0] * 5, t, "length") for t in self.sampled[i][:n]] for i in range(len(prompts))]


def test_metrics_of_one_set():
    problems = [Problem("1+1?", "2"), Problem("2+2?", "4")]
    engine = ScriptedEngine(
        greedy=[["\\boxed{2}", "\\boxed{5}"], ["\\boxed{2}", "\\boxed{4}"]],  # run 1: 1/2, run 2: 2/2
        sampled=[
            ["\\boxed{2}", "\\boxed{3}", "\\boxed{3}", "\\boxed{2}"],
            ["\\boxed{1}", "\\boxed{1}", "\\boxed{4}", "x"],
        ],
    )
    with OutcomeVerifier(num_workers=1) as verifier:
        m = evaluate_set(
            problems, [[1], [2]], engine.generate, verifier.score, EvalOptions(runs=2, samples=4, ks=(1, 2, 4))
        )
    assert m["pass@1_runs"] == [0.5, 1.0] and m["pass@1"] == 0.75
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    # maj@4: problem 1 ties 2 vs 3, the first seen (2) is right; problem 2's majority answer (1) is wrong
    assert m["maj@4"] == 0.5 and m["maj@2"] == 0.5
    assert m["length"] == 3 and m["truncated"] == 0.0
    assert "by_source" not in m  # rows without a data_source


def test_pass_at_1_per_data_source():
    problems = [Problem("1+1?", "2", data_source="gsm8k"), Problem("2+2?", "4", data_source="math"),
                Problem("3+3?", "6", data_source="math")]  # fmt: skip
    engine = ScriptedEngine(greedy=[["\\boxed{2}", "\\boxed{4}", "\\boxed{7}"]], sampled=[])
    with OutcomeVerifier(num_workers=1) as verifier:
        m = evaluate_set(problems, [[1], [2], [3]], engine.generate, verifier.score, EvalOptions(runs=1))
    assert m["by_source"] == {"gsm8k": {"pass@1": 1.0, "problems": 1}, "math": {"pass@1": 0.5, "problems": 2}}


@pytest.mark.slow
def test_cli_scores_a_model_on_named_sets(tiny_model_dir, tmp_path):
    math_set = tmp_path / "m.jsonl"
    math_set.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    mc_set = tmp_path / "mc.jsonl"
    mc_set.write_text(json.dumps({"question": "Pick 7.", "choices": ["5", "7"], "answer": "B"}) + "\n")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "capo_fast.evaluate", "--model", str(tiny_model_dir), "--sets", f"math={math_set}",
           f"mc={mc_set}", "--runs", "2", "--samples", "2", "--k", "1", "2", "--max-tokens", "8",
           "--max-model-len", "512", "--dtype", "float32", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sets = json.loads(out.read_text())["sets"]
    assert sets["math"]["problems"] == 3 and sets["mc"]["problems"] == 1
    for metrics in sets.values():
        assert {"pass@1", "pass@2", "maj@2", "length", "truncated"} <= set(metrics)
        assert 0 <= metrics["pass@1"] <= 1 and metrics["truncated"] == 1.0  # 8 tokens cut every answer
