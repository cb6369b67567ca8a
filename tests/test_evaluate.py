"""Evaluation metrics: unbiased pass@k, maj@k, greedy pass@1 over runs, multiple choice; the CLI end to end."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from capo_fast.data import DataError, Problem, as_multiple_choice
from capo_fast.engines import Completion
from capo_fast.reward import OutcomeVerifier, choice_letter, outcome_reward
from capo_fast.scoring import EvalOptions, evaluate_set, load_set, pass_at_k


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
    assert outcome_reward(f"So \\boxed{{{a.answer}. 7}}", 0.0, choice=a.correct_choice) == 1.0
    assert outcome_reward("\\boxed{Z}", 1.0, choice=a.correct_choice) == 0.0
    assert Problem("1+1?", "2").correct_choice is None and outcome_reward("\\boxed{2}", 1.0, choice=None) == 1.0


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



@pytest.mark.parametrize("samples", [0, 2])
def test_a_verifier_that_drops_a_score_fails_naming_the_counts(samples):
    """Two math rows and one multiple-choice row the verifier never sees: a verifier that returns one score
    fewer than the answers it was given stops the evaluation, greedy and sampled alike, rather than shift
    the verdicts onto other answers. The greedy run is scored first; with samples it gets every score."""
    from capo_fast.reward import OutcomeScore

    problems = [Problem("1+1?", "2"), Problem("Gas? A. steam B. ice", "A", multiple_choice=True),
                Problem("2+2?", "4")]  # fmt: skip
    engine = ScriptedEngine(greedy=[["\\boxed{2}", "A", "\\boxed{4}"]], sampled=[["\\boxed{2}"] * 2] * 3)
    calls = []

    def score(texts, answers):
        calls.append(len(texts))
        drop = len(calls) == (2 if samples else 1)
        return [OutcomeScore(1.0, 1.0, "ok") for _ in texts[drop:]]

    expected = 2 * samples or 2  # verifiable answers of the call that is cut short
    with pytest.raises(ValueError, match=f"^the verifier returned {expected - 1} scores for {expected} answers$"):
        evaluate_set(problems, [[1], [2], [3]], engine.generate, score, EvalOptions(runs=1, samples=samples))
    assert calls == ([2, 4] if samples else [2])


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


def _mc_rows(count: int) -> list[dict]:
    """Four-option rows whose correct option is the word "steam" at a varying place in the data's order."""
    rows = []
    for i in range(count):
        options = ["ice", "stone", "wood", "sand"]
        options.insert(i % 4, "steam")
        rows.append({"question": f"Which is a gas? ({i})", "choices": options[:4], "answer": "steam"})
    return rows


def test_multiple_choice_options_are_reshuffled_per_run(tmp_path):
    from capo_fast.scoring import load_runs, run_seed

    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _mc_rows(12)))
    runs = load_runs(str(path), seed=5, runs=3)
    assert len(runs) == 3 and all(len(r) == 12 for r in runs)
    assert runs[0] == load_set(str(path), seed=5)  # run 0 is what a one-run (training) evaluation scores
    assert [run_seed(5, r) for r in range(3)] == [5, 6, 7]
    for r, problems in enumerate(runs):
        assert problems == load_set(str(path), seed=5 + r)
        for i, p in enumerate(problems):  # every run letters the same problem, the answer still "steam"
            assert p.question.startswith(f"Which is a gas? ({i})") and _correct_text(p) == "steam"
    orders = [tuple(p.question for p in problems) for problems in runs]
    assert len(set(orders)) == 3  # 12 problems x 4! orders: three runs that coincide would be a bug
    math_set = tmp_path / "math.jsonl"
    math_set.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    plain = load_runs(str(math_set), seed=5, runs=3)
    assert plain[0] is plain[1] is plain[2]  # nothing to reshuffle: read once


