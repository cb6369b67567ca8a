"""Evaluation's scoring, shared by the evaluation command (capo_fast.evaluate) and training's evaluation.

Per set (`evaluate_set`): greedy pass@1 averaged over `options.runs` runs (also per `data_source` of the
rows) with its spread over the runs (population std, min and max, as the paper's Tables 11-12 report a
spread beside each mean), and with `options.samples` n the unbiased pass@k from n samples
(1 - C(n-c, k) / C(n, k), c of them correct; pass@1_sampled for k = 1) and maj@k (the most frequent final
answer among k samples is correct); mean response length and the fraction cut at max tokens. Each answer
is scored by training's r_v rule (`reward.outcome_reward`): a multiple-choice row on the letter of its
answer, every other row by the verifier. Run r of a multiple-choice set shuffles its options with
`run_seed(seed, r)` (`load_runs`); run 0 is what training's evaluation (one run, `evaluate_on_ranks`)
scores.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from capo_fast.config import SamplingConfig
from capo_fast.data import DataKeys, Problem, load_problems
from capo_fast.errors import ConfigError
from capo_fast.metrics import all_reduce_named
from capo_fast.reward import Answer, final_answer, outcome_rewards

Generate = Callable[..., list]  # (prompts, sampling, *, n, seeds) -> completions per prompt, as VLLMEngine.generate
Score = Callable[[list[str], list[str]], list]  # OutcomeVerifier.score


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class EvalOptions:
    runs: int = 3  # greedy runs averaged for pass@1
    samples: int = 0  # sampled answers per problem for pass@k / maj@k (0: none)
    ks: tuple[int, ...] = (1,)
    max_tokens: int = 3072
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0


def _correct(answers: Sequence[tuple[Problem, str]], score: Score) -> list[float]:
    """r_v of each (problem, response) by the rule of training (`reward.outcome_rewards`)."""
    return outcome_rewards([Answer(text, p.answer, p.correct_choice) for p, text in answers], score)[0]


class RunInputs(NamedTuple):
    """What one greedy run answers: the problems (multiple-choice options lettered for that run) and their
    prompt token ids, in the same order as every other run's."""

    problems: Sequence[Problem]
    prompts: Sequence[list[int]]


def run_seed(seed: int, run: int) -> int:
    """The seed that shuffles the multiple-choice options of evaluation run `run` (0-based)."""
    return seed + run


def evaluate_set(
    problems: Sequence[Problem],
    prompts: Sequence[list[int]],
    generate: Generate,
    score: Score,
    options: EvalOptions,
    *,
    later_runs: Sequence[RunInputs] = (),
) -> dict[str, float]:
    """The metrics of one set (the module docstring) for the prompts `generate` answers.

    Args:
        problems, prompts: what run 0 answers (and the sampled answers of pass@k / maj@k).
        later_runs: runs 1.. of a set whose options are reshuffled per run (`load_runs`), one per run
            after the first; empty: every run answers `problems`.
    """
    n = len(problems)
    if later_runs and len(later_runs) != options.runs - 1:
        raise ValueError(f"later_runs: {len(later_runs)} given for {options.runs} runs (expected {options.runs - 1})")
    if any(len(r.problems) != n or len(r.prompts) != n for r in later_runs):
        raise ValueError(f"later_runs: every run must answer the same {n} problems")
    runs = [RunInputs(problems, prompts), *later_runs] if later_runs else [RunInputs(problems, prompts)] * options.runs
    seeds = [options.seed * 1_000_003 + i for i in range(n)]
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=options.max_tokens)
    accuracy, lengths, truncated, per_problem_greedy = [], [], [], [0.0] * n
    for run, inputs in enumerate(runs):
        outs = [group[0] for group in generate(inputs.prompts, greedy, n=1, seeds=[s + run for s in seeds])]
        correct = _correct(list(zip(inputs.problems, (o.text for o in outs), strict=True)), score)
        accuracy.append(sum(correct) / max(n, 1))
        per_problem_greedy = [a + c / options.runs for a, c in zip(per_problem_greedy, correct, strict=True)]
        lengths += [len(o.token_ids) for o in outs]
        truncated += [o.finish_reason == "length" for o in outs]
    metrics = {
        "pass@1": sum(accuracy) / max(len(accuracy), 1),
        "pass@1_std": statistics.pstdev(accuracy) if accuracy else 0.0,
        "pass@1_min": min(accuracy, default=0.0),
        "pass@1_max": max(accuracy, default=0.0),
        "pass@1_runs": accuracy,
        "length": sum(lengths) / max(len(lengths), 1),
        "truncated": sum(truncated) / max(len(truncated), 1),
        "problems": n,
    }
    by_source: dict[str, list[float]] = {}  # verl and OpenRLHF report per data source
    for p, c in zip(problems, per_problem_greedy, strict=True):
        if p.data_source:
            by_source.setdefault(p.data_source, []).append(c)
    if by_source:
        metrics["by_source"] = {
            src: {"pass@1": sum(c) / len(c), "problems": len(c)} for src, c in sorted(by_source.items())
        }
    if options.samples:
        sampling = SamplingConfig(temperature=options.temperature, top_p=options.top_p, max_tokens=options.max_tokens)
        texts = [[c.text for c in group] for group in generate(prompts, sampling, n=options.samples, seeds=seeds)]
        # one verifier call for every sample, its verdicts (one per answer: `_correct` checks) regrouped per problem
        scored = iter(_correct([(p, t) for p, group in zip(problems, texts, strict=True) for t in group], score))
        correct = [[next(scored) for _ in group] for group in texts]
        for k in (k for k in options.ks if k <= options.samples):
            key = f"pass@{k}" if k > 1 else "pass@1_sampled"  # plain pass@1 is the greedy one (the paper's)
            metrics[key] = sum(pass_at_k(len(c), int(sum(c)), k) for c in correct) / max(n, 1)
            metrics[f"maj@{k}"] = sum(
                _majority_correct(t[:k], c[:k]) for t, c in zip(texts, correct, strict=True)
            ) / max(n, 1)
    return metrics


