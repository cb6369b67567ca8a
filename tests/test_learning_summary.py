"""The learning experiment's statistics and reports (bench/learning_experiment.py, bench/report.py) on
made-up run logs: what "learned" means, the SEs, the self-judge confusion, valid JSON."""

import json
import math

import pytest

from bench import learning_experiment as lx
from bench import report

HELDOUT = 200


def _write_run(out, evals: list[float], train_accuracy: float = 0.5, flagged: float = 0.3) -> None:
    out.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy_before": evals[0], "eval/accuracy": evals[0]}]
    for step in range(1, 5):
        row = {"step": step, "actor/loss": 0.1, "reward/accuracy": train_accuracy, "time/rollout": 1.0,
               "credit/flagged_step_rate_incorrect": flagged, "credit/flagged_step_rate_correct": 0.0}  # fmt: skip
        if step in (2, 4):
            row["eval/accuracy"] = evals[step // 2]
        rows.append(row)
    rows.append({"step": 4, "eval/accuracy_final": evals[-1]})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _setup(tmp_path, afters: dict[str, list[float]]) -> lx.Setup:
    setup = lx.Setup(work=tmp_path, steps=4, seeds=[0, 1, 2], eval_every=2, num_eval=HELDOUT, warmup_steps=1,
                     recall=1.0, false_flag=0.0, parallel=1, threshold=0.6)  # fmt: skip
    setup.arms = [lx.Arm("grpo", ("--algorithm.reward_mode=outcome",)), lx.Arm("capo")]
    for name, after in afters.items():
        for seed, value in enumerate(after):
            _write_run(tmp_path / name / f"seed{seed}", [0.5, (0.5 + value) / 2, value])
    return setup


def test_learned_needs_a_gain_above_two_standard_errors_of_seeds_and_heldout(tmp_path):
    setup = _setup(tmp_path, {"capo": [0.70, 0.72, 0.74], "grpo": [0.52, 0.55, 0.58]})
    capo = lx.summarise_arm(setup, setup.arms[1])
    grpo = lx.summarise_arm(setup, setup.arms[0])
    seed_se = 0.02 / math.sqrt(3)
    expected = math.sqrt(seed_se**2 + (0.72 * 0.28 + 0.5 * 0.5) / HELDOUT)
    assert capo["gain"] == pytest.approx(0.22) and capo["gain_se"] == pytest.approx(expected)
    assert capo["learned"] and not grpo["learned"]  # +0.05 is within two SEs of 200 problems
    assert capo["eval_steps"] == [0, 2, 4] and capo["steps_to_threshold"] == [2, 2, 2]
    assert grpo["steps_to_threshold"] == [None, None, None]
    assert capo["flagged_step_rate_incorrect"] == pytest.approx(0.3)
    diff = lx.compare(capo, grpo)
    assert diff["final_accuracy_diff"] == pytest.approx(0.17)
    # Seed k of both arms is paired: per-seed differences 0.18, 0.17, 0.16.
    assert diff["final_accuracy_diff_paired_se"] == pytest.approx(0.01 / math.sqrt(3)) and diff["seeds_ahead"] == 3
    assert diff["final_accuracy_diff_se"] == pytest.approx(
        math.hypot(capo["accuracy_after_se"], grpo["accuracy_after_se"])
    )


def test_result_json_is_valid_and_the_readme_table_renders(tmp_path, monkeypatch):
    setup = _setup(tmp_path, {"capo": [0.70, 0.72, 0.74], "grpo": [0.52, 0.55, 0.58]})
    arms = {arm.name: lx.summarise_arm(setup, arm) for arm in setup.arms}
    arms["capo"]["eval_accuracy_se"][0] = float("nan")
    result = {"setup": {"threshold": 0.6, "seeds": [0, 1, 2], "heldout_problems": HELDOUT},
              "critic_noise": {"recall": 1.0, "false_flag": 0.0}, "arms": arms,
              "capo_minus_grpo": lx.compare(arms["capo"], arms["grpo"]), "elapsed": {"wall_minutes": 3.0}}  # fmt: skip
    lx.write_result(result, tmp_path / "learning-test")
    written = json.loads((tmp_path / "learning-test.json").read_text())  # NaN written as null
    assert written["arms"]["capo"]["eval_accuracy_se"][0] is None
    assert (tmp_path / "learning-test.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(report, "_learning_result", lambda: written)
    table = report.learning_table()
    assert "| capo | N=1 majority, r=1.0, f=0.0 | 0.500 |" in table and "| grpo | none (GRPO-Rule) |" in table
    assert "| yes |" in table and "| no |" in table


def test_self_judge_compares_flags_on_checkable_steps_and_skips_failed_judges(tmp_path):
    out = tmp_path / "self-judge"
    _write_run(out, [float("nan")] * 3)
    step = lambda text, vote: {"text": text, "vote": vote}  # noqa: E731
    valid = [{"valid": True, "incorrect": [1], "judgment": False}]
    rows = [
        {"correct": 0.0, "critiques": valid, "steps": [step("7 + 5 = 12\n\n", 0.0), step("12 * 3 = 35\n\n", 1.0),
                                                      step("So the answer is 35.", 0.0)]},
        {"correct": 1.0, "critiques": [{"valid": True, "incorrect": [0], "judgment": True}],
         "steps": [step("2 + 2 = 4", 1.0)]},
        {"correct": 0.0, "critiques": [{"valid": False, "incorrect": [], "judgment": None}],
         "steps": [step("2 + 2 = 5", 0.0)]},  # a failed critique: not counted as "not flagged"
    ]  # fmt: skip
    (out / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    setup = lx.Setup(work=tmp_path, steps=4, seeds=[0], eval_every=2, num_eval=1, warmup_steps=1, recall=1,
                     false_flag=0, parallel=1, threshold=0.6)  # fmt: skip
    judged = lx.self_judge(setup, {"train": tmp_path / "unused.jsonl"}, steps=4)
    assert judged["rollouts"] == 2 and judged["steps_with_a_checkable_equation"] == 3
    assert judged["confusion"] == {"both": 1, "judge_only": 1, "program_only": 0, "neither": 1}
    assert judged["judge_precision"] == 0.5 and judged["judge_recall"] == 1.0
    assert judged["verdict_agreement_with_verifier"] == 1.0


def test_elapsed_reads_the_launcher_timestamps(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("[2026-11-24 04:00:00,1] [INFO] start\nnoise\n[2026-11-24 04:03:00,5] [INFO] exits\n")
    other = tmp_path / "b.log"
    other.write_text("[2026-11-24 04:01:00,1] x\n[2026-11-24 04:05:00,1] y\n")
    assert lx.elapsed([log, other]) == {"wall_minutes": 5.0, "run_minutes": 7.0, "runs": 2}
