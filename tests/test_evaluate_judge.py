"""The judge evaluation: ProcessBench-layout files in, every metric against values computed by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capo_fast.chain_arithmetic import chain_of, write_annotated, wrong_steps
from capo_fast.config import load_config
from capo_fast.critics import ChatCritic, guided_critique_regex
from capo_fast.critique import critique_messages, load_template, split_steps
from capo_fast.data import DataError
from capo_fast.evaluate_judge import (
    AnnotatedKeys,
    load_annotated,
    main,
    modes_to_score,
    run_judge,
    subsets,
)

SHIPPED = Path(__file__).parent / "data" / "chain-annotated.jsonl"
JUDGMENT = "Judgment: Is the solution correct (Yes/No)?"

# Four solutions: two with an error (labels 2 and 0), two right; the second right one is a response to split.
ROWS = [
    {"problem": "P0", "steps": ["s0", "s1", "s2 wrong", "s3"], "label": 2},
    {"problem": "P1", "steps": ["s0 wrong", "s1", "s2"], "label": 0},
    {"problem": "P2", "steps": ["s0", "s1", "s2"], "label": -1},
    {"problem": "P3", "response": "first\n\nsecond", "label": -1},
]
# Two critiques per solution, the judge's known answers: P1's second writes neither a block (an abstention) nor
# a verdict, P3's first fails (no text), and P3's second names a step the solution does not have (7).


def _says(verdict: str, block: str | None) -> str:
    return f"{JUDGMENT} {verdict}\n" + (f"<incorrect_steps>{block}</incorrect_steps>" if block is not None else "")


SCRIPT = {
    "P0": [_says("No", "2,3"), _says("No", "1")],
    "P1": [_says("No", "0"), "step 0 is wrong"],
    "P2": [_says("Yes", ""), _says("Yes", "1")],
    "P3": [None, _says("Yes", "0,7")],
}


def scripted(requests, num_critiques, seed):
    return [SCRIPT[r.question][:num_critiques] for r in requests]


@pytest.fixture
def annotated(tmp_path):
    path = tmp_path / "annotated.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _run(tmp_path, sets, *extra, judge="scripted", status=0):
    """main() with a function judge of this module and N=2; the results JSON (None when none was written)."""
    out = tmp_path / f"{judge}.json"
    argv = ["--sets", *sets, "--out", str(out), "--critic.backend=function", f"--critic.function={__name__}:{judge}"]
    assert main([*argv, "--critic.num_critiques=2", *extra]) == status
    return (json.loads(out.read_text()) if out.exists() else None), out


def test_every_metric_matches_its_hand_computed_value(annotated, tmp_path, capsys):
    results, out = _run(tmp_path, [f"hand={annotated}"])
    result = results["sets"]["hand"]
    assert (result["solutions"], result["erroneous"], result["steps"]) == (4, 2, 12)
    # N' = 1 averages the first critiques alone and the second ones alone (every mode reads one the same way).
    # First ones: P0 and P1 named at their label, P2 nothing, P3 failed (no vote: a miss, as ProcessBench counts
    # an unreadable answer, and no penalty); 3 verdicts agree, P3's is missing. Second ones: P0 names step 1, P1
    # abstains (a miss, no verdict), P2 and P3 name a right step; 3 verdicts agree.
    one = {
        "error_accuracy": 2 / 4, "correct_accuracy": 1 / 4, "f1": 1 / 3, "wrong_step_flag_rate": 2 / 4,
        "steps_before_flag_rate": 1 / 4, "correct_solution_flag_rate": 2 / 10, "verdict_agreement": 6 / 8,
        "votes_not_counted": 2 / 8, "subsets": 2,
    }  # fmt: skip
    for mode in ("intersection", "majority", "union", "average"):
        assert result["modes"][mode]["1"] == pytest.approx(one), mode
    # N' = 2: P0's two critiques share no step; P1 and P3 have one valid critique each.
    both = {"wrong_step_flag_rate": 1 / 2, "steps_before_flag_rate": 0.0, "correct_solution_flag_rate": 1 / 5}
    intersection = {"error_accuracy": 0.5, "correct_accuracy": 0.5, "f1": 0.5, **both, "verdict_agreement": 1.0,
                    "votes_not_counted": 0.0, "subsets": 1}  # fmt: skip
    assert result["modes"]["intersection"]["2"] == pytest.approx(intersection)
    union = {**intersection, "correct_accuracy": 0.0, "f1": 0.0, "wrong_step_flag_rate": 1.0,
             "steps_before_flag_rate": 1 / 2, "correct_solution_flag_rate": 2 / 5}  # fmt: skip
    assert result["modes"]["union"]["2"] == pytest.approx(union)
    # majority flags count >= k/2: 1 of 2 is enough, so at N' = 2 it is union
    assert result["modes"]["majority"]["2"] == pytest.approx(union)
    average = {**union, "wrong_step_flag_rate": 3 / 4, "steps_before_flag_rate": 1 / 4,
               "correct_solution_flag_rate": 3 / 10}  # fmt: skip
    assert result["modes"]["average"]["2"] == pytest.approx(average)
    critique = dict(result["critique"])
    assert critique.pop("seconds_per_critique") > 0 and critique.pop("tokens_per_critique") is None
    assert critique == pytest.approx({"critiques": 8, "says_correct_rate": 3 / 8,
                                      "names_steps_saying_correct_rate": 2 / 8, "abstention_rate": 1 / 8,
                                      "failure_rate": 1 / 8, "out_of_range_rate": 1 / 8})  # fmt: skip
    assert results["judge"]["backend"] == "function" and results["judge"]["num_critiques"] == 2
    printed = capsys.readouterr().out
    assert "| hand | intersection | 2 | 0.500 | 0.500 | 0.500 | 0.500 | 0.000 | 0.200 | 1.000 | 0.000 |" in printed
    assert "said correct 0.375 (naming steps all the same 0.250), abstained 0.125, failed 0.125, " in printed
    assert out.with_suffix(".png").stat().st_size > 0
    written = [json.loads(line) for line in out.with_suffix(".critiques.jsonl").read_text().splitlines()]
    assert [(r["label"], r["steps"]) for r in written] == [(2, 4), (0, 3), (-1, 3), (-1, 2)]
    assert written[0]["critiques"][0] == {"text": SCRIPT["P0"][0], "incorrect_steps": [2, 3], "judgment": False}
    assert written[1]["critiques"][1] == {"text": "step 0 is wrong", "incorrect_steps": None, "judgment": None}
    assert written[3]["critiques"][0]["text"] is None


VERDICT_ONLY = {  # the paper's format: a Yes stops at the judgment line, a No names the wrong steps
    "P0": [_says("No", "2"), _says("Yes", None)],
    "P1": [_says("No", "0"), _says("No", None)],  # a No without a block abstains
    "P2": [_says("Yes", None), _says("Yes", None)],
    "P3": [_says("Yes", None), _says("No", "1")],
}


def verdict_only(requests, num_critiques, seed):
    return [VERDICT_ONLY[r.question][:num_critiques] for r in requests]


def test_a_yes_without_a_block_is_a_vote_for_no_wrong_step(annotated, tmp_path):
    results, _ = _run(tmp_path, [f"hand={annotated}"], judge="verdict_only")
    result = results["sets"]["hand"]
    # N' = 2. majority (2 of 2 or 1 of 2 meet count >= k/2): P0 flags its label (hit), P1 has one valid critique
    # and flags its label (hit), P2 flags nothing (hit), P3 flags step 1 of a correct solution (miss).
    # Verdicts: P0 1 of 2 say Yes (no majority: No, agrees), P1 No, P2 Yes (agree), P3 1 of 2 (No: disagrees).
    majority = {"error_accuracy": 1.0, "correct_accuracy": 0.5, "f1": 2 / 3, "wrong_step_flag_rate": 1.0,
                "steps_before_flag_rate": 0.0, "correct_solution_flag_rate": 1 / 5, "verdict_agreement": 3 / 4,
                "votes_not_counted": 0.0, "subsets": 1}  # fmt: skip
    assert result["modes"]["majority"]["2"] == pytest.approx(majority)
    # intersection hears P0's and P3's Yes: neither flags a step any more (P1's lone No still does).
    intersection = {**majority, "error_accuracy": 0.5, "correct_accuracy": 1.0, "wrong_step_flag_rate": 0.5,
                    "correct_solution_flag_rate": 0.0}  # fmt: skip
    assert result["modes"]["intersection"]["2"] == pytest.approx(intersection)
    critique = {k: v for k, v in result["critique"].items() if not k.endswith("_per_critique")}
    assert critique == pytest.approx({"critiques": 8, "says_correct_rate": 4 / 8,
                                      "names_steps_saying_correct_rate": 0.0, "abstention_rate": 1 / 8,
                                      "failure_rate": 0.0, "out_of_range_rate": 0.0})  # fmt: skip


def test_min_valid_critiques_withholds_the_vote_as_training_does(annotated, tmp_path):
    results, _ = _run(tmp_path, [f"hand={annotated}"], "--algorithm.min_valid_critiques=2")
    intersection = results["sets"]["hand"]["modes"]["intersection"]
    # P1 and P3 have one valid critique of two: no vote, so both are misses (P0 is one too: its critiques share
    # no step).
    assert intersection["2"]["error_accuracy"] == 0.0 and intersection["2"]["correct_accuracy"] == 0.5
    assert intersection["2"]["correct_solution_flag_rate"] == 0.0, "no vote, no penalty"
    assert intersection["2"]["votes_not_counted"] == 0.5
    assert intersection["1"]["votes_not_counted"] == pytest.approx(2 / 8), "at N' = 1 one valid critique is enough"


def test_greedy_is_scored_alone_on_its_one_critique():
    assert modes_to_score(load_config(None, ["--algorithm.voting=greedy", "--critic.num_critiques=1"])) == ["greedy"]
    assert modes_to_score(load_config(None)) == ["intersection", "majority", "union", "average"]


def test_subsets_are_every_combination_or_a_seeded_sample():
    assert subsets(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    sample = subsets(8, 4, seed=3)
    assert len(sample) == len(set(sample)) == 64 and sample == subsets(8, 4, seed=3)


def test_the_chat_critic_gets_trainings_prompt_template_and_guided_format(tmp_path):
    """A chat backend's requests: the packaged (paper's) template with the reference solution, and the guided
    regex over the row's own steps, as in training."""

    class Recording(ChatCritic):
        seen = []

        def _complete(self, messages, seeds, regexes):
            self.seen += list(zip(messages, seeds, regexes, strict=True))
            return [[f"{JUDGMENT} No\n<incorrect_steps>0</incorrect_steps>"] * self.config.num_critiques] * len(seeds)

    config = load_config(None)
    solutions = load_annotated(str(SHIPPED), AnnotatedKeys(), split_steps, limit=3)
    critic = Recording(config.critic)
    critiques, cost = run_judge(critic, solutions, seed=5, progress=lambda line: None)
    assert [len(c) for c in critiques] == [2, 2, 2] and cost["tokens_per_critique"] == 0
    first = solutions[0].request
    assert critic.seen[0][0] == critique_messages(
        first.question, first.steps, first.reference_solution, load_template()
    )
    assert [seed for _, seed, _ in critic.seen] == [5, 7, 9]  # N=2 children each: seeds N apart (seeds.py)
    assert critic.seen[0][2] == guided_critique_regex(config.critic.guided_reasoning_chars, len(first.steps))


