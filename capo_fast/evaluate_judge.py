"""How good a judge's step flags are, measured before training with it.

    python -m capo_fast.evaluate_judge --sets gsm8k=Qwen/ProcessBench@gsm8k [--config configs/X.yaml] \\
        [--section.key=value ...] [--limit 100] [--out judge_eval.json]

Rows are in ProcessBench's layout: `problem`; `steps`, a list of strings, or a `response` that
critic.step_splitter splits; and `label`, the index of the earliest wrong step, or -1 when every step is
right. A reference solution and the gold answer are optional; the judge sees them as it does in training.
The critic is built from the config exactly as training builds it: the same backend, prompt template,
guided decoding, sampling and N. It writes N critiques per solution once. Every voting mode that combines
sampled critiques is then scored at every N' <= N on those same critiques, averaged over the subsets of N'
of the N (`greedy`, one critique at temperature 0, is scored alone when the config votes with it).

Per voting mode and N', over the solutions:
  error_accuracy          erroneous solutions whose earliest flagged step is the labelled one (ProcessBench)
  correct_accuracy        correct solutions with no step flagged (ProcessBench)
  f1                      the harmonic mean of the two (ProcessBench's score)
  wrong_step_flag_rate    the labelled wrong step's mean vote weight: the step-level true positive rate
  steps_before_flag_rate  the same over the steps before it, which are right: the false positive rate
  correct_solution_flag_rate  the same over every step of the correct solutions
  verdict_agreement       the majority verdict (Yes: correct) agrees with the label
  votes_not_counted       fewer valid critiques than algorithm.min_valid_critiques: no step penalty
A step's weight is the penalty share CAPO gives it (0 or 1; `average` gives fractions); a step with any
weight counts as flagged. A solution without a vote counts as a miss in both accuracies (ProcessBench's
rule for an answer it cannot read) and gives its steps weight 0 (training's rule); a missing verdict
never agrees. A critique that says "Yes" and writes no block is valid and flags nothing, as in training.
Per critique: how often it says the solution is correct (and names steps all the same, which training
penalises), abstentions (neither a block nor a "Yes"), failures (no answer), out-of-range indices, and
the judge's tokens and seconds.
Beside the results JSON: a PNG of the flag rates by mode and N', and every critique's text (.critiques.jsonl).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from capo_fast.config import Config, load_config
from capo_fast.critics import Critic, CritiqueRequest
from capo_fast.critique import FAILED, VOTING, Critique, Step, majority_judgment, vote
from capo_fast.data import ANSWER_KEYS, QUESTION_KEYS, REFERENCE_KEYS, read_rows, row_field
from capo_fast.errors import ConfigError, DataError

PROBLEM_KEYS = ("problem", *(k for k in QUESTION_KEYS if k != "problem"))  # ProcessBench's name first
MAX_SUBSETS = 64  # subsets of N' critiques averaged per N'; past it, a seeded sample of them
BATCH = 256  # solutions per call of the critic (each request keeps its own seed whatever the batching)


@dataclass(frozen=True)
class AnnotatedKeys:
    """Where a row keeps its fields: dotted paths; empty: ProcessBench's names, then the data loader's."""

    problem: str = ""
    steps: str = ""
    response: str = ""
    label: str = ""
    reference: str = ""
    answer: str = ""


@dataclass(frozen=True)
class AnnotatedSolution:
    request: CritiqueRequest
    label: int  # the earliest wrong step; -1: every step is right
    where: str  # file:line of the row


def _steps_of(listed: Sequence) -> list[Step]:
    """Steps given as a list, laid end to end as a blank-line separated response."""
    steps, start = [], 0
    for k, text in enumerate(listed):
        text = str(text)
        steps.append(Step(k, start, start + len(text), text))
        start += len(text) + 2
    return steps


def _step_index(value) -> int | None:
    """An integer label as JSON, parquet (int or float) or CSV (text) carry it; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value if isinstance(value, int) else None


