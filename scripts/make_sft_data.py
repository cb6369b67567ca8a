"""SFT data for the Qwen setups: NuminaMath-CoT under the paper's system prompt, and TRL's SFT command for it.

    python scripts/make_sft_data.py --out-dir /data/numina-sft --model Qwen/Qwen2.5-1.5B \\
        --output-dir /models/Qwen2.5-1.5B-SFT-NuminaMath            # writes the data, prints the command
    python scripts/make_sft_data.py ... --run                         # ... and runs it (needs `pip install trl`)

The paper fine-tunes the Qwen2.5 base models on NuminaMath-CoT (lr 1e-5, batch 80) with the system prompt it
also uses for RL ("Please reason step by step, and put your final answer within \\boxed{}."), so the RL
policy starts from a model that has seen its prompt. Each row (`problem`, `solution`; NuminaMath's own
`messages` carry no system prompt) becomes one conversational prompt-completion example,

    {"prompt": [{"role": "system", ...}, {"role": "user", "content": problem}],
     "completion": [{"role": "assistant", "content": solution}]}

in `OUT_DIR/train.jsonl`, the folder TRL's script loads with `load_dataset(dataset_name)` and trains on
its `train` split (trl/scripts/sft.py); the loss covers the completion only, TRL's default for
prompt-completion data. The global batch is kept at 80: gradient accumulation = 80 / (GPUs x per-device
batch). TRL is imported by nothing here: the command runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capo_fast.data import HUB_SOURCE, read_rows
from capo_fast.errors import DataError
from capo_fast.evaluate import PAPER_SYSTEM_PROMPT

NUMINA = "AI-MO/NuminaMath-CoT@train"


@dataclass(frozen=True)
class SFTRecipe:
    """The paper's SFT settings (DESIGN.md: lr 1e-5, batch 80) and how they spread over the GPUs."""

    model: str
    output_dir: str
    gpus: int = 8
    per_device_batch: int = 10
    global_batch: int = 80
    lr: float = 1e-5
    epochs: int = 1  # not among the settings DESIGN.md quotes from the paper
    max_length: int = 4096  # prompt + solution tokens; TRL's own default (1024) would cut long solutions

    def accumulation(self) -> int:
        per_step = self.gpus * self.per_device_batch
        if self.gpus < 1 or self.per_device_batch < 1 or self.global_batch % per_step:
            raise ValueError(
                f"the global batch {self.global_batch} is not a multiple of {self.gpus} GPUs x "
                f"{self.per_device_batch} per device; pick --per-device-batch so that it is"
            )
        return self.global_batch // per_step


def sft_example(row: object, where: str, system_prompt: str = PAPER_SYSTEM_PROMPT) -> dict:
    """One NuminaMath-CoT row as a conversational prompt-completion example (module docstring)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with problem and solution, got {type(row).__name__}")
    for key in ("problem", "solution"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{where}: no {key} (NuminaMath-CoT rows have problem and solution text)")
    return {
        "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": row["problem"]}],
        "completion": [{"role": "assistant", "content": row["solution"]}],
    }


def _rows(source: str) -> Iterator[tuple[str, object]]:
    """Rows with where they are; a hub dataset is streamed from its cache rather than held as a list
    (NuminaMath-CoT has about 860k rows)."""
    if Path(source).exists() or not HUB_SOURCE.match(source):
        yield from read_rows(source)
        return
    from datasets import load_dataset

    m = HUB_SOURCE.match(source)
    try:
        dataset = load_dataset(m["repo"], m["config"], split=m["split"] or "train")
    except Exception as err:  # offline, unknown id or split: nothing is written
        raise DataError(f"{source}: the hub dataset could not be loaded ({type(err).__name__}: {err})") from None
    for i, row in enumerate(dataset):
        yield f"{source}: row {i}", row


def write_dataset(source: str, out_dir: Path, *, system_prompt: str = PAPER_SYSTEM_PROMPT, limit: int = 0) -> int:
    """Writes `out_dir/train.jsonl` from the first `limit` rows of `source` (0: all); returns the row count.
    A bad row stops the run naming its file and line, and leaves no partial file behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final, partial = out_dir / "train.jsonl", out_dir / "train.jsonl.partial"
    count = 0
    try:
        with partial.open("w") as f:
            for where, row in _rows(source):
                if limit and count == limit:
                    break
                f.write(json.dumps(sft_example(row, where, system_prompt), ensure_ascii=False) + "\n")
                count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(final)
    return count


def trl_command(data_dir: Path, recipe: SFTRecipe) -> list[str]:
    """TRL's SFT script under accelerate, one process per GPU (accelerate's `-m` runs it as a module)."""
    return [
        "accelerate", "launch", "--num_processes", str(recipe.gpus), "-m", "trl.scripts.sft",
        "--model_name_or_path", recipe.model,
        "--dataset_name", str(data_dir),
        "--learning_rate", str(recipe.lr),
        "--per_device_train_batch_size", str(recipe.per_device_batch),
        "--gradient_accumulation_steps", str(recipe.accumulation()),
        "--num_train_epochs", str(recipe.epochs),
        "--max_length", str(recipe.max_length),
        "--gradient_checkpointing",
        "--bf16",
        "--output_dir", recipe.output_dir,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/make_sft_data.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", default=NUMINA, help="NuminaMath-CoT: a hub id org/name[:config][@split] or a file")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder of the SFT data (train.jsonl)")
    parser.add_argument("--limit", type=int, default=0, help="first N rows only (0: all)")
    parser.add_argument("--system-prompt", default=PAPER_SYSTEM_PROMPT)
    parser.add_argument("--model", required=True, help="the base model to fine-tune, e.g. Qwen/Qwen2.5-1.5B")
    parser.add_argument("--output-dir", required=True, help="where TRL writes the fine-tuned model")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--per-device-batch", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--run", action="store_true", help="run the TRL command after writing the data")
    args = parser.parse_args(argv)
    recipe = SFTRecipe(
        args.model, args.output_dir, args.gpus, args.per_device_batch, epochs=args.epochs, max_length=args.max_length
    )
    try:
        command = trl_command(args.out_dir, recipe)  # a batch that does not split stops before the data is made
        if args.run and importlib.util.find_spec("trl") is None:
            raise DataError("--run needs TRL (pip install trl); without --run the command is only printed")
        count = write_dataset(args.source, args.out_dir, system_prompt=args.system_prompt, limit=args.limit)
    except ValueError as err:  # DataError is one
        print(f"make_sft_data: {err}", file=sys.stderr)
        return 2
    print(f"{count} examples: {args.out_dir / 'train.jsonl'}")
    print(shlex.join(command), flush=True)
    return subprocess.run(command, check=False).returncode if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
