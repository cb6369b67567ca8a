"""The learning experiment's task and step critic (capo_fast/chain_arithmetic.py): the program judges steps as
DESIGN.md 1.3 asks of a GenPRM, and its noise has the rates it is given."""

import json
import random
from pathlib import Path

import pytest

from capo_fast.chain_arithmetic import (
    Chain,
    chain_of,
    critique,
    equation_error,
    forgot_carry,
    is_heldout,
    needs_carry,
    random_chain,
    split_rows,
    warmup_rows,
    write_split,
    wrong_steps,
)
from capo_fast.config import load_config
from capo_fast.critics import CritiqueRequest, FunctionCritic
from capo_fast.critique import split_steps

CHAIN = Chain(7, (("+", 5), ("*", 3), ("-", 4)))  # 7 + 5 = 12, 12 * 3 = 36, 36 - 4 = 32


def _steps(text: str) -> list[str]:
    return [s.text for s in split_steps(text)]


def test_a_correct_solution_has_no_wrong_step_and_the_right_answer():
    assert CHAIN.values == [7, 12, 36, 32]
    assert wrong_steps(CHAIN, _steps(CHAIN.solution())) == set()
    assert chain_of(CHAIN.question(), CHAIN.solution()) == CHAIN


def test_each_step_is_judged_on_its_own():
    # Step 0 is wrong; step 1 applies the right operation correctly to the wrong result: not wrong.
    text = "7 + 5 = 13\n\n13 * 3 = 39\n\n39 - 4 = 35\n\nThe answer is \\boxed{35}."
    assert wrong_steps(CHAIN, _steps(text)) == {0}
    # Wrong operand, a left side that is not the previous result, an early answer, chatter.
    assert wrong_steps(CHAIN, _steps("7 + 6 = 13\n\n12 * 3 = 36\n\nThe answer is \\boxed{36}.")) == {0, 1, 2}
    assert wrong_steps(CHAIN, _steps("Let me think.\n\n7 + 5 = 12")) == {0}


def test_results_below_zero_are_ordinary_steps():
    # A forgotten carry carried on can go below zero: only the step that forgot is wrong.
    chain = Chain(18, (("+", 2), ("-", 8), ("-", 5), ("*", 3)))
    text = "18 + 2 = 10\n\n10 - 8 = 2\n\n2 - 5 = -3\n\n-3 * 3 = -9\n\nThe answer is \\boxed{-9}."
    assert wrong_steps(chain, _steps(text)) == {0}


def test_the_demonstrator_forgets_carries_only_where_there_are_some():
    assert needs_carry(38, "+", 5) and forgot_carry(38, "+", 5) == 33
    assert needs_carry(42, "-", 7) and forgot_carry(42, "-", 7) == 45
    assert not needs_carry(31, "+", 5) and not needs_carry(7, "-", 5) and not needs_carry(12, "*", 3)
    chain = Chain(38, (("+", 5), ("-", 1)))
    slipped = chain.solution(random.Random(0), slip=1.0)
    assert slipped.startswith("38 + 5 = 33\n\n33 - 1 = 32")
    assert wrong_steps(chain, _steps(slipped)) == {0}


def test_random_chains_stay_in_range(tmp_path):
    rng = random.Random(0)
    for _ in range(200):
        chain = random_chain(rng)
        assert 3 <= len(chain.operations) <= 4 and all(0 <= v <= 99 for v in chain.values)
    rows = [
        json.loads(line) for line in write_split(tmp_path / "t.jsonl", 5, seed=1, slip=0.5).read_text().splitlines()
    ]
    assert {"question", "answer", "reference_solution", "demonstration"} <= rows[0].keys()


def _requests(n: int) -> list[CritiqueRequest]:
    wrong = "7 + 5 = 13\n\n13 * 3 = 39\n\n39 - 4 = 35\n\nThe answer is \\boxed{35}."  # step 0 wrong, 3 correct
    return [CritiqueRequest(CHAIN.question(), split_steps(wrong), CHAIN.solution()) for _ in range(n)]


def test_the_critic_says_yes_to_a_right_answer_and_names_only_wrong_steps_when_accurate():
    right = CritiqueRequest(CHAIN.question(), split_steps(CHAIN.solution()), CHAIN.solution())
    [[yes]], [[no]] = critique([right], 1, seed=0), critique(_requests(1), 1, seed=0)
    assert yes.judgment is True and not yes.incorrect
    assert no.judgment is False and no.incorrect == {0}


def test_the_critics_verdict_reads_the_answer_as_the_verifier_does():
    # The last \\boxed{} decides, wherever it is: a step after the answer does not make it wrong.
    after = CHAIN.solution() + "\n\n32 + 0 = 32"
    [[yes]] = critique([CritiqueRequest(CHAIN.question(), split_steps(after), CHAIN.solution())], 1, seed=0)
    assert yes.judgment is True
    stated = CHAIN.solution().replace("\\boxed{32}", "32")  # no box, an explicit final statement
    [[also_yes]] = critique([CritiqueRequest(CHAIN.question(), split_steps(stated), CHAIN.solution())], 1, seed=0)
    assert also_yes.judgment is True