def annotated_from_row(row: object, where: str, keys: AnnotatedKeys, split) -> AnnotatedSolution:
    """One annotated solution; a row that cannot be one raises DataError naming `where` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    problem = row_field(row, keys.problem, PROBLEM_KEYS)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: no problem text ({keys.problem or 'one of ' + ', '.join(PROBLEM_KEYS)})")
    listed = row_field(row, keys.steps, ("steps",))
    response = row_field(row, keys.response, ("response", "completion"))
    if isinstance(listed, (list, tuple)) and listed:
        steps = _steps_of(listed)
    elif isinstance(response, str) and response.strip():
        try:
            steps = split(response)
        except Exception as err:  # a user's splitter: name the row it failed on
            raise DataError(f"{where}: critic.step_splitter failed on {keys.response or 'response'}: {err}") from None
    else:
        raise DataError(f"{where}: no steps (a non-empty list in {keys.steps or 'steps'}) and no response text "
                        f"({keys.response or 'response'}) to split")  # fmt: skip
    given = row_field(row, keys.label, ("label",))
    label = _step_index(given)
    if label is None or not -1 <= label < len(steps):
        split_note = "" if listed else f" (the response splits into {len(steps)} steps by critic.step_splitter)"
        raise DataError(
            f"{where}: {keys.label or 'label'} must be -1 (every step right) or a step index in [0, {len(steps)}), "
            f"got {given!r}{split_note}"
        )
    reference, answer = row_field(row, keys.reference, REFERENCE_KEYS), row_field(row, keys.answer, ANSWER_KEYS)
    request = CritiqueRequest(
        problem, steps, str(reference) if reference else None, str(answer) if answer not in (None, "") else None
    )
    return AnnotatedSolution(request, label, where)


def load_annotated(source: str, keys: AnnotatedKeys, split, limit: int = 0) -> list[AnnotatedSolution]:
    """The annotated solutions of a file, a saved dataset folder or a hub dataset (the first `limit`)."""
    rows = read_rows(source)
    rows = rows[:limit] if limit else rows
    return [annotated_from_row(row, where, keys, split) for where, row in rows]


# ---- scoring -----------------------------------------------------------------------------------------


def subsets(n: int, k: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Every k of n critique indices, or a seeded sample of MAX_SUBSETS of them when there are more."""
    if math.comb(n, k) <= MAX_SUBSETS:
        return list(itertools.combinations(range(n), k))
    rng, chosen = random.Random(seed * 1009 + k), set()
    while len(chosen) < MAX_SUBSETS:
        chosen.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(chosen)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def score_mode(
    solutions: Sequence[AnnotatedSolution],
    critiques: Sequence[Sequence[Critique]],
    mode: str,
    k: int,
    *,
    threshold: float = 0.5,
    min_valid: int = 1,
    seed: int = 0,
) -> dict[str, float | None]:
    """The module docstring's per-mode metrics for `mode` reading k of each solution's critiques, averaged
    over the subsets of k; min_valid is capped at k, as a run with N = k would have to set it."""
    sums: Counter[str] = Counter()
    chosen = subsets(len(critiques[0]) if critiques else k, k, seed)  # run_judge gives every solution N
    for subset in chosen:
        for solution, per_solution in zip(solutions, critiques, strict=True):
            picked = [per_solution[i] for i in subset]
            weights = vote(picked, len(solution.request.steps), mode, threshold, min(min_valid, k))
            w, label = weights.weights, solution.label
            # ProcessBench counts an answer it cannot read as wrong: a vote that does not count is a miss.
            earliest = next((s for s, x in enumerate(w) if x > 0), -1) if weights.counted else None
            if label >= 0:
                sums["error_hits"] += earliest == label
                sums["wrong_step"] += w[label]
                sums["before"] += sum(w[:label])
            else:
                sums["correct_hits"] += earliest == -1
                sums["correct_steps"] += sum(w)
            sums["verdict"] += majority_judgment(picked) == (label == -1)  # a missing verdict never agrees
            sums["uncounted"] += not weights.counted
    runs = len(chosen)
    erroneous = sum(s.label >= 0 for s in solutions)
    correct = len(solutions) - erroneous
    before = sum(max(s.label, 0) for s in solutions)
    correct_steps = sum(len(s.request.steps) for s in solutions if s.label < 0)
    error_acc, correct_acc = _ratio(sums["error_hits"], runs * erroneous), _ratio(sums["correct_hits"], runs * correct)
    f1 = None
    if error_acc is not None and correct_acc is not None:
        f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc) if error_acc + correct_acc else 0.0
    return {
        "error_accuracy": error_acc,
        "correct_accuracy": correct_acc,
        "f1": f1,
        "wrong_step_flag_rate": _ratio(sums["wrong_step"], runs * erroneous),
        "steps_before_flag_rate": _ratio(sums["before"], runs * before),
        "correct_solution_flag_rate": _ratio(sums["correct_steps"], runs * correct_steps),
        "verdict_agreement": _ratio(sums["verdict"], runs * len(solutions)),
        "votes_not_counted": _ratio(sums["uncounted"], runs * len(solutions)),
        "subsets": runs,
    }


