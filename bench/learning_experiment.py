"""Does capo-fast learn, and when does step credit beat outcome-only reward? A controlled CPU experiment.

    python bench/learning_experiment.py                # the whole experiment (about an hour on 2 cores)
    python bench/learning_experiment.py --quick        # one seed, two arms, a few steps (the slow test)

The task, its step critic and the warmed-up policy are in capo_fast/chain_arithmetic.py. Every arm is an
ordinary run of the training loop (`deepspeed capo_fast/train.py --config bench/chain_arithmetic.yaml`);
the arms differ in their overrides and in the critic's noise only. Arms, each over several seeds:
  grpo, capo                     GRPO-Rule against CAPO (C=2, P=1) with an accurate critic (questions 1, 2)
  noisy-N{1,2,4,8}-{voting}      CAPO with a noisy critic (recall r, false flags f), N critiques combined
                                 by intersection or majority (question 3; for N=2 they are the same)
  self-judge                     SmolLM2-135M-Instruct as policy and judge for a few steps; its flags
                                 against the program's (question 4)
Finished runs are kept under --work and not run again, so an interrupted experiment resumes. Results:
bench/results/learning-<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capo_fast.chain_arithmetic import equation_error, questions, warm_up_policy, write_split  # noqa: E402
from capo_fast.config import load_config  # noqa: E402

CONFIG = ROOT / "bench" / "chain_arithmetic.yaml"
CONTRASTS = [("capo", "noisy-N1"), ("noisy-N8-majority", "noisy-N8-intersection"), ("noisy-N8-majority", "noisy-N1")]


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()
    recall: float = 1.0  # r of the critic
    false_flag: float = 0.0  # f of the critic
    group: str = "credit"  # credit: question 2; noise: question 3


@dataclass
class Setup:
    work: Path
    steps: int
    seeds: list[int]
    eval_every: int
    num_eval: int
    warmup_steps: int
    recall: float
    false_flag: float
    parallel: int
    threshold: float
    arms: list[Arm] = field(default_factory=list)


def arms_for(recall: float, false_flag: float, quick: bool) -> list[Arm]:
    arms = [Arm("grpo", ("--algorithm.reward_mode=outcome",)), Arm("capo")]
    if quick:
        return arms
    arms.append(Arm("noisy-N1", ("--critic.num_critiques=1",), recall, false_flag, "noise"))
    for n in (2, 4, 8):
        # A strict majority of 2 is both of them: N=2 majority is the N=2 intersection arm, not run twice.
        for voting in ("intersection",) if n == 2 else ("intersection", "majority"):
            overrides = (f"--critic.num_critiques={n}", f"--algorithm.voting={voting}")
            arms.append(Arm(f"noisy-N{n}-{voting}", overrides, recall, false_flag, "noise"))
    return arms


def check_stamp(setup: Setup) -> None:
    """The work folder keeps the data, the policy and finished runs of one setup: reusing them under
    other settings would mix runs that are not comparable."""
    stamp = {"steps": setup.steps, "eval_every": setup.eval_every, "num_eval": setup.num_eval,
             "warmup_steps": setup.warmup_steps, "recall": setup.recall, "false_flag": setup.false_flag}  # fmt: skip
    path = setup.work / "setup.json"
    if path.exists() and json.loads(path.read_text()) != stamp:
        raise SystemExit(f"{setup.work} holds runs of another setup ({path.read_text().strip()}); "
                         "pass another --work or delete it")  # fmt: skip
    setup.work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp) + "\n")


# ---- running the arms ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores(slot: int, per: int) -> str:
    first = slot * per
    return str(first) if per == 1 else f"{first}-{first + per - 1}"


def launch(out: Path, overrides: list[str], env: dict[str, str], log: Path) -> None:
    """One training run under the deepspeed launcher; raises naming the log when it fails."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "1", "--master_port", str(_free_port()),
               str(ROOT / "capo_fast" / "train.py"), "--config", str(CONFIG), f"--logging.output_dir={out}",
               *overrides]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    with log.open("w") as f:
        result = subprocess.run(command, cwd=ROOT, env=environment, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run {out} failed (exit {result.returncode}); its log: {log}\n{tail}")


def finished(out: Path) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.exists() and "eval/accuracy_final" in metrics.read_text()


def run_arms(setup: Setup, data: dict[str, Path], policy: Path) -> None:
    """Every (arm, seed) run, `setup.parallel` at a time, each pinned to its own cores."""
    per = max(len(os.sched_getaffinity(0)) // setup.parallel, 1)
    slots: Queue[int] = Queue()
    for slot in range(setup.parallel):
        slots.put(slot)
    common = [
        f"--model.path={policy}", f"--data.train={data['train']}", f"--data.eval={data['heldout']}",
        f"--data.num_eval={setup.num_eval}", f"--trainer.steps={setup.steps}", f"--eval.every={setup.eval_every}",
    ]  # fmt: skip

    def one(arm: Arm, seed: int) -> None:
        out = setup.work / arm.name / f"seed{seed}"
        if finished(out):
            return
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts again from step 0, with empty logs
        slot = slots.get()
        try:
            env = {"CHAIN_CRITIC_RECALL": str(arm.recall), "CHAIN_CRITIC_FALSE_FLAG": str(arm.false_flag),
                   "OMP_NUM_THREADS": str(per), "VLLM_CPU_OMP_THREADS_BIND": _cores(slot, per)}  # fmt: skip
            start = time.perf_counter()
            launch(out, [*common, f"--trainer.seed={seed}", *arm.overrides], env, out.with_suffix(".log"))
            print(f"  {arm.name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            slots.put(slot)

    jobs = [(arm, seed) for seed in setup.seeds for arm in setup.arms]
    for job in jobs:
        (setup.work / job[0].name).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(setup.parallel) as pool:
        for future in [pool.submit(one, *job) for job in jobs]:
            future.result()


# ---- summarising -----------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (NaN for one seed)."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def mean_and_se(values: list[float], heldout_variance: float) -> tuple[float, float]:
    """Mean over seeds and its SE from two sources in quadrature: the spread over seeds, and the finite
    held-out set (every seed is scored on the same problems, so that part does not shrink with seeds)."""
    mean, seed_se = mean_se(values)
    return mean, math.sqrt((seed_se if math.isfinite(seed_se) else 0.0) ** 2 + heldout_variance)


def binomial_variance(p: float, n: int) -> float:
    return p * (1 - p) / n


def read_run(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    train = [r for r in rows if "actor/loss" in r]
    return {
        "eval_steps": sorted(evals),
        "eval_accuracy": [evals[s] for s in sorted(evals)],
        "train_accuracy": [r["reward/accuracy"] for r in train],
        "flagged_step_rate_incorrect": [r.get("credit/flagged_step_rate_incorrect", 0.0) for r in train],
        "flagged_step_rate_correct": [r.get("credit/flagged_step_rate_correct", 0.0) for r in train],
    }


def summarise_arm(setup: Setup, arm: Arm) -> dict:
    runs = {seed: read_run(setup.work / arm.name / f"seed{seed}") for seed in setup.seeds}
    steps = runs[setup.seeds[0]]["eval_steps"]
    curves = [runs[s]["eval_accuracy"] for s in setup.seeds]
    n = setup.num_eval

    def at(values: list[float]) -> tuple[float, float]:  # mean ± SE of one evaluation over seeds
        return mean_and_se(values, binomial_variance(sum(values) / len(values), n))

    before, after = [c[0] for c in curves], [c[-1] for c in curves]
    accuracy_before, accuracy_after = at(before), at(after)
    gains = [a - b for a, b in zip(after, before, strict=True)]
    # Before and after are both estimates on 200 problems: both variances count (conservative, as the
    # problems are the same ones and the two estimates are positively correlated).
    gain, gain_se = mean_and_se(
        gains, binomial_variance(accuracy_after[0], n) + binomial_variance(accuracy_before[0], n)
    )
    reached = [next((st for st, a in zip(steps, c, strict=True) if a >= setup.threshold), None) for c in curves]
    by_step = [at([c[i] for c in curves]) for i in range(len(steps))]
    later = [sum(c[1:]) / max(len(c) - 1, 1) for c in curves]  # mean of the evaluations after the start
    train_curves = [runs[s]["train_accuracy"] for s in setup.seeds]

    def pooled(key: str) -> float:  # over every step of every seed
        values = [v for s in setup.seeds for v in runs[s][key]]
        return sum(values) / max(len(values), 1)

    return {
        "overrides": list(arm.overrides),
        "critic_recall": arm.recall,
        "critic_false_flag": arm.false_flag,
        "group": arm.group,
        "eval_steps": steps,
        "eval_accuracy_mean": [m for m, _ in by_step],
        "eval_accuracy_se": [s for _, s in by_step],
        "accuracy_before": accuracy_before[0],
        "accuracy_after": accuracy_after[0],
        "accuracy_after_se": accuracy_after[1],
        "gain": gain,
        "gain_se": gain_se,
        "learned": gain > 2 * gain_se,  # question 1: after above before by more than two standard errors
        "mean_eval_accuracy_after_start": mean_and_se(later, binomial_variance(sum(later) / len(later), n)),
        "steps_to_threshold": reached,
        "train_accuracy_mean": [sum(v) / len(v) for v in zip(*train_curves, strict=True)],
        "flagged_step_rate_incorrect": pooled("flagged_step_rate_incorrect"),
        "flagged_step_rate_correct": pooled("flagged_step_rate_correct"),
        "per_seed": {str(s): runs[s] for s in setup.seeds},
    }


def compare(a: dict, b: dict) -> dict:
    """a - b in final accuracy and in mean accuracy over the evaluations after the start. Two SEs: the
    arms' SEs in quadrature (conservative), and the SE of the per-seed differences (seed k of both arms
    draws the same prompts; this one leaves out the held-out set's sampling, which both arms share)."""

    def per_seed(arm: dict) -> list[tuple[float, float]]:  # (final, mean after start) per seed
        curves = [arm["per_seed"][k]["eval_accuracy"] for k in sorted(arm["per_seed"])]
        return [(c[-1], sum(c[1:]) / max(len(c) - 1, 1)) for c in curves]

    pairs = list(zip(per_seed(a), per_seed(b), strict=True))
    final, final_paired_se = mean_se([x[0] - y[0] for x, y in pairs])
    area, area_paired_se = mean_se([x[1] - y[1] for x, y in pairs])
    return {
        "final_accuracy_diff": final,
        "final_accuracy_diff_se": math.hypot(a["accuracy_after_se"], b["accuracy_after_se"]),
        "final_accuracy_diff_paired_se": final_paired_se,
        "mean_accuracy_diff": area,
        "mean_accuracy_diff_se": math.hypot(
            a["mean_eval_accuracy_after_start"][1], b["mean_eval_accuracy_after_start"][1]
        ),
        "mean_accuracy_diff_paired_se": area_paired_se,
        "seeds_ahead": sum(x[1] > y[1] for x, y in pairs),  # seeds whose mean after the start is higher
    }


# ---- question 4: SmolLM2 judging its own rollouts ----------------------------------------------------


def self_judge(setup: Setup, data: dict[str, Path], steps: int) -> dict:
    """SmolLM2-135M-Instruct as policy and judge (the default run's pipeline) on this task; its step flags
    against the program's on every step that holds an equation a program can check."""
    out = setup.work / "self-judge"
    if not finished(out):
        overrides = [
            "--model.path=smollm2", f"--data.train={data['train']}", "--data.num_eval=0", f"--trainer.steps={steps}",
            "--trainer.prompts_per_step=4", "--rollout.n=4", "--rollout.sampling.max_tokens=160",
            "--rollout.sampling.temperature=0.7", "--rollout.max_model_len=1024", "--critic.backend=vllm",
            "--critic.function=", "--critic.num_critiques=2", "--critic.max_model_len=2048",
            "--critic.sampling.max_tokens=256", "--trainer.lr=2e-6", "--trainer.micro_batch_tokens=1024",
            "--data.system_prompt=Solve the problem step by step, one calculation per step. Separate steps with a "
            "blank line. Put the final answer in \\boxed{}.",
            f"--logging.rollout_samples={4 * 4}", "--eval.every=0",
        ]  # fmt: skip
        launch(out, overrides, {}, out.with_suffix(".log"))
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    rows = [r for r in rows if any(c["valid"] for c in r["critiques"])]  # a failed judge flags nothing
    confusion = {"both": 0, "judge_only": 0, "program_only": 0, "neither": 0}
    verdicts = agree = steps_seen = 0
    for row in rows:
        for critique in row["critiques"]:
            if critique["judgment"] is not None:
                verdicts += 1
                agree += critique["judgment"] == bool(row["correct"])
        for step in row["steps"]:
            steps_seen += 1
            wrong = equation_error(step["text"])
            if wrong is None:
                continue
            flagged = step["vote"] > 0.5
            key = "both" if flagged and wrong else "judge_only" if flagged else "program_only" if wrong else "neither"
            confusion[key] += 1
    checked = sum(confusion.values())
    return {
        "rollouts": len(rows),
        "steps": steps_seen,
        "steps_with_a_checkable_equation": checked,
        "confusion": confusion,
        "step_agreement": ratio(confusion["both"] + confusion["neither"], checked),
        "judge_precision": ratio(confusion["both"], confusion["both"] + confusion["judge_only"]),
        "judge_recall": ratio(confusion["both"], confusion["both"] + confusion["program_only"]),
        "verdict_agreement_with_verifier": ratio(agree, verdicts),
        "train_accuracy": [r["reward/accuracy"] for r in map(json.loads, (out / "metrics.jsonl").open())
                           if "actor/loss" in r],
    }  # fmt: skip


def ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", re.M)


def elapsed(logs: list[Path]) -> dict:
    """From the launcher's timestamps in the runs' logs: wall time from the first start to the last end,
    and the sum of the runs' own times (what one run at a time would take)."""
    spans = []
    for log in logs:
        stamps = [datetime.fromisoformat(t) for t in _STAMP.findall(log.read_text())] if log.exists() else []
        if stamps:
            spans.append((min(stamps), max(stamps)))
    if not spans:
        return {}
    return {"wall_minutes": (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds() / 60,
            "run_minutes": sum((e - s).total_seconds() for s, e in spans) / 60, "runs": len(spans)}  # fmt: skip


def finite(value):
    """NaN -> None, so the JSON is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_result(result: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
    plot(finite(result), stem.with_suffix(".png"))


# ---- the plot --------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = result["critic_noise"]
    groups = [("credit", "accurate critic: CAPO vs GRPO-Rule"),
              ("noise", f"noisy critic (r={noise['recall']}, f={noise['false_flag']}), GRPO-Rule dashed")]  # fmt: skip
    groups = [(g, t) for g, t in groups if any(a["group"] == g for a in result["arms"].values())]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (group, title) in zip(axes[0], groups, strict=True):
        for name, arm in result["arms"].items():
            if arm["group"] != group and not (group == "noise" and name == "grpo"):
                continue
            steps, mean, se = arm["eval_steps"], arm["eval_accuracy_mean"], arm["eval_accuracy_se"]
            se = [0.0 if s is None or math.isnan(s) else s for s in se]  # one seed: no band
            line = ax.plot(steps, mean, marker="o", ms=3, label=name, ls="--" if name == "grpo" else "-")[0]
            low, high = [m - s for m, s in zip(mean, se, strict=True)], [m + s for m, s in zip(mean, se, strict=True)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
        ax.set(title=title, xlabel="training step", ylabel="held-out greedy accuracy (seeds' mean ± SE)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machine", default="cpu-2core-x86_64", help="names the result files")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where JSON and PNG go")
    parser.add_argument("--work", type=Path, default=None, help="runs, data and the policy (runs/learning[-quick])")
    parser.add_argument("--quick", action="store_true", help="one seed, grpo and capo, 4 steps: the slow test")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--recall", type=float, default=0.7, help="r of the noisy critic")
    parser.add_argument("--false-flag", type=float, default=0.3, help="f of the noisy critic")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, each on its share of the cores")
    parser.add_argument("--threshold", type=float, default=0.6, help="accuracy for steps-to-threshold")
    parser.add_argument("--self-judge-steps", type=int, default=3, help="0 skips question 4")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.parallel < 1:
        parser.error("--seeds, --steps and --parallel must be at least 1")

    quick = args.quick
    work = args.work or ROOT / "runs" / ("learning-quick" if quick else "learning")
    setup = Setup(
        work=work, steps=4 if quick else args.steps, seeds=[0] if quick else list(range(args.seeds)),
        eval_every=2 if quick else 5, num_eval=40 if quick else 200, warmup_steps=150 if quick else 900,
        recall=args.recall, false_flag=args.false_flag, parallel=args.parallel, threshold=args.threshold,
    )  # fmt: skip
    setup.arms = arms_for(args.recall, args.false_flag, quick)
    data_dir = setup.work / "data"
    data = {  # the warm-up's demonstrations forget 60% of carries; RL prompts and held-out problems are apart
        "sft": data_dir / "sft.jsonl", "train": data_dir / "train.jsonl", "heldout": data_dir / "heldout.jsonl",
    }  # fmt: skip
    check_stamp(setup)
    if not data["heldout"].exists():
        write_split(data["sft"], 8000, seed=1, slip=0.6)
        write_split(data["train"], 2000, seed=3)
        seen = questions(data["sft"]) | questions(data["train"])
        write_split(data["heldout"], setup.num_eval, seed=2, exclude=seen)  # never seen in training
    if not (setup.work / "policy" / "warmup.json").exists():
        print(f"warming up the policy ({setup.warmup_steps} supervised steps) ...", flush=True)
    policy = warm_up_policy(setup.work / "policy", data["sft"], steps=setup.warmup_steps)
    print(f"{len(setup.arms)} arms x {len(setup.seeds)} seeds, {setup.steps} steps each, {setup.parallel} at a time",
          flush=True)  # fmt: skip
    run_arms(setup, data, policy)

    arms = {arm.name: summarise_arm(setup, arm) for arm in setup.arms}
    config = load_config(CONFIG)
    result = {
        "machine": args.machine,
        "command": " ".join(["python bench/learning_experiment.py", *(sys.argv[1:] if argv is None else argv)]),
        "setup": {
            "steps": setup.steps,
            "seeds": setup.seeds,
            "eval_every": setup.eval_every,
            "heldout_problems": setup.num_eval,
            "parallel": setup.parallel,
            "prompts_per_step": config.trainer.prompts_per_step,
            "rollouts_per_prompt": config.rollout.n,
            "warmup": json.loads((policy / "warmup.json").read_text()),
            "config": str(CONFIG.relative_to(ROOT)),
            "threshold": setup.threshold,
        },  # fmt: skip
        "critic_noise": {"recall": setup.recall, "false_flag": setup.false_flag},
        "arms": arms,
        "capo_minus_grpo": compare(arms["capo"], arms["grpo"]),
        "noisy_minus_grpo": {name: compare(arm, arms["grpo"]) for name, arm in arms.items() if arm["group"] == "noise"},
        # question 3's contrasts: what noise costs, and N = 8 under each voting mode
        "contrasts": {f"{x} minus {y}": compare(arms[x], arms[y]) for x, y in CONTRASTS if x in arms and y in arms},
        "elapsed": elapsed([setup.work / a.name / f"seed{s}.log" for a in setup.arms for s in setup.seeds]),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"learning-{args.machine}" + ("-quick" if quick else "")
    write_result(result, args.results / stem)  # before question 4, whose failure must not lose the arms
    if args.self_judge_steps and not quick:
        print(f"SmolLM2-135M-Instruct judging its own rollouts ({args.self_judge_steps} steps) ...", flush=True)
        try:
            result["self_judge"] = self_judge(setup, data, args.self_judge_steps)
            result["self_judge"]["elapsed"] = elapsed([setup.work / "self-judge.log"])
        except (RuntimeError, OSError) as err:
            result["self_judge"] = {"error": str(err)}
            print(f"self-judge run failed: {err}", file=sys.stderr)
        write_result(result, args.results / stem)
    for name, arm in arms.items():
        print(f"{name:24s} before {arm['accuracy_before']:.3f}  after {arm['accuracy_after']:.3f} "
              f"± {arm['accuracy_after_se']:.3f}  gain {arm['gain']:+.3f} ± {arm['gain_se']:.3f}  "
              f"learned={arm['learned']}")  # fmt: skip
    print(f"results: {args.results / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
