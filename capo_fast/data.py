"""Prompt datasets: files (jsonl, parquet, saved HF datasets) and offline task generators.

A source string picks the loader: `gym:<task>[+<task>...]` generates reasoning-gym tasks offline,
anything else is a path. Every row becomes a `Problem`; a bad row fails with its file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

QUESTION_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "gold")
REFERENCE_KEYS = ("reference_solution", "solution")
EVAL_SEED_OFFSET = 1_000_003  # generated eval sets never share a seed with the train set

# Easy settings for the offline tasks so that a 135M model has something to learn.
GYM_TASK_SETTINGS: dict[str, dict] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "gsm_symbolic": {},
}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    reference_solution: str | None = None


class DataError(ValueError):
    """A data row or source that cannot be used; the message names the file and line."""


def _pick(row: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return None


def problem_from_row(row: object, where: str) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a question and an answer, got {type(row).__name__}")
    question, answer = _pick(row, QUESTION_KEYS), _pick(row, ANSWER_KEYS)
    if question is None:
        raise DataError(f"{where}: no question (one of the fields {', '.join(QUESTION_KEYS)})")
    if answer is None:
        raise DataError(f"{where}: no answer (one of the fields {', '.join(ANSWER_KEYS)})")
    return Problem(question, answer, _pick(row, REFERENCE_KEYS))


def _load_jsonl(path: Path) -> list[Problem]:
    problems = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            problems.append(problem_from_row(row, f"{path}:{number}"))
    return problems


def _load_parquet(path: Path) -> list[Problem]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [problem_from_row(row, f"{path}: row {i}") for i, row in enumerate(rows)]


def _load_hf_dataset(path: Path) -> list[Problem]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return [problem_from_row(row, f"{path}: row {i}") for i, row in enumerate(dataset)]


def _generate_gym(tasks: str, size: int, seed: int) -> list[Problem]:
    import reasoning_gym

    names = [t for t in tasks.split("+") if t]
    if not names:
        raise DataError(f"gym:{tasks}: name at least one reasoning-gym task")
    per_task = [
        reasoning_gym.create_dataset(name, size=size, seed=seed + i, **GYM_TASK_SETTINGS.get(name, {}))
        for i, name in enumerate(names)
    ]
    # Interleave the tasks so every batch mixes them.
    return [
        Problem(entry["question"], str(entry["answer"]), entry["metadata"].get("answer_cot"))
        for i in range(size)
        for entry in (dataset[i] for dataset in per_task)
    ][:size]


def load_problems(source: str, *, size: int, seed: int) -> list[Problem]:
    """Problems from `source` (see the module docstring); `size` and `seed` apply to generators."""
    if source.startswith("gym:"):
        try:
            return _generate_gym(source[4:], size, seed)
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{source}: {err}") from None
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder (or use gym:<task> for generated tasks)")
    if path.is_dir():
        problems = _load_hf_dataset(path)
    elif path.suffix == ".jsonl":
        problems = _load_jsonl(path)
    elif path.suffix == ".parquet":
        problems = _load_parquet(path)
    else:
        raise DataError(f"{source}: unknown format; use .jsonl, .parquet or a saved HF dataset folder")
    if not problems:
        raise DataError(f"{source}: holds no problems")
    return problems


def prompt_messages(problem: Problem, system_prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": problem.question}]


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat rendered by the tokenizer's template, ending where the assistant starts."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompts(tokenizer, problems: list[Problem], system_prompt: str) -> list[list[int]]:
    """Prompt token ids through the tokenizer's chat template, ready for generation."""
    return [chat_token_ids(tokenizer, prompt_messages(p, system_prompt)) for p in problems]


class PromptSampler:
    """Shuffled passes over the prompts, one permutation per epoch; its position is all it needs to resume."""

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts == 0:
            raise DataError("the training set is empty")
        self.num_prompts = num_prompts
        self.seed = seed
        self.consumed = 0
        self._cached: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(self.num_prompts, generator=generator))
        return self._cached[1]

    def next_batch(self, batch_size: int) -> list[int]:
        indices = []
        for position in range(self.consumed, self.consumed + batch_size):
            epoch, offset = divmod(position, self.num_prompts)
            indices.append(int(self._order(epoch)[offset]))
        self.consumed += batch_size
        return indices

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise DataError("the checkpoint was written for a different training set or seed")
        self.consumed = state["consumed"]
