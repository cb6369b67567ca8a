"""Run logs: a resumed run continues the same wandb run."""

import sys
import types

import pytest

from capo_fast.metrics import MetricsLog


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    inits, ids = [], iter(["first1", "second2"])
    fake = types.SimpleNamespace(
        init=lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None),
        util=types.SimpleNamespace(generate_id=lambda: next(ids)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):  # the first start, then a restart in the same output folder
        MetricsLog(tmp_path, enabled=True, tensorboard=False, wandb_project="capo", config={"a": 1})
    assert [i["id"] for i in inits] == ["first1", "first1"] and all(i["resume"] == "allow" for i in inits)
    MetricsLog(tmp_path / "other", enabled=True, tensorboard=False, wandb_project="capo", config={})
    assert inits[-1]["id"] == "second2"  # a new output folder is a new run


def test_the_run_summary_states_before_and_after_with_standard_errors():
    from capo_fast.metrics import binomial_se, run_summary

    rows = [
        {"step": 0, "eval/accuracy": 0.4, "eval/accuracy_before": 0.4},
        {"step": 1, "time/rollout": 2.0, "time/update": 1.0},
        {"step": 2, "time/rollout": 3.0, "time/update": 1.5, "eval/accuracy": 0.5},
        {"step": 2, "eval/accuracy": 0.64, "eval/accuracy_after": 0.64},
    ]
    summary = run_summary(rows, problems=200, seconds=90.0, method="CAPO")
    # by hand: sqrt(0.4*0.6/200) = 0.034641, sqrt(0.64*0.36/200) = 0.033941, their hypot = 0.048497
    assert summary["accuracy_before_se"] == pytest.approx(0.034641, abs=1e-6)
    assert summary["accuracy_after_se"] == pytest.approx(0.033941, abs=1e-6)
    assert summary["change"] == pytest.approx(0.24) and summary["change_se"] == pytest.approx(0.048497, abs=1e-6)
    assert summary["heldout_curve"] == [[0, 0.4], [2, 0.5], [2, 0.64]]
    assert summary["steps"] == 2 and summary["seconds_by_phase"] == {"time/rollout": 5.0, "time/update": 2.5}
    assert binomial_se(1.0, 200) == 0.0


def test_eval_lines_give_the_standard_error_and_the_change_in_standard_errors():
    from capo_fast.run_report import eval_line

    # SE = sqrt(0.25 * 0.75 / 100) = 0.0433; change 0.05 with SE hypot(sqrt(0.2 * 0.8 / 100), 0.0433) = 0.0590
    rows = [{"step": 0, "eval/accuracy_before": 0.2}]
    assert eval_line("before training", 0.25, 100, []) == (
        "eval accuracy before training: 0.250 ± 0.043 (SE) on 100 held-out problems"
    )
    assert eval_line("after training", 0.25, 100, rows) == (
        "eval accuracy after training: 0.250 ± 0.043 (SE) on 100 held-out problems; change +0.050 ± 0.059 (+0.8 SE)"
    )