def test_the_noisy_critic_flags_at_its_rates(monkeypatch):
    monkeypatch.setenv("CHAIN_CRITIC_RECALL", "0.7")
    monkeypatch.setenv("CHAIN_CRITIC_FALSE_FLAG", "0.3")
    critiques = [c for cs in critique(_requests(500), 4, seed=3) for c in cs]
    recall = sum(0 in c.incorrect for c in critiques) / len(critiques)
    false_flags = sum(len(c.incorrect - {0}) for c in critiques) / (3 * len(critiques))
    assert recall == pytest.approx(0.7, abs=0.03) and false_flags == pytest.approx(0.3, abs=0.03)
    assert critique(_requests(3), 2, seed=5) == critique(_requests(3), 2, seed=5)  # seeded


def test_the_loop_runs_it_as_a_function_critic():
    config = load_config(Path(__file__).parent.parent / "bench" / "chain_arithmetic.yaml", [])
    assert config.critic.backend == "function"
    [[c]] = FunctionCritic(config.critic).critique(_requests(1), seed=0)
    assert c.valid and c.incorrect == {0}


def test_equations_in_free_text():
    assert equation_error("First, 7 + 5 = 12.") is False
    assert equation_error("Then 12 × 3 = 35, so") is True
    assert equation_error("We start with seven.") is None
    assert equation_error("7 + 5 + 3 = 15") is None and equation_error("2 * 3 + 4 = 10") is None  # not one operation
    assert equation_error("10 / 3 = 3.33") is False


# ---- the default run (`make train`): the task's splits, the policy keyword, what the run reports ----------


def test_the_warm_up_draws_the_learning_experiments_demonstrations_without_held_out_questions(tmp_path):
    drawn = [json.loads(line) for line in write_split(tmp_path / "sft.jsonl", 8000, seed=1, slip=0.6).open()]
    kept = [row for row in drawn if not is_heldout(row["question"])]
    assert warmup_rows() == kept and 6500 < len(kept) < 7500  # about one question in eight is held out


def test_held_out_questions_are_never_trained_or_warmed_up_on():
    heldout = {r["question"] for r in split_rows("heldout", 200, seed=0)}
    trained = {r["question"] for r in split_rows("train", 2000, seed=0)}
    demonstrated = {r["question"] for r in warmup_rows()}
    assert len(heldout) > 150 and not heldout & (trained | demonstrated)
    assert split_rows("heldout", 5, seed=0) == split_rows("heldout", 5, seed=0)  # seeded
    rows = split_rows("train", 50, seed=1, slip=0.6)
    assert any(r["demonstration"] != r["reference_solution"] for r in rows)  # some carries forgotten


def test_the_default_run_reads_the_chain_task_and_judges_it_with_the_program_critic():
    from capo_fast.config import Config
    from capo_fast.data import DataError, held_out_source, load_problems

    config = Config().validate()
    assert (config.model.path, config.data.train, config.critic.backend) == ("chain", "chain:train", "function")
    assert config.data.num_eval >= 200 and held_out_source(config.data.train) == "chain:heldout"
    assert held_out_source("gym:basic_arithmetic") == "gym:basic_arithmetic" and held_out_source("a.jsonl") == ""
    problems = load_problems("chain:heldout", size=3, seed=0)
    assert [p.question for p in problems] == [r["question"] for r in split_rows("heldout", 3, seed=0)]
    chain = chain_of(problems[0].question, problems[0].reference_solution)
    assert problems[0].answer == str(chain.values[-1])
    with pytest.raises(DataError, match="chain:test: the chain task's splits are train, heldout"):
        load_problems("chain:test", size=3, seed=0)


def test_the_first_line_names_the_judge_for_every_backend():
    from capo_fast.config import CriticConfig
    from capo_fast.critics import CRITIC_BACKENDS

    function = CriticConfig()
    assert "program critic capo_fast.chain_arithmetic:critique" in CRITIC_BACKENDS["function"].describe(function, "x")
    local = CriticConfig(backend="vllm", model="")
    assert CRITIC_BACKENDS["vllm"].describe(local, "smollm2") == "LLM judge smollm2 in a local vLLM engine"
    remote = CriticConfig(backend="remote", url="http://judge:8000/v1", model="Qwen2.5-72B-Instruct")
    assert CRITIC_BACKENDS["remote"].describe(remote, "x") == "LLM judge Qwen2.5-72B-Instruct at http://judge:8000/v1"


def test_the_warm_up_runs_outside_the_launch_and_lands_whole(tmp_path, monkeypatch):
    """Inside a deepspeed launch the warm-up must not see the rank variables (transformers' Trainer would join
    the run's process group), and the cache holds a finished policy or none."""
    import subprocess

    from capo_fast import chain_arithmetic

    seen = {}

    def fake_run(argv, env, check):
        seen["env"] = env
        policy = Path(argv[-2])
        policy.mkdir()
        (policy / "warmup.json").write_text("{}")
        assert Path(argv[-1]).read_text().count("\n") == len(chain_arithmetic.warmup_rows())

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    out = chain_arithmetic.warmed_up_policy(tmp_path)
    assert (out / "warmup.json").exists() and "WORLD_SIZE" not in seen["env"] and "LOCAL_RANK" not in seen["env"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the partial folder is gone
    seen.clear()
    assert chain_arithmetic.warmed_up_policy(tmp_path) == out and not seen  # cached: no second warm-up