def evaluate_on_ranks(
    sets: dict[str, tuple[Sequence[Problem], Sequence[list[int]]]],
    generate: Generate,
    score: Score,
    options: EvalOptions,
    *,
    rank: int,
    world: int,
) -> dict[str, float]:
    """`eval/NAME/pass@1`, `length` and `truncated` of every set (problems, prompt ids) and, for a set of
    several data sources, `eval/NAME/SOURCE/pass@1`, each rank answering every `world`-th problem (one
    greedy run, as `evaluate_set`), the counts summed over the ranks by name."""
    metrics = {}
    for name, (problems, prompts) in sets.items():
        if not problems:
            continue
        local = evaluate_set(problems[rank::world], prompts[rank::world], generate, score, options)
        sources = sorted({p.data_source for p in problems if p.data_source})  # the same list on every rank
        n = local["problems"]
        counts = {"correct": local["pass@1"] * n, "length": local["length"] * n, "truncated": local["truncated"] * n}
        counts["problems"] = n
        for source in sources:
            mine = local.get("by_source", {}).get(source, {"pass@1": 0.0, "problems": 0})
            counts[f"source/{source}/correct"] = mine["pass@1"] * mine["problems"]
            counts[f"source/{source}/problems"] = mine["problems"]
        totals = all_reduce_named(counts)
        answered = max(totals["problems"], 1)
        metrics[f"eval/{name}/pass@1"] = totals["correct"] / answered
        metrics[f"eval/{name}/length"] = totals["length"] / answered
        metrics[f"eval/{name}/truncated"] = totals["truncated"] / answered
        if len(sources) > 1:
            for source in sources:
                count = max(totals[f"source/{source}/problems"], 1)
                metrics[f"eval/{name}/{source}/pass@1"] = totals[f"source/{source}/correct"] / count
    return metrics


def _majority_correct(texts: list[str], correct: list[float]) -> float:
    """Whether the most frequent stated answer (first among ties) is a correct one."""
    answers = [final_answer(t) for t in texts]
    counted = Counter(a for a in answers if a is not None)
    if not counted:
        return 0.0
    top = counted.most_common(1)[0][0]
    return correct[answers.index(top)]


def load_set(source: str, *, seed: int, limit: int = 0, keys: DataKeys | None = None) -> list[Problem]:
    """A set's problems (the first `limit`; generated sets: `limit` or 1000 of them); rows with options
    come as lettered multiple-choice questions, shuffled by `seed` (data.load_problems)."""
    problems = load_problems(source, size=limit or 1000, seed=seed, keys=keys or DataKeys())
    return problems[:limit] if limit else problems


def load_runs(
    source: str, *, seed: int, runs: int, limit: int = 0, keys: DataKeys | None = None
) -> list[list[Problem]]:
    """The problems each of `runs` evaluation runs answers: run r's options shuffled with `run_seed(seed, r)`
    (run 0 is `load_set(source, seed=seed)`); a set without multiple-choice rows is read once and every run
    answers the same list."""
    first = load_set(source, seed=seed, limit=limit, keys=keys)
    if not any(p.multiple_choice for p in first):
        return [first] * runs
    return [first] + [load_set(source, seed=run_seed(seed, r), limit=limit, keys=keys) for r in range(1, runs)]


def parse_sets(specs: Sequence[str]) -> dict[str, str]:
    """NAME=SOURCE specs (eval.sets, --sets) as {name: source}."""
    sets = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"eval.sets / --sets: expected NAME=SOURCE, got {spec!r}")
        sets[name] = source
    return sets