def critique_stats(critiques: Sequence[Sequence[Critique]]) -> dict[str, float | None]:
    """Per critique: judged the solution correct (and named steps all the same), abstained (wrote no
    block and did not say "Yes"), failed (no text at all: a server error, a prompt too long for
    critic.max_model_len), named an index the solution does not have."""
    flat = [c for per in critiques for c in per]
    return {
        "critiques": len(flat),
        "says_correct_rate": _ratio(sum(c.judgment is True for c in flat), len(flat)),
        # the prompt asks for no list with "Yes"; a critique that names steps anyway still penalises them
        "names_steps_saying_correct_rate": _ratio(
            sum(c.judgment is True and bool(c.incorrect) for c in flat), len(flat)
        ),
        "abstention_rate": _ratio(sum(not c.valid and c.text is not None for c in flat), len(flat)),
        "failure_rate": _ratio(sum(c.text is None and not c.valid for c in flat), len(flat)),
        "out_of_range_rate": _ratio(sum(c.out_of_range > 0 for c in flat), len(flat)),
    }


def modes_to_score(config: Config) -> list[str]:
    """A mode that decodes its own way (greedy: one critique at temperature 0) is scored alone; else every
    mode that combines sampled critiques is, on the same critiques."""
    configured = config.algorithm.voting
    if VOTING[configured].temperature is not None:
        return [configured]
    return [name for name, mode in VOTING.items() if mode.temperature is None and mode.num_critiques is None]


def score_set(solutions, critiques, config: Config) -> dict:
    a, n = config.algorithm, config.critic.num_critiques
    modes = {}
    for mode in modes_to_score(config):
        needed = VOTING[mode].num_critiques
        modes[mode] = {
            str(k): score_mode(
                solutions, critiques, mode, k, threshold=a.vote_threshold, min_valid=a.min_valid_critiques,
                seed=config.trainer.seed,
            )
            for k in range(1, n + 1)
            if needed in (None, k)
        }  # fmt: skip
    return {
        "solutions": len(solutions),
        "erroneous": sum(s.label >= 0 for s in solutions),
        "steps": sum(len(s.request.steps) for s in solutions),
        "critique": critique_stats(critiques),
        "modes": modes,
    }


# ---- running the judge --------------------------------------------------------------------------------


def run_judge(critic: Critic, solutions: Sequence[AnnotatedSolution], seed: int, progress=print):
    """N critiques per solution, in batches; returns them with the judge's seconds per critique asked and
    tokens per critique answered. A solution given fewer than N (a function critic's choice) has the rest
    failed, as training counts them; more than N are cut to N."""
    n = critic.config.num_critiques
    critiques: list[list[Critique]] = []
    tokens_before, start = critic.tokens_generated, time.perf_counter()
    for first in range(0, len(solutions), BATCH):
        batch = [s.request for s in solutions[first : first + BATCH]]
        critiques += [(list(c) + [FAILED] * n)[:n] for c in critic.critique(batch, seed=seed + first * n)]
        critic.sleep()
        progress(f"  judged {len(critiques)}/{len(solutions)} solutions ({time.perf_counter() - start:.0f} s)")
    answered = sum(c.text is not None or c.valid for per in critiques for c in per)
    tokens = None if tokens_before is None else critic.tokens_generated - tokens_before
    return critiques, {
        "seconds_per_critique": _ratio(time.perf_counter() - start, n * len(solutions)),
        "tokens_per_critique": None if tokens is None else _ratio(tokens, answered),
    }


def critique_records(name: str, solutions: Sequence[AnnotatedSolution], critiques) -> list[dict]:
    """What the judge wrote for each solution, beside its label: to read where it goes wrong."""
    return [
        {
            "set": name,
            "row": s.where,
            "label": s.label,
            "steps": len(s.request.steps),
            "critiques": [
                {"text": c.text, "incorrect_steps": sorted(c.incorrect) if c.valid else None, "judgment": c.judgment}
                for c in per
            ],
        }
        for s, per in zip(solutions, critiques, strict=True)
    ]


