"""Run logs: one JSON line per step, tensorboard and wandb when configured, a one-line summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

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

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))

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