class AlwaysA:
    """Answers option A to every prompt and records the prompts of each greedy run."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, sampling, *, n, seeds):
        self.prompts.append([list(p) for p in prompts])
        return [[Completion([1], [0.0], "So \\boxed{A}", "stop")] for _ in prompts]


def test_pass_at_1_reports_its_spread_over_reshuffled_runs():
    from capo_fast.scoring import RunInputs

    def lettered(*answers):
        return [Problem(f"q{i}", a, choices=("x", "y"), multiple_choice=True) for i, a in enumerate(answers)]

    # Always answering A scores 1/2, 2/2 and 0/2 on runs whose correct letters are (A, B), (A, A), (B, B).
    engine = AlwaysA()
    later = [RunInputs(lettered("A", "A"), [[10], [11]]), RunInputs(lettered("B", "B"), [[20], [21]])]
    with OutcomeVerifier(num_workers=1) as verifier:
        m = evaluate_set(lettered("A", "B"), [[0], [1]], engine.generate, verifier.score, EvalOptions(runs=3),
                         later_runs=later)  # fmt: skip
    assert engine.prompts == [[[0], [1]], [[10], [11]], [[20], [21]]]  # each run answers its own prompts
    assert m["pass@1_runs"] == [0.5, 1.0, 0.0] and m["pass@1"] == pytest.approx(0.5)
    assert m["pass@1_std"] == pytest.approx(math.sqrt((0.0**2 + 0.5**2 + 0.5**2) / 3))  # population std
    assert (m["pass@1_min"], m["pass@1_max"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="later_runs: 1 given for 3 runs"):
        evaluate_set(lettered("A"), [[0]], engine.generate, verifier.score, EvalOptions(runs=3),
                     later_runs=later[:1])  # fmt: skip
    with pytest.raises(ValueError, match="the same 1 problems"):
        evaluate_set(lettered("A"), [[0]], engine.generate, verifier.score, EvalOptions(runs=3), later_runs=later)


class RecordingEngine:
    """Stands in for VLLMEngine: records what it was built with, answers option A."""

    built: list[tuple[tuple, dict]] = []

    def __init__(self, *args, **kwargs):
        RecordingEngine.built.append((args, kwargs))

    def generate(self, prompts, sampling, *, n, seeds):
        return [[Completion([1], [0.0], "\\boxed{A}", "stop") for _ in range(n)] for _ in prompts]


class CharTokenizer:
    """A tokenizer stand-in: one token per character of the rendered chat."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens):
        return [ord(c) for c in text]


def test_cli_engine_options_reach_the_engine_and_runs_reshuffle(tmp_path, monkeypatch):
    import inspect

    import transformers

    import capo_fast.engines
    import capo_fast.evaluate
    from capo_fast.evaluate import main
    from capo_fast.scoring import load_runs

    monkeypatch.setattr(capo_fast.engines, "VLLMEngine", RecordingEngine)
    monkeypatch.setattr(capo_fast.evaluate, "resolve_model", lambda name: tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in _mc_rows(8)))
    out = tmp_path / "r.json"
    RecordingEngine.built.clear()
    args = ["--model", "m", "--sets", f"mc={mc}", "--runs", "3", "--seed", "2", "--out", str(out)]
    assert main([*args, "--gpu-memory-utilization", "0.8", "--tensor-parallel-size", "2"]) == 0
    assert main(args) == 0
    (first_args, first), (_, default) = RecordingEngine.built
    assert (first["gpu_memory_utilization"], first["tensor_parallel_size"], first["executor_backend"]) == (0.8, 2, "mp")
    assert (default["gpu_memory_utilization"], default["tensor_parallel_size"], default["executor_backend"]) == (
        0.9, 1, "")  # fmt: skip
    assert first["sleep_mode"] is False
    from capo_fast.engines import VLLMEngine  # the real engine takes every option the CLI passes

    inspect.signature(VLLMEngine).bind(*first_args, **first)
    metrics = json.loads(out.read_text())["sets"]["mc"]
    expected = [sum(p.answer == "A" for p in run) / 8 for run in load_runs(str(mc), seed=2, runs=3)]
    assert metrics["pass@1_runs"] == expected and len(set(expected)) > 1  # the runs saw different orders
    assert metrics["pass@1_std"] == pytest.approx(statistics.pstdev(expected))


@pytest.mark.parametrize(
    "flag", [["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "1.5"], ["--tensor-parallel-size", "0"]]
)
def test_cli_rejects_engine_options_out_of_range(flag, capsys):
    from capo_fast.evaluate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--sets", "a=b", *flag])
    assert flag[0] in capsys.readouterr().err


def test_training_evaluation_answers_its_rank_share_and_names_every_metric():
    """Rank 1 of 2 answers problems 1 and 3 (every second one); a single process sums nothing more, so the
    named totals are that share's: 1 of 2 right overall, 1/1 on source a, 0/1 on source b."""
    from capo_fast.scoring import evaluate_on_ranks

    problems = [Problem(f"{i}+0?", str(i), data_source=source) for i, source in enumerate("aabb")]
    answers = {(ord(c),): t for c, t in (("a", "\\boxed{0}"), ("b", "\\boxed{1}"), ("c", "\\boxed{9}"), ("d", "x"))}
    prompts = [[ord(c)] for c in "abcd"]
    asked = []

    def generate(prompts, sampling, *, n, seeds):
        asked.extend(prompts)
        return [[Completion([1] * 4, [0.0] * 4, answers[tuple(p)], "stop")] for p in prompts]

    with OutcomeVerifier(num_workers=1) as verifier:
        m = evaluate_on_ranks({"heldout": (problems, prompts), "empty": ([], [])}, generate, verifier.score,
                              EvalOptions(runs=1), rank=1, world=2)  # fmt: skip
    assert asked == [[ord("b")], [ord("d")]]
    assert m == {
        "eval/heldout/pass@1": 0.5, "eval/heldout/length": 4.0, "eval/heldout/truncated": 0.0,
        "eval/heldout/a/pass@1": 1.0, "eval/heldout/b/pass@1": 0.0,
    }  # fmt: skip
