"""Renders bench/results/*.json as Markdown tables and puts them in README.md.

python bench/report.py [--write]

The tables: the policy loss over logits (pytest-benchmark files with a `floor` row), the linear
variant (files ending in -linear.json), and the ahead-of-time compilation of the Triton kernels
(triton-aot-ptxas.json, written by `python -m capo_fast.kernels.aot --json ...`), and the per-GPU
memory budget and step cost model of the 7B config (capo_fast.memory_budget, capo_fast.gpu_cost),
the learning experiment (bench/learning_experiment.py), and the judge evaluation (judge-*.json, by
python -m capo_fast.evaluate_judge).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 2**20


def benchmarks(suffix: str):
    for path in sorted(RESULTS.glob(f"*{suffix}")):
        data = json.loads(path.read_text())
        for b in data.get("benchmarks", []):
            if "provider" in b["params"]:
                yield path.name, b  # the file name names the machine


def grouped(suffix: str, exclude: tuple[str, ...] = ()) -> dict[tuple[str, str], dict[str, dict]]:
    groups: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for name, b in benchmarks(suffix):
        if not name.endswith(exclude):
            groups[(name, b["group"])][b["params"]["provider"]] = b
    return groups


def policy_loss_table() -> str:
    lines = [
        "| results file | case | provider | median ms | vs torch | time / floor | GB/s | peak extra / logits |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, group), by_provider in grouped(".json", exclude=("-linear.json", "-trl.json")).items():
        base = by_provider.get("torch", {}).get("stats", {}).get("median")
        floor = by_provider.get("floor", {}).get("stats", {}).get("median")
        for provider in ("capo", "capo_inplace", "compile", "torch", "liger", "floor"):
            if provider not in by_provider:
                continue
            b = by_provider[provider]
            med, info = b["stats"]["median"], b["extra_info"]
            speedup = f"{base / med:.1f}x" if base and provider != "floor" else "-"
            over_floor = f"{med / floor:.2f}" if floor else "-"
            lines.append(
                f"| {name} | {group} | {provider} | {med * 1e3:.1f} | {speedup} | {over_floor} | "
                f"{info['gb_per_s']:.1f} | {info['peak_extra_over_logits']:.2f} |"
            )
    return "\n".join(lines)


def linear_table() -> str:
    lines = [
        "| results file | case | provider | median s | speed-up vs liger | peak extra MiB (own process) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for (name, group), by_provider in grouped("-linear.json").items():
        liger = by_provider.get("liger", {}).get("stats", {}).get("median")
        for provider in ("capo", "liger", "compile", "torch"):
            if provider not in by_provider:
                continue
            b = by_provider[provider]
            med = b["stats"]["median"]
            speedup = f"{liger / med:.2f}x" if liger and provider != "liger" else "-"
            peak = b["extra_info"]["peak_extra_bytes"] / MIB
            lines.append(f"| {name} | {group} | {provider} | {med:.2f} | {speedup} | {peak:.0f} |")
    return "\n".join(lines)


def trl_table() -> str:
    """bench/test_bench_trl.py: TRL's GRPOTrainer loss against capo_fast.integrations.trl."""
    lines = [
        "| results file | case | provider | median s | speed-up vs trl | peak extra MiB (own process) | vs trl |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (name, group), by_provider in grouped("-trl.json").items():
        trl = by_provider.get("trl")
        for provider in ("capo", "trl"):
            if provider not in by_provider:
                continue
            b = by_provider[provider]
            med, peak = b["stats"]["median"], b["extra_info"]["peak_extra_bytes"]
            speedup = f"{trl['stats']['median'] / med:.1f}x" if trl and provider != "trl" else "-"
            smaller = f"{trl['extra_info']['peak_extra_bytes'] / peak:.1f}x less" if trl and provider != "trl" else "-"
            lines.append(f"| {name} | {group} | {provider} | {med:.1f} | {speedup} | {peak / MIB:.0f} | {smaller} |")
    return "\n".join(lines)


def aot_table() -> str:
    path = RESULTS / "triton-aot-ptxas.json"
    if not path.exists():
        return "(no triton-aot-ptxas.json yet)"
    data = json.loads(path.read_text())
    lines = [
        f"Triton {data['triton']}; per kernel and target, the worst case over its compiled variants.",
        "",
        "| kernel | target | variants | warps | registers (max) | spill bytes | shared memory | occupancy (min) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in data["summary"]:
        lines.append(
            f"| `{s['kernel']}` | {s['target']} | {s['variants']} | {s['num_warps']} | {s['max_registers']} | "
            f"{s['spill_bytes']} | {s['max_smem_bytes']} B | {s['min_occupancy']:.0%} |"
        )
    return "\n".join(lines)


def memory_budget_table() -> str:
    from capo_fast.config import load_config
    from capo_fast.memory_budget import budget, markdown
    from capo_fast.model_shapes import QWEN25_7B

    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    return markdown(budget(config, QWEN25_7B, world=4))


def gpu_cost_table() -> str:
    from capo_fast.config import load_config
    from capo_fast.gpu_cost import cost_table
    from capo_fast.model_shapes import QWEN25_7B

    return cost_table(load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml"), QWEN25_7B, world=4)


def _learning_result() -> dict | None:
    paths = [p for p in sorted(RESULTS.glob("learning-*.json")) if not p.stem.endswith("-quick")]
    return json.loads(paths[0].read_text()) if paths else None


def _pm(mean: float, se: float | None) -> str:
    return f"{mean:.3f} ± {se:.3f}" if se is not None and math.isfinite(se) else f"{mean:.3f}"


def learning_table() -> str:
    """One row per arm of bench/learning_experiment.py: held-out accuracy before and after, the gain and
    whether it exceeds two standard errors, the mean over the evaluations after the start, steps to the
    threshold per seed, and the flagged-step rate of wrong rollouts."""
    result = _learning_result()
    if result is None:
        return "(no learning result yet: python bench/learning_experiment.py)"
    threshold = result["setup"]["threshold"]
    lines = [
        f"| arm | critic | before | after (± SE) | gain (± SE) | > 2 SE | mean of evals after start | "
        f"steps to {threshold:.2f} | minus GRPO-Rule (paired SE) | flagged steps of wrong rollouts |",
        "| --- | --- | ---: | ---: | ---: | :---: | ---: | --- | ---: | ---: |",
    ]
    versus = {"capo": result["capo_minus_grpo"], **result.get("noisy_minus_grpo", {})}
    for name, arm in result["arms"].items():
        overrides = dict(o[2:].split("=", 1) for o in arm["overrides"])
        if overrides.get("algorithm.reward_mode") == "outcome":
            critic = "none (GRPO-Rule)"
        else:
            n = overrides.get("critic.num_critiques", "1")
            noise = f"r={arm['critic_recall']}, f={arm['critic_false_flag']}"
            critic = f"N={n} {overrides.get('algorithm.voting', 'majority')}, {noise}"
        reached = ", ".join("-" if s is None else str(s) for s in arm["steps_to_threshold"])
        after = _pm(arm["accuracy_after"], arm["accuracy_after_se"])
        gain = f"{arm['gain']:+.3f} ± {arm['gain_se']:.3f}"
        learned = "yes" if arm["learned"] else "no"
        mean = _pm(*arm["mean_eval_accuracy_after_start"])
        diff = versus.get(name)
        ahead = f"{diff['mean_accuracy_diff']:+.3f} ± {diff['mean_accuracy_diff_paired_se']:.3f}" if diff else "-"
        lines.append(
            f"| {name} | {critic} | {arm['accuracy_before']:.3f} | {after} | {gain} | {learned} | {mean} | {reached} | "
            f"{ahead} | {arm['flagged_step_rate_incorrect']:.3f} |"
        )
    diff, seeds = result["capo_minus_grpo"], len(result["setup"]["seeds"])
    lines.append("")
    lines.append(
        f"CAPO minus GRPO-Rule: final accuracy {_pm(diff['final_accuracy_diff'], diff['final_accuracy_diff_se'])}, "
        f"mean of the evaluations after the start {_pm(diff['mean_accuracy_diff'], diff['mean_accuracy_diff_se'])} "
        f"(SEs of both arms in quadrature; paired by seed: ± {diff['final_accuracy_diff_paired_se']:.3f} and "
        f"± {diff['mean_accuracy_diff_paired_se']:.3f}; ahead in {diff['seeds_ahead']} of {seeds} seeds); "
        f"{seeds} seeds, {result['setup']['heldout_problems']} held-out problems, "
        f"{result['elapsed'].get('runs', 0)} runs of {result['elapsed'].get('run_minutes', float('nan')):.0f} "
        f"run-minutes in all, {result['setup'].get('parallel', 1)} at a time."
    )
    judge = result.get("self_judge")
    if judge:
        c = judge["confusion"]
        lines += [
            "",
            "| SmolLM2 as its own judge | value |",
            "| --- | ---: |",
            f"| rollouts, steps, steps with an equation a program can check | {judge['rollouts']}, {judge['steps']}, "
            f"{judge['steps_with_a_checkable_equation']} |",
            f"| flagged by both / judge only / program only / neither | {c['both']} / {c['judge_only']} / "
            f"{c['program_only']} / {c['neither']} |",
            f"| step agreement, judge precision, judge recall | {judge['step_agreement']:.2f}, "
            f"{judge['judge_precision']:.2f}, {judge['judge_recall']:.2f} |",
            f"| judge's verdict agrees with the verifier | {judge['verdict_agreement_with_verifier']:.2f} |",
        ]
    return "\n".join(lines)


def judge_table() -> str:
    """The step-flag metrics of each judge-*.json (capo_fast.evaluate_judge), with what its critiques cost."""
    from capo_fast.critics import CRITIC_BACKENDS, ChatCritic
    from capo_fast.evaluate_judge import summary, table

    blocks = []
    for path in sorted(RESULTS.glob("judge-*.json")):
        results = json.loads(path.read_text())
        j = results["judge"]
        decodes = issubclass(CRITIC_BACKENDS[j["backend"]], ChatCritic)  # a chat model's text, sampled as set
        decoding = f", {j['answer_format']}, T={j['sampling']['temperature']}" if decodes else ""
        blocks.append(
            f"`{path.name}`: {j['backend']} judge `{j['model']}`, N={j['num_critiques']}{decoding}, "
            f"min_valid_critiques={j['min_valid_critiques']}.\n\n{table(results)}\n\n{summary(results)}."
        )
    return "\n\n".join(blocks) or "(no judge evaluation yet: python -m capo_fast.evaluate_judge)"


def _run_record(name: str) -> dict | None:
    """The record bench/default_run.py wrote under --name `name` (any machine), or None."""
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{name}-*.json"))]
    return next((r for r in records if r.get("name") == name), None)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def default_run_paragraph() -> str:
    """The README's opening numbers: what `make train` showed when timed by bench/default_run.py (a cold and
    a warm cache), and what the LLM-judge run costs."""
    cold, warm, judge = (_run_record(s) for s in ("default-run", "default-run-warm", "smollm2-judge-run"))
    if cold is None:
        return "(not measured yet: python bench/default_run.py)"
    z = cold["change"] / cold["change_se"] if cold["change_se"] else float("nan")
    curve = ", ".join(f"{acc:.3f}" for _, acc in cold["heldout_curve"])
    text = (
        f"Measured ({cold['machine']}, `{cold['results_file']}`): held-out accuracy "
        f"{_pm(cold['accuracy_before'], cold['accuracy_before_se'])} before training and "
        f"{_pm(cold['accuracy_after'], cold['accuracy_after_se'])} after {cold['steps']} steps, on "
        f"{cold['heldout_problems']} held-out problems: {cold['change']:+.3f} ± {cold['change_se']:.3f}, {z:.1f} "
        f"standard errors (held-out accuracy every few steps: {curve}). The first run took "
        f"{_minutes(cold['wall_clock_s'])}, the policy's one-time warm-up included"
    )
    text += f"; a later run {_minutes(warm['wall_clock_s'])}." if warm else "."
    if judge:
        text += (
            f" The LLM-judge run (`{judge['command']}`) took {_minutes(judge['wall_clock_s'])} for "
            f"{judge['steps']} steps; its held-out accuracy went from {judge['accuracy_before']:.3f} to "
            f"{judge['accuracy_after']:.3f} on {judge['heldout_problems']} problems."
        )
    return text


TABLES = {
    "default-run": default_run_paragraph,
    "bench-table": policy_loss_table,
    "bench-linear-table": linear_table,
    "bench-trl-table": trl_table,
    "aot-table": aot_table,
    "memory-budget": memory_budget_table,
    "gpu-cost": gpu_cost_table,
    "learning-table": learning_table,
    "judge-table": judge_table,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="replace the tables in README.md")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    body = readme.read_text()
    for marker, render in TABLES.items():
        text = render()
        print(f"<!-- {marker} -->\n{text}\n")
        body = re.sub(
            rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", lambda m, t=text: m[1] + t + "\n" + m[2], body, flags=re.S
        )
    if args.write:
        readme.write_text(body)


if __name__ == "__main__":
    main()
