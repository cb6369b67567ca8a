"""The whole loop under the deepspeed launcher on CPU: logs, checkpoints, exact resume after kill -9."""

import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "cpu-smoke.yaml"


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _command(ranks: int, out: Path, *extra: str) -> list[str]:
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", _port(), str(ROOT / "capo_fast" / "train.py"),
            "--config", str(SMOKE), f"--logging.output_dir={out}", *extra]  # fmt: skip


def _run(ranks: int, out: Path, *extra: str) -> None:
    result = subprocess.run(_command(ranks, out, *extra), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def _steps(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "actor/loss" in r}


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_two_ranks_log_finite_losses_flag_steps_and_checkpoint(tmp_path):
    before = _shm_buffers()
    _run(2, tmp_path, "--trainer.prompts_per_step=3")  # uneven shares: 1 and 2 prompt groups
    assert _shm_buffers() - before == set(), "DeepSpeed's shared-memory buffers outlived the run"
    steps = _steps(tmp_path)
    assert sorted(steps) == [1, 2, 3]
    for row in steps.values():
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
        assert row["response/length"] > 0 and row["time/rollout"] > 0
    assert max(r["credit/flagged_step_rate"] for r in steps.values()) > 0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step3"
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "final" / "tokenizer.json").exists()


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


def test_kill_9_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps = ["--trainer.steps=4", "--checkpoint.every=1", "--checkpoint.keep=4"]
    _run(1, tmp_path / "straight", *steps)
    expected = _steps(tmp_path / "straight")

    out = tmp_path / "killed"
    run = subprocess.Popen(_command(1, out, *steps), cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() == "step2"):
        assert run.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()

    _run(1, out, *steps)
    resumed = _steps(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert _comparable(resumed[step]) == _comparable(expected[step])


def test_grpo_baseline_runs_without_a_judge(tmp_path):
    extra = tmp_path / "extra.jsonl"
    rows = [{"question": f"{i} + 1 = ?", "answer": i + 1, "data_source": "ab"[i % 2]} for i in range(3)]
    extra.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _run(1, tmp_path, "--algorithm.reward_mode=outcome", "--trainer.steps=1", "--checkpoint.every=0",
         f"--eval.sets=extra={extra}", "--logging.rollout_samples=3")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {
        "eval/extra/pass@1",
        "eval/heldout/pass@1",
        "eval/extra/truncated",
        "eval/extra/a/pass@1",
        "eval/extra/b/pass@1",
    } <= set().union(*rows[-2:])  # the final evaluation
    (row,) = _steps(tmp_path).values()
    assert row["credit/flagged_step_rate"] == 0 and row["credit/failed_critique_rate"] == 0
    assert math.isfinite(row["actor/loss"])
    samples = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["critiques"] == [] and len(s["steps"]) >= 1 for s in samples)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["algorithm"]["reward_mode"] == "outcome" and "torch" in run["packages"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tmp_path / "final" / "README.md").read_text()
    assert "GRPO-Rule" in card and "held-out accuracy" in card
    assert "| extra | " in card and "| heldout | " in card  # every set's pass@1, before and after
    assert json.loads((tmp_path / "final" / "run.json").read_text())["config"] == run["config"]


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("gspo", ["--algorithm.kl_coef=0.01", "--algorithm.entropy_coef=0.001"]),  # KL and entropy on [N] log-probs
        ("cispo", ["--algorithm.aggregation=token-mean"]),
    ],
)
def test_policy_losses_from_the_registry_run_end_to_end(tmp_path, loss, extra):
    _run(1, tmp_path, f"--algorithm.policy_loss={loss}", "--trainer.steps=2", "--checkpoint.every=0", *extra)
    steps = _steps(tmp_path)
    assert sorted(steps) == [1, 2]
    for row in steps.values():
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
        assert row["actor/skipped_steps"] == 0 and 0 <= row["actor/clip_fraction"] <= 1
    if "--algorithm.kl_coef=0.01" in extra:  # the first step's updates moved the policy off the reference
        assert steps[2]["actor/kl"] > 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["algorithm"]["policy_loss"] == loss
    assert (tmp_path / "final" / "config.json").exists()
