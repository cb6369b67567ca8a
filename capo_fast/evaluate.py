"""Evaluation as the paper reports it, for a base model and a trained one alike, and inside training.

    python -m capo_fast.evaluate --model Qwen/Qwen2.5-1.5B --runs 3 --samples 16 --k 1 8 16 \\
        --sets math500=HuggingFaceH4/MATH-500@test aime24=/data/aime24.jsonl --out results.json

Per set: greedy pass@1 averaged over `--runs` runs (the paper: 3; also per `data_source` of the rows),
and with `--samples n` the unbiased
pass@k from n samples (1 - C(n-c, k) / C(n, k), c of them correct; pass@1_sampled for k = 1) and maj@k
(the most frequent final answer among k samples is correct); mean response length and the fraction
cut at max tokens. Multiple-choice rows (`choices`/`options` lists, ARC's choices with labels, GPQA's
correct and incorrect answers) have their options shuffled with the seed, lettered, and are scored on
the letter of the answer.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from capo_fast.config import SamplingConfig
from capo_fast.data import DataKeys, Problem, encode_prompts, load_problems
from capo_fast.reward import final_answer

PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")

Generate = Callable[..., list]  # (prompts, sampling, *, n, seeds) -> completions per prompt, as VLLMEngine.generate
Score = Callable[[list[str], list[str]], list]  # OutcomeVerifier.score


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def choice_letter(response: str) -> str | None:
    stated = final_answer(response)
    if stated is None:
        return None
    inner = re.sub(r"^\\boxed\{(.*)\}$|^\$(.*)\$$", lambda m: m[1] or m[2] or "", stated).strip()
    inner = re.sub(r"^\\text\{(.*)\}$", r"\1", inner).strip()
    m = _LETTER.match(inner)
    return m[1] if m else None


@dataclass(frozen=True)
class EvalOptions:
    runs: int = 3  # greedy runs averaged for pass@1
    samples: int = 0  # sampled answers per problem for pass@k / maj@k (0: none)
    ks: tuple[int, ...] = (1,)
    max_tokens: int = 3072
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0


def is_correct(problem: Problem, text: str, verified: float) -> float:
    """r_v of one answer, in training and evaluation alike: the option letter for multiple choice,
    `verified` (the verifier's score) for the rest."""
    return float(choice_letter(text) == problem.answer) if problem.multiple_choice else verified


def _correct(problems: Sequence[Problem], texts: list[str], score: Score) -> list[float]:
    """1/0 per answer (`is_correct`); the verifier sees only the rows that are not multiple choice."""
    math_rows = [i for i, p in enumerate(problems) if not p.multiple_choice]
    verified = [0.0] * len(texts)
    scores = score([texts[i] for i in math_rows], [problems[i].answer for i in math_rows]) if math_rows else []
    for i, s in zip(math_rows, scores, strict=True):
        verified[i] = s.correct
    return [is_correct(p, t, v) for p, t, v in zip(problems, texts, verified, strict=True)]


def evaluate_set(
    problems: Sequence[Problem], prompts: Sequence[list[int]], generate: Generate, score: Score, options: EvalOptions
) -> dict[str, float]:
    """The metrics of one set (module docstring) for the prompts `generate` answers."""
    n = len(problems)
    seeds = [options.seed * 1_000_003 + i for i in range(n)]
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=options.max_tokens)
    accuracy, lengths, truncated, per_problem_greedy = [], [], [], [0.0] * n
    for run in range(options.runs):
        outs = [group[0] for group in generate(prompts, greedy, n=1, seeds=[s + run for s in seeds])]
        correct = _correct(problems, [o.text for o in outs], score)
        accuracy.append(sum(correct) / max(n, 1))
        per_problem_greedy = [a + c / options.runs for a, c in zip(per_problem_greedy, correct, strict=True)]
        lengths += [len(o.token_ids) for o in outs]
        truncated += [o.finish_reason == "length" for o in outs]
    metrics = {
        "pass@1": sum(accuracy) / max(len(accuracy), 1),
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
        groups = generate(prompts, sampling, n=options.samples, seeds=seeds)
        flat = [(i, c.text) for i, g in enumerate(groups) for c in g]
        correct = _correct([problems[i] for i, _ in flat], [t for _, t in flat], score)
        per_problem = [correct[i * options.samples : (i + 1) * options.samples] for i in range(n)]
        texts = [[t for _, t in flat[i * options.samples : (i + 1) * options.samples]] for i in range(n)]
        for k in (k for k in options.ks if k <= options.samples):
            key = f"pass@{k}" if k > 1 else "pass@1_sampled"  # plain pass@1 is the greedy one (the paper's)
            metrics[key] = sum(pass_at_k(len(c), int(sum(c)), k) for c in per_problem) / max(n, 1)
            metrics[f"maj@{k}"] = sum(
                _majority_correct(t[:k], c[:k]) for t, c in zip(texts, per_problem, strict=True)
            ) / max(n, 1)
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


def parse_sets(specs: Sequence[str]) -> dict[str, str]:
    from capo_fast.config import ConfigError

    sets = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"eval.sets / --sets: expected NAME=SOURCE, got {spec!r}")
        sets[name] = source
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capo_fast.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model folder or hub id (or smollm2 / tiny)")
    parser.add_argument("--sets", nargs="+", required=True, metavar="NAME=SOURCE", help="data sources as in data.train")
    parser.add_argument("--runs", type=int, default=3, help="greedy runs averaged for pass@1")
    parser.add_argument("--samples", type=int, default=0, help="sampled answers per problem for pass@k and maj@k")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="k of pass@k and maj@k (<= --samples)")
    parser.add_argument("--max-tokens", type=int, default=3072)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.6, help="of the sampled answers")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--system-prompt", default=PAPER_SYSTEM_PROMPT)
    parser.add_argument("--limit", type=int, default=0, help="first N problems of each set (0: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0, help="sampling seeds and the shuffling of options")
    parser.add_argument(
        "--question-key", default="", help="dotted path of the question in a row (as data.question_key)"
    )
    parser.add_argument("--answer-key", default="", help="dotted path of the gold answer (as data.answer_key)")
    parser.add_argument("--out", type=Path, default=Path("eval_results.json"))
    args = parser.parse_args(argv)

    from capo_fast.config import ConfigError
    from capo_fast.data import DataError
    from capo_fast.reward import OutcomeVerifier
    from capo_fast.rollout import VLLMEngine
    from capo_fast.train import resolve_model

    try:
        named = parse_sets(args.sets)
        keys = DataKeys(args.question_key, args.answer_key)
        sets = {name: load_set(src, seed=args.seed, limit=args.limit, keys=keys) for name, src in named.items()}
        model = resolve_model(args.model)
    except (ConfigError, DataError) as err:
        print(f"capo-fast evaluate: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    engine = VLLMEngine(model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len, sleep_mode=False)
    options = EvalOptions(
        args.runs, args.samples, tuple(args.k), args.max_tokens, args.temperature, args.top_p, args.seed
    )
    results = {"model": args.model, "options": vars(args) | {"out": str(args.out)}, "sets": {}}
    with OutcomeVerifier(num_workers=2) as verifier:
        for name, problems in sets.items():
            prompts = encode_prompts(tokenizer, problems, args.system_prompt)
            metrics = evaluate_set(problems, prompts, engine.generate, verifier.score, options)
            results["sets"][name] = metrics
            shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{name}: {shown} ({metrics['problems']} problems)", flush=True)
            for source, m in metrics.get("by_source", {}).items():
                print(f"  {source}: pass@1 {m['pass@1']:.3f} ({m['problems']} problems)", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