def test_key_names_are_configurable_and_labels_read_from_csv_and_floats(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"q": "P", "out": {"text": "a\n\nb\n\nc"}, "meta": {"first_error": 1.0}}) + "\n")
    keys = AnnotatedKeys(problem="q", response="out.text", label="meta.first_error")
    (solution,) = load_annotated(str(path), keys, split_steps)
    assert solution.label == 1 and [s.text.strip() for s in solution.request.steps] == ["a", "b", "c"]
    csv = tmp_path / "rows.csv"
    csv.write_text('problem,response,label\nP,"x\n\ny",-1\n')
    assert load_annotated(str(csv), AnnotatedKeys(), split_steps)[0].label == -1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"problem": "P", "steps": ["a", "b"], "label": 2}, r"rows.jsonl:2: label must be -1 .* \[0, 2\), got 2"),
        ({"problem": "P", "steps": ["a"], "label": "first"}, r"rows.jsonl:2: label must be .* got 'first'"),
        ({"problem": "P", "label": 0}, r"rows.jsonl:2: no steps"),
        ({"steps": ["a"], "label": 0}, r"rows.jsonl:2: no problem text"),
    ],
)
def test_a_bad_row_is_named_with_its_line_and_field(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        load_annotated(str(path), AnnotatedKeys(), split_steps)


def test_a_bad_set_stops_before_the_judge_starts(tmp_path, capsys):
    assert main(["--sets", f"x={tmp_path / 'none.jsonl'}", "--critic.backend=function",
                 f"--critic.function={__name__}:scripted"]) == 2  # fmt: skip
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert main(["--sets", "no-name"]) == 2
    assert "expected NAME=SOURCE, got 'no-name'" in capsys.readouterr().err
    assert main(["--sets", f"x={SHIPPED}", "--limit", "-1"]) == 2
    assert "--limit: must be >= 0" in capsys.readouterr().err


def test_the_shipped_annotated_set_is_what_its_generator_writes_and_its_labels_hold(tmp_path):
    """tests/data/chain-annotated.jsonl (the README's judge numbers): regenerated identically, and each label
    is the first step the task's own checker finds wrong."""
    regenerated = write_annotated(tmp_path / "again.jsonl", 40, seed=7)
    assert regenerated.read_text() == SHIPPED.read_text()
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    for row in rows:
        wrong = wrong_steps(chain_of(row["problem"], row["reference_solution"]), row["steps"])
        assert row["label"] == (min(wrong) if wrong else -1)
    assert sum(row["label"] >= 0 for row in rows) == 20


@pytest.mark.slow
def test_a_local_vllm_judge_runs_as_in_training(tiny_model_dir, tmp_path):
    """The vllm backend end to end: the judge engine starts from model.path, guided decoding makes every
    critique parse, and the engine's completion tokens are counted."""
    out = tmp_path / "local.json"
    command = [sys.executable, "-m", "capo_fast.evaluate_judge", "--sets", f"chain={SHIPPED}", "--limit", "4",
               "--out", str(out), f"--model.path={tiny_model_dir}", "--critic.backend=vllm", "--critic.num_critiques=2",
               "--critic.guided_reasoning_chars=0", "--critic.max_model_len=2048"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    critique = json.loads(out.read_text())["sets"]["chain"]["critique"]
    assert critique["critiques"] == 8 and critique["abstention_rate"] == critique["failure_rate"] == 0.0
    assert critique["tokens_per_critique"] > 0 and critique["seconds_per_critique"] > 0
    assert "| chain | majority | 2 |" in result.stdout and out.with_suffix(".png").exists()


def short_and_long(requests, num_critiques, seed):
    """One critique for the first solution, three for the others: the first's missing one counts as failed."""
    said = f"{JUDGMENT} No\n<incorrect_steps>0</incorrect_steps>"
    return [[said] if i == 0 else [said] * 3 for i in range(len(requests))]


def test_a_function_critic_giving_too_few_or_too_many_critiques_is_held_to_n(annotated, tmp_path):
    results, _ = _run(tmp_path, [f"x={annotated}"], judge="short_and_long")
    result = results["sets"]["x"]
    assert result["critique"]["critiques"] == 8 and result["critique"]["failure_rate"] == 1 / 8
    assert result["modes"]["majority"]["2"]["subsets"] == 1


def nothing(requests, num_critiques, seed):
    return [[None] * num_critiques for _ in requests]


def test_a_judge_that_never_answers_stops_with_its_results_kept(annotated, tmp_path, capsys):
    results, _ = _run(tmp_path, [f"x={annotated}", f"y={annotated}"], judge="nothing", status=1)
    assert "x: 100% of critiques failed (critic.max_failure_rate=0.5)" in capsys.readouterr().err
    result = results["sets"]
    assert list(result) == ["x"] and result["x"]["modes"]["majority"]["1"]["correct_accuracy"] == 0.0


def test_keys_default_to_the_run_configs_data_keys_and_rows_without_ground_truth_are_said(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"task": {"text": "P0"}, "steps": ["a", "b"], "label": 1}) + "\n")
    results, out = _run(tmp_path, [f"x={path}"], "--data.question_key=task.text")
    assert results["sets"]["x"]["without_ground_truth"] == 1
    assert "1 of them carry no reference solution or answer" in capsys.readouterr().out
    out.unlink()
    assert _run(tmp_path, [f"x={path}"], "--data.question_key=task.text", "--problem-key", "missing.path",
                status=2)[0] is None  # fmt: skip


