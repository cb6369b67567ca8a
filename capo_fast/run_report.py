"""What a training run tells its reader: the held-out accuracy lines, the exported model's card, and the
summary written when it ends (summary.json, curves.png, where everything is)."""

from __future__ import annotations

import json
from pathlib import Path

from capo_fast.metrics import accuracy_change, binomial_se, plot_run, run_summary


def _before(rows: list[dict]) -> dict:
    """The log line of the evaluation before training ({} when the run was resumed past it and it is lost)."""
    return next((r for r in rows if "eval/accuracy_before" in r), {})


def eval_line(when: str, accuracy: float, problems: int, rows: list[dict]) -> str:
    """`eval accuracy before training: 0.250 ± 0.031 (SE) on 200 held-out problems`; after training also
    the change since the evaluation before it, in standard errors."""
    error = binomial_se(accuracy, problems)
    line = f"eval accuracy {when}: {accuracy:.3f} ± {error:.3f} (SE) on {problems} held-out problems"
    before = _before(rows).get("eval/accuracy_before")
    if when == "after training" and before is not None:
        change, se = accuracy_change(before, accuracy, problems)
        line += f"; change {change:+.3f} ± {se:.3f} ({change / se if se else float('nan'):+.1f} SE)"
    return line


def model_card(config, *, method: str, steps: int, heldout: int, rows: list[dict], final: dict[str, float]) -> str:
    """README.md of the exported model: where it started, what it trained on, how, and how it scores.

    Args:
        config: the run's Config. method: the credit rule in words (credit.describe).
        steps: steps trained. heldout: held-out problems. rows: the metrics log. final: the last evaluation.
    """
    c, before = config, _before(rows)
    sets = sorted({k.split("/")[1] for k in final if k.startswith("eval/") and k.endswith("/pass@1")})
    scores = "".join(
        f"| {name} | {before.get(f'eval/{name}/pass@1', float('nan')):.4f} | {final[f'eval/{name}/pass@1']:.4f} |\n"
        for name in sets
    )
    return (
        f"# {Path(c.logging.output_dir).name}\n\n"
        f"Trained with capo-fast: {method}, voting={c.algorithm.voting}, "
        f"N={c.critic.num_critiques} critiques by {c.critic.model or c.model.path}.\n\n"
        f"- base model: {c.model.path}\n- RL data: {c.data.train} (eval: {c.data.eval or 'generated held-out'})\n"
        f"- steps: {steps} x {c.trainer.prompts_per_step} prompts x {c.rollout.n} rollouts, lr {c.trainer.lr}\n"
        f"- held-out accuracy on {heldout} problems: {before.get('eval/accuracy_before', 'n/a')} "
        f"before, {final['eval/accuracy']:.4f} after (greedy)\n\n"
        f"| set | pass@1 before | pass@1 after |\n| --- | ---: | ---: |\n{scores}\n"
        f"run.json beside this card holds the whole run config, the package versions and the commit.\n"
    )


def write_summary(out: Path, metrics_path: Path, rows: list[dict], *, heldout: int, seconds: float, method: str,
                  checkpoints: Path) -> None:  # fmt: skip
    """summary.json and curves.png in `out`, and the line that says where the logs, checkpoints and model are."""
    summary = run_summary(rows, problems=heldout, seconds=seconds, method=method)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    curves = plot_run(metrics_path, out / "curves.png")
    print(f"logs: {metrics_path}  curves: {curves}  checkpoints: {checkpoints}  final model: {out / 'final'}")