def judge_description(config: Config, critic: Critic) -> dict:
    """The judge's settings, so that the results say what produced them (the sampling as the critic uses it)."""
    c = config.critic
    return {
        "backend": c.backend,
        "model": c.backend_class().judge_name(c, config.model.path),
        "num_critiques": c.num_critiques,
        "answer_format": c.answer_format,
        "prompt_template": c.prompt_template or "packaged (capo_fast/prompts/critic.txt)",
        "sampling": asdict(critic.config.sampling),
        "include_reference": c.include_reference,
        "guided_reasoning_chars": c.guided_reasoning_chars,
        "max_model_len": c.max_model_len,
        "step_splitter": c.step_splitter or "blank lines",
        "seed": config.trainer.seed,
        "voting": config.algorithm.voting,
        "vote_threshold": config.algorithm.vote_threshold,
        "min_valid_critiques": config.algorithm.min_valid_critiques,
    }


# ---- reporting ----------------------------------------------------------------------------------------

COLUMNS = (
    ("f1", "F1"),
    ("error_accuracy", "err acc"),
    ("correct_accuracy", "corr acc"),
    ("wrong_step_flag_rate", "flag wrong"),
    ("steps_before_flag_rate", "flag before"),
    ("correct_solution_flag_rate", "flag corr sol"),
    ("verdict_agreement", "verdict"),
    ("votes_not_counted", "no vote"),
)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: dict) -> str:
    """The results as a Markdown table: one row per set, voting mode and N'."""
    lines = [
        "| set | mode | N' | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(COLUMNS),
    ]
    for name, result in results["sets"].items():
        for mode, by_k in result["modes"].items():
            for k, m in by_k.items():
                lines.append(f"| {name} | {mode} | {k} | " + " | ".join(_cell(m[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """Per set: its size and what the critiques themselves were."""
    out = []
    for name, r in results["sets"].items():
        c = r["critique"]
        tokens = "-" if c.get("tokens_per_critique") is None else f"{c['tokens_per_critique']:.0f}"
        out.append(
            f"{name}: {r['solutions']} solutions ({r['erroneous']} with an error, {r['steps']} steps); "
            f"{c['critiques']} critiques: said correct {_cell(c['says_correct_rate'])} (naming steps all the same "
            f"{_cell(c['names_steps_saying_correct_rate'])}), "
            f"abstained {_cell(c['abstention_rate'])}, failed {_cell(c['failure_rate'])}, "
            f"out-of-range index {_cell(c['out_of_range_rate'])}; {tokens} tokens and "
            f"{_cell(c.get('seconds_per_critique'))} s per critique"
        )
    return "\n".join(out)


def plot(results: dict, out: Path) -> Path:
    """Flag rates on the wrong step (solid) and on the right steps before it (dashed), and F1, by N' per mode."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    sets = list(results["sets"].items())
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False, constrained_layout=True)
    for (name, result), (rates, f1) in zip(sets, axes, strict=True):
        for index, (mode, by_k) in enumerate(result["modes"].items()):
            color = f"C{index}"
            ks = [int(k) for k in by_k]
            for key, style, label in (
                ("wrong_step_flag_rate", "-", f"{mode}: wrong step"),
                ("steps_before_flag_rate", "--", f"{mode}: steps before it"),
            ):
                points = [(k, m[key]) for k, m in zip(ks, by_k.values(), strict=True) if m[key] is not None]
                if points:
                    rates.plot(*zip(*points, strict=True), style, color=color, marker="o", label=label)
            points = [(k, m["f1"]) for k, m in zip(ks, by_k.values(), strict=True) if m["f1"] is not None]
            if points:
                f1.plot(*zip(*points, strict=True), "-", color=color, marker="o", label=mode)
        ticks = sorted({int(k) for by_k in result["modes"].values() for k in by_k})
        rates.set(title=f"{name}: flag rate (vote weight)", xlabel="N' critiques", ylim=(-0.02, 1.02), xticks=ticks)
        f1.set(title=f"{name}: ProcessBench F1", xlabel="N' critiques", ylim=(-0.02, 1.02), xticks=ticks)
        for ax in (rates, f1):
            if ax.lines:  # a set without correct or erroneous solutions has no F1
                ax.legend(fontsize=7)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


# ---- command line -------------------------------------------------------------------------------------


KEY_DEFAULTS = {
    "problem": "default: data.question_key, else problem, question, ...",
    "steps": "default: steps",
    "response": "default: response, completion",
    "label": "default: label",
    "reference": "default: data.reference_key, else reference_solution, solution",
    "answer": "default: data.answer_key, else answer, final_answer, ...",
}


def annotated_keys(args, config: Config) -> AnnotatedKeys:
    """The command line's key names, else the run config's data keys, as the data loader reads them."""
    d = config.data
    pick = lambda given, configured="": configured if given is None else given  # noqa: E731
    return AnnotatedKeys(
        pick(args.problem_key, d.question_key), pick(args.steps_key), pick(args.response_key), pick(args.label_key),
        pick(args.reference_key, d.reference_key), pick(args.answer_key, d.answer_key),
    )  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m capo_fast.evaluate_judge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sets", nargs="+", required=True, metavar="NAME=SOURCE", help="annotated solutions")
    parser.add_argument("--config", type=Path, default=None, help="the run config whose critic to evaluate")
    parser.add_argument("--limit", type=int, default=0, help="first N solutions of each set (0: all)")
    parser.add_argument("--out", type=Path, default=Path("judge_eval.json"), help="results JSON (the PNG beside it)")
    for name, default in KEY_DEFAULTS.items():
        parser.add_argument(f"--{name}-key", default=None, help=f"dotted path of the {name} in a row ({default})")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from capo_fast.console import quiet_libraries
    from capo_fast.critics import build_critic
    from capo_fast.critique import make_splitter
    from capo_fast.models import resolve_model
    from capo_fast.scoring import parse_sets

    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides)
        if args.limit < 0:
            raise ConfigError(f"--limit: must be >= 0 (0: every solution), got {args.limit}")
        keys = annotated_keys(args, config)
        split = make_splitter(config.critic.step_splitter)
        sets = {name: load_annotated(src, keys, split, args.limit) for name, src in parse_sets(args.sets).items()}
        judge = None
        if config.critic.backend_class().local_model:
            key = "critic.model" if config.critic.model else "model.path (the judge when critic.model is empty)"
            judge = resolve_model(config.critic.model or config.model.path, key=key)
    except (ConfigError, DataError) as err:
        print(f"capo-fast evaluate_judge: {err}", file=sys.stderr)
        return 2
    quiet_libraries(config.logging.verbosity)
    critic = build_critic(config.critic, judge, voting=config.algorithm.voting, dtype=config.model.dtype,
                          seed=config.trainer.seed)  # fmt: skip
    results = {"judge": judge_description(config, critic), "sets": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    critiques_path = args.out.with_suffix(".critiques.jsonl")
    critiques_path.write_text("")
    for name, solutions in sets.items():
        print(f"{name}: {len(solutions)} solutions, {config.critic.num_critiques} critiques each", flush=True)
        bare = sum(s.request.ground_truth() is None for s in solutions)
        if bare and config.critic.include_reference:
            print(f"  {bare} of them carry no reference solution or answer: the judge sees none, where in training "
                  f"it sees one (--reference-key / --answer-key name them)", flush=True)  # fmt: skip
        critiques, cost = run_judge(critic, solutions, config.trainer.seed, lambda line: print(line, flush=True))
        results["sets"][name] = score_set(solutions, critiques, config)
        results["sets"][name]["critique"].update(cost)
        # training always shows the judge a reference solution or the gold answer; ProcessBench rows have neither
        results["sets"][name]["without_ground_truth"] = bare
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # a set done is kept, whatever comes next
        with critiques_path.open("a") as f:
            f.writelines(json.dumps(record) + "\n" for record in critique_records(name, solutions, critiques))
        failed = results["sets"][name]["critique"]["failure_rate"] or 0.0
        if failed > config.critic.max_failure_rate:  # training would stop here too
            print(f"capo-fast evaluate_judge: {name}: {failed:.0%} of critiques failed (critic.max_failure_rate="
                  f"{config.critic.max_failure_rate}); the judge is unreachable or its prompts exceed "
                  f"critic.max_model_len. Results so far: {args.out}", file=sys.stderr)  # fmt: skip
            return 1
    print(table(results))
    print(summary(results))
    png = plot(results, args.out.with_suffix(".png"))
    print(f"results: {args.out}, {png}; what the judge wrote: {critiques_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
