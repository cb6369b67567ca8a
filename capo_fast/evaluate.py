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
import sys
from pathlib import Path

from capo_fast.config import load_config
from capo_fast.data import DataKeys, encode_prompts
from capo_fast.errors import ConfigError, DataError
from capo_fast.models import resolve_model
from capo_fast.reward import OutcomeVerifier
from capo_fast.scoring import EvalOptions, RunInputs, evaluate_set, load_runs, parse_sets

PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


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
