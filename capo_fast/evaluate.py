"""Evaluation as the paper reports it, for a base model and a trained one alike, and inside training.

    python -m capo_fast.evaluate --model Qwen/Qwen2.5-1.5B --runs 3 --samples 16 --k 1 8 16 \\
        --sets math500=HuggingFaceH4/MATH-500@test aime24=/data/aime24.jsonl --out results.json
    python -m capo_fast.evaluate --model runs/capo-qwen2.5-7b/final --config configs/gpu-qwen2.5-7b.yaml

`--config` takes the sets from the run config's eval.benchmarks (the GPU configs list the paper's seven)
and the system prompt from its data.system_prompt.

Per set: greedy pass@1 averaged over `--runs` runs (the paper: 3; also per `data_source` of the rows)
with its spread over the runs (population std, min and max, as the paper's Tables 11-12 report a
spread beside each mean), and with `--samples n` the unbiased
pass@k from n samples (1 - C(n-c, k) / C(n, k), c of them correct; pass@1_sampled for k = 1) and maj@k
(the most frequent final answer among k samples is correct); mean response length and the fraction
cut at max tokens. Multiple-choice rows (`choices`/`options` lists, ARC's choices with labels, GPQA's
correct and incorrect answers) have their options shuffled, lettered, and are scored on the letter of
the answer; run r shuffles with seed + r (`run_seed`), so the runs differ in the options' order as the
paper's shuffled out-of-domain sets do, and run 0 is what training's evaluation (one run) scores.

Engine: `--gpu-memory-utilization` (the evaluation owns the GPU: 0.9 by default) and
`--tensor-parallel-size` (GPUs of one engine; above 1 vLLM starts its own worker processes) go to vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from capo_fast.config import SamplingConfig
from capo_fast.data import DataKeys, Problem, encode_prompts, load_problems
from capo_fast.metrics import all_reduce_named
from capo_fast.models import resolve_model
from capo_fast.reward import final_answer, outcome_reward

PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

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
    """r_v of each (problem, response) by the rule of training (`reward.outcome_reward`); the verifier
    reads only the answers that are not multiple choice (a letter is scored on the letter)."""
    verifiable = [(p, text) for p, text in answers if not p.multiple_choice]
    scores = score([text for _, text in verifiable], [p.answer for p, _ in verifiable]) if verifiable else []
    verified = iter(s.correct for s in scores)
    return [
        outcome_reward(text, 0.0 if p.multiple_choice else next(verified), choice=p.correct_choice)
        for p, text in answers
    ]


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
    """The metrics of one set (module docstring) for the prompts `generate` answers.

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
        scored = iter(_correct([(p, t) for p, group in zip(problems, texts, strict=True) for t in group], score))
        correct = [[next(scored) for _ in group] for group in texts]  # one verifier call, scores per problem
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
    from capo_fast.errors import ConfigError

    sets = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"eval.sets / --sets: expected NAME=SOURCE, got {spec!r}")
        sets[name] = source
    return sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m capo_fast.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model folder or hub id (or smollm2 / tiny)")
    parser.add_argument("--sets", nargs="+", metavar="NAME=SOURCE", help="data sources as in data.train")
    parser.add_argument(
        "--config", type=Path, help="a run config: --sets default to its eval.benchmarks, --system-prompt to its data's"
    )
    parser.add_argument("--runs", type=int, default=3, help="greedy runs averaged for pass@1")
    parser.add_argument("--samples", type=int, default=0, help="sampled answers per problem for pass@k and maj@k")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="k of pass@k and maj@k (<= --samples)")
    parser.add_argument("--max-tokens", type=int, default=3072)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.6, help="of the sampled answers")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--system-prompt", help="the policy's system prompt (default: the paper's; '' for none)")
    parser.add_argument("--limit", type=int, default=0, help="first N problems of each set (0: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0, help="sampling seeds; run r shuffles options with seed + r")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="the engine's share of each GPU (vLLM's own default)"
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs of the engine (vLLM starts a worker per GPU above 1)"
    )
    parser.add_argument(
        "--question-key", default="", help="dotted path of the question in a row (as data.question_key)"
    )
    parser.add_argument("--answer-key", default="", help="dotted path of the gold answer (as data.answer_key)")
    parser.add_argument("--out", type=Path, default=Path("eval_results.json"))
    args = parser.parse_args(argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization: must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.tensor_parallel_size < 1:
        parser.error(f"--tensor-parallel-size: must be >= 1, got {args.tensor_parallel_size}")
    if args.runs < 1:
        parser.error(f"--runs: must be >= 1, got {args.runs}")
    if not args.sets and not args.config:
        parser.error("name the sets: --sets NAME=SOURCE ... or --config FILE (its eval.benchmarks)")
    return args


def _from_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fills --sets and --system-prompt from `--config` where the command line left them out."""
    if args.config is None:
        given = args.system_prompt  # "" is a choice (no system prompt), not a missing value
        return argparse.Namespace(**vars(args) | {"system_prompt": PAPER_SYSTEM_PROMPT if given is None else given})
    from capo_fast.config import load_config
    from capo_fast.errors import ConfigError

    config = load_config(args.config)
    sets = args.sets or config.eval.benchmarks
    if not sets:
        raise ConfigError(f"{args.config}: eval.benchmarks lists no sets (or pass --sets)")
    return argparse.Namespace(
        **vars(args) | {"sets": sets, "system_prompt": config.data.system_prompt if args.system_prompt is None
                        else args.system_prompt}
    )


def build_engine(args: argparse.Namespace, model: Path):
    """The generation engine of a standalone evaluation: awake all along (no training shares the GPU), its
    share of the GPU and tensor-parallel size from the command line. Above one GPU vLLM's own worker
    processes ("mp", what vLLM itself picks for several GPUs of one node: vllm/config/parallel.py:1035-1076)
    serve the engine, since no launcher started one process per GPU."""
    from capo_fast.engines import VLLMEngine

    return VLLMEngine(
        model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len, sleep_mode=False,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        executor_backend="mp" if args.tensor_parallel_size > 1 else "",
    )  # fmt: skip


def _summary(name: str, metrics: dict) -> str:
    shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("pass@1_"))
    runs = ", ".join(f"{a:.3f}" for a in metrics["pass@1_runs"])
    spread = f"(std {metrics['pass@1_std']:.3f}, runs {runs})"
    return f"{name}: {shown} {spread} ({metrics['problems']} problems)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from capo_fast.errors import ConfigError, DataError
    from capo_fast.reward import OutcomeVerifier

    try:
        args = _from_config(args)
        named = parse_sets(args.sets)
        keys = DataKeys(args.question_key, args.answer_key)
        sets = {
            name: load_runs(src, seed=args.seed, runs=args.runs, limit=args.limit, keys=keys)
            for name, src in named.items()
        }
        model = resolve_model(args.model)
    except (ConfigError, DataError) as err:
        print(f"capo-fast evaluate: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    engine = build_engine(args, model)
    options = EvalOptions(
        args.runs, args.samples, tuple(args.k), args.max_tokens, args.temperature, args.top_p, args.seed
    )
    results = {
        "model": args.model,
        "options": vars(args) | {"out": str(args.out), "config": str(args.config)},
        "sets": {},
    }
    with OutcomeVerifier(num_workers=2) as verifier:
        for name, per_run in sets.items():
            first, rest = per_run[0], per_run[1:]
            reshuffled = any(problems is not first for problems in rest)  # load_runs: multiple choice
            later = [RunInputs(p, encode_prompts(tokenizer, p, args.system_prompt)) for p in rest] if reshuffled else []
            prompts = encode_prompts(tokenizer, first, args.system_prompt)
            metrics = evaluate_set(first, prompts, engine.generate, verifier.score, options, later_runs=later)
            results["sets"][name] = metrics
            print(_summary(name, metrics), flush=True)
            for source, m in metrics.get("by_source", {}).items():
                print(f"  {source}: pass@1 {m['pass@1']:.3f} ({m['problems']} problems)", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
