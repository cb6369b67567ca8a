"""The learning experiment end to end in its quick form: one seed of GRPO-Rule and CAPO, a few steps."""

import json
import math

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


def test_quick_experiment_runs_both_arms_and_reports_them(tmp_path):
    from bench import learning_experiment

    assert learning_experiment.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "learning-cpu-2core-x86_64-quick.json").read_text())
    assert (tmp_path / "learning-cpu-2core-x86_64-quick.png").stat().st_size > 0
    assert set(result["arms"]) == {"grpo", "capo"}
    for arm in result["arms"].values():
        assert arm["eval_steps"] == [0, 2, 4]
        assert all(0 <= a <= 1 for a in arm["eval_accuracy_mean"])
        assert len(arm["train_accuracy_mean"]) == 4 and math.isfinite(arm["gain"])
    capo, grpo = result["arms"]["capo"], result["arms"]["grpo"]
    # The accurate critic names steps of wrong rollouts only; GRPO-Rule reads no critique at all.
    assert capo["flagged_step_rate_incorrect"] > 0 and capo["flagged_step_rate_correct"] == 0
    assert grpo["flagged_step_rate_incorrect"] == 0
    assert capo["accuracy_before"] == grpo["accuracy_before"]  # one warmed-up policy for every arm