def test_split_responses_name_the_splitter_in_their_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "P", "response": "a\n\nb", "label": 2}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1: label .* got 2 \(the response splits into 2 steps by"):
        load_annotated(str(path), AnnotatedKeys(), split_steps)

    def broken(response):
        raise ValueError("the pieces do not join to the response")

    with pytest.raises(DataError, match=r"rows.jsonl:1: critic.step_splitter failed on response: the pieces"):
        load_annotated(str(path), AnnotatedKeys(), broken)


PROCESSBENCH_ROWS = [  # the columns of Qwen/ProcessBench's splits
    {"id": "gsm8k-0", "generator": "Qwen2-7B-Instruct", "problem": "Tom has 3 apples and buys 4. How many?",
     "steps": ["Tom starts with 3.", "3 + 4 = 8.", "So he has 8."], "final_answer_correct": False, "label": 1},
    {"id": "gsm8k-1", "generator": "Llama-3.1-8B-Instruct", "problem": "What is 2 * 5?",
     "steps": ["2 * 5 = 10.", "The answer is 10."], "final_answer_correct": True, "label": -1},
]  # fmt: skip


def test_processbench_loads_from_a_saved_dataset_and_by_hub_id(tmp_path, monkeypatch):
    import datasets

    dataset = datasets.Dataset.from_list(PROCESSBENCH_ROWS)
    dataset.save_to_disk(str(tmp_path / "processbench"))
    saved = load_annotated(str(tmp_path / "processbench"), AnnotatedKeys(), split_steps)
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from_hub = load_annotated("Qwen/ProcessBench@gsm8k", AnnotatedKeys(), split_steps)
    assert calls == [("Qwen/ProcessBench", None, "gsm8k")]
    for solutions in (saved, from_hub):
        assert [s.label for s in solutions] == [1, -1]
        assert [s.text for s in solutions[0].request.steps] == PROCESSBENCH_ROWS[0]["steps"]
        assert solutions[0].request.ground_truth() is None  # ProcessBench gives the judge no reference


def test_the_evaluated_judge_is_built_as_training_builds_it_but_alone(annotated, tmp_path, monkeypatch):
    """One build_critic for both; a local engine takes critic.gpu_memory_utilization of the GPU in either
    (test_memory_budget.py holds what it gives vLLM)."""
    from capo_fast import critics

    calls, real = [], critics.build_critic
    monkeypatch.setattr(critics, "build_critic", lambda *a, **k: calls.append(k) or real(*a, **k))
    _run(tmp_path, [f"x={annotated}"])
    assert calls == [{"voting": "majority", "dtype": "float32", "seed": 0}]  # no sleep mode: the judge is alone
