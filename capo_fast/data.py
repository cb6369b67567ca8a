"""Prompt datasets: files (jsonl, json, csv, parquet), saved HF datasets, hub datasets, offline generators.

A source string picks the loader: `gym:<task>[+<task>...]` generates reasoning-gym tasks offline,
`chain:train` / `chain:heldout` the chain-arithmetic task of the default run (capo_fast.chain_arithmetic),
`org/name[:config][@split]` that is not a local path loads a hub dataset through `datasets`, anything
else is a path. Rows of verl (chat prompt, reward_model.ground_truth, data_source) and TRL/open-r1
(problem, solution) load as they are. Every row becomes a `Problem`; a bad row fails with its file and line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from capo_fast.chain_arithmetic import split_rows
from capo_fast.credit import Rollout
from capo_fast.errors import DataError
from capo_fast.reward import last_boxed
from capo_fast.text_files import read_utf8

QUESTION_KEYS = ("question", "problem", "prompt", "Question")  # the last: GPQA's rows
ANSWER_KEYS = ("answer", "final_answer", "gold", "reward_model.ground_truth", "answerKey")  # verl's, ARC's rows
# Multiple choice: a list of options (MMLU-Pro's `options`), or ARC's {"text": [...], "label": [...]};
# GPQA's rows name the correct option and the incorrect ones in columns of their own.
CHOICE_KEYS = ("choices", "options")
GPQA_CORRECT, GPQA_INCORRECT = "Correct Answer", ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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
    question: str  # the text the judge reads (the last user message of a chat prompt)
    answer: str
    reference_solution: str | None = None
    messages: tuple[dict, ...] | None = None  # a chat prompt as the data gives it, used as is
    data_source: str = ""  # kept for per-source metrics
    choices: tuple[str, ...] | None = None  # the options of a multiple-choice row, as the data orders them
    multiple_choice: bool = False  # lettered options in the question, the answer a letter

    @property
    def correct_choice(self) -> str | None:
        """The correct option's letter of a multiple-choice question; None for the rest."""
        return self.answer if self.multiple_choice else None


@dataclass
class PromptGroup:
    """One prompt of a step and its n rollouts, as they go through verify, critique, vote, credit and
    advantage together (the group is what Eq. 2 normalises over)."""

    problem: Problem
    prompt_ids: list[int]
    rollouts: list[Rollout] = field(default_factory=list)


@dataclass(frozen=True)
class DataKeys:
    """Where a row keeps its fields: dotted paths (`reward_model.ground_truth`); empty: the usual names
    (QUESTION_KEYS, ANSWER_KEYS, REFERENCE_KEYS; an answer may also come from the \\boxed{} of `solution`)."""

    question: str = ""
    answer: str = ""
    reference: str = ""
    instruction: str = ""  # data.strip_instruction: the INSTRUCTION_WRAPPERS entry stripped from questions


def _get(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        value = _get(row, key)
        if value not in (None, ""):
            return value
    return None


def row_field(row: dict, configured: str, usual: tuple[str, ...]):
    """The configured dotted path's value; where a row lacks it (an eval set of another shape than the
    training data), the usual names."""
    value = _get(row, configured) if configured else None
    return value if value not in (None, "") else _first(row, usual)


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _checked_text(text: str, where: str, what: str) -> str:
    """`text` itself; a lone surrogate (JSON's "\\ud800") is no text a tokenizer can read, so it stops here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = f"U+{ord(text[err.start]):04X}"
        raise DataError(f"{where}: the {what} holds a lone surrogate {char} at character {err.start}") from None
    return text


def _message_text(message: dict, where: str, index: int) -> str:
    """A chat message's content: text, or OpenAI-style content parts whose text parts are joined with a
    newline, as vLLM renders them (vllm/renderers/chat_utils.py:1588)."""
    content = message.get("content")
    what = f"content of message {index} ({message['role']})"
    if isinstance(content, (list, tuple)) and content and all(isinstance(part, dict) for part in content):
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise DataError(
                    f"{where}: the {what} has a part of type {part.get('type')!r}; only text parts are read"
                )
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise DataError(f"{where}: the {what} must be text or a list of text parts, got {_shown(content)}")
    return _checked_text(content, where, what)


def _chat_messages(prompt: list, where: str) -> tuple[dict, ...]:
    for i, m in enumerate(prompt):
        if not isinstance(m["role"], str):
            raise DataError(f"{where}: the role of message {i} must be text, got {_shown(m['role'])}")
    return tuple({"role": m["role"], "content": _message_text(m, where, i)} for i, m in enumerate(prompt))


def _checked_answer(answer, where: str):
    """The gold answer as the data gives it (text, or a number), refused when it states nothing: a list or
    mapping, true/false, NaN, blank text or an empty \\boxed{}."""
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if not (isinstance(answer, str) or (number and math.isfinite(answer))):
        raise DataError(f"{where}: the answer must be text or a finite number, got {_shown(answer)}")
    text = _checked_text(str(answer), where, "answer")
    boxed = last_boxed(text)
    if not text.strip() or (boxed is not None and not boxed.strip()):
        raise DataError(f"{where}: the answer {_shown(text)} is blank")
    return answer


def problem_from_row(row: object, where: str, keys: DataKeys = DataKeys()) -> Problem:
    """One row of any supported shape: plain (question/answer), verl (chat `prompt`,
    `reward_model.ground_truth`, `data_source`), TRL/open-r1 (`problem`, `solution` with a \\boxed{} answer)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a question and an answer, got {type(row).__name__}")
    prompt = row_field(row, keys.question, QUESTION_KEYS)
    if prompt is None:
        raise DataError(f"{where}: no question ({keys.question or 'one of ' + ', '.join(QUESTION_KEYS)})")
    messages = None
    if _is_chat(prompt):
        messages = _chat_messages(prompt, where)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: the chat prompt has no user message")
        question = users[-1]
    elif isinstance(prompt, str):
        question = _checked_text(prompt, where, "question")
    else:
        raise DataError(f"{where}: the question must be text or a list of chat messages, got {type(prompt).__name__}")
    if not question.strip():
        raise DataError(f"{where}: the question is blank")
    reference = row_field(row, keys.reference, REFERENCE_KEYS)
    answer = row_field(row, keys.answer, ANSWER_KEYS)
    choices, labels = _options(row)
    for i, option in enumerate(choices or ()):
        _checked_text(option, where, f"option {i}")
    if choices and answer in (None, "") and GPQA_CORRECT in row:
        answer = "A"  # GPQA: the correct option comes first in the data's order
    if answer is None and isinstance(reference, str):
        answer = last_boxed(reference)  # TRL / open-r1 rows: the answer is the solution's \boxed{}
    if answer in (None, ""):
        raise DataError(
            f"{where}: no answer ({keys.answer or 'one of ' + ', '.join(ANSWER_KEYS)}, or a \\boxed{{}} in solution)"
        )
    answer = _checked_answer(answer, where)
    if choices:
        answer = LETTERS[_correct_option(choices, labels, answer, where)]
    source = row.get("data_source")
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: the reference solution must be text, got {_shown(reference)}")
    reference = _checked_text(reference, where, "reference solution") if reference and reference.strip() else None
    return strip_instruction(Problem(question, str(answer), reference, messages, str(source or ""), choices), keys)


# Instruction wrappers some datasets put around every problem, as (prefix, suffix), stripped by
# data.strip_instruction so the policy and the judge read the problem under the paper's own system prompt.
# dapo: DAPO-Math-17k's rows (BytedTsinghua-SIA/DAPO-Math-17k; the example rows of its README) ask for a last
# line "Answer: $Answer", which contradicts the paper's \boxed{} answer.
INSTRUCTION_WRAPPERS: dict[str, tuple[str, str]] = {
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n",
        '\n\nRemember to put your answer on its own line after "Answer:".',
    ),
}


def strip_instruction(problem: Problem, keys: DataKeys) -> Problem:
    """The problem without the `keys.instruction` wrapper (INSTRUCTION_WRAPPERS), in its question and in the
    user messages of its chat prompt; each part of the wrapper goes where present, and a question without it
    (an evaluation set read with the training set's keys) is kept as it is."""
    if not keys.instruction:
        return problem
    if keys.instruction not in INSTRUCTION_WRAPPERS:
        raise DataError(f"data.strip_instruction: {keys.instruction!r} is not one of {sorted(INSTRUCTION_WRAPPERS)}")
    prefix, suffix = (part.strip() for part in INSTRUCTION_WRAPPERS[keys.instruction])

    def strip(text: str) -> str:
        text = text.strip()
        text = text.removeprefix(prefix).lstrip()
        return text.removesuffix(suffix).rstrip()

    messages = problem.messages
    if messages is not None:
        messages = tuple(m | {"content": strip(m["content"])} if m["role"] == "user" else m for m in messages)
    return replace(problem, question=strip(problem.question), messages=messages)


_OWN_LETTER = re.compile(r"^\(?([A-Z])\s*[).:]\s*")


def _options(row: dict) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """A multiple-choice row's options in the data's order and their labels (ARC's "A"/"1"), if it has any.

    Options that carry their own letters in order ("A)21", "B)28": AQuA) lose them: the options are
    shuffled and lettered again.
    """
    if GPQA_CORRECT in row and all(k in row for k in GPQA_INCORRECT):
        return tuple(str(row[k]).strip() for k in (GPQA_CORRECT, *GPQA_INCORRECT)), None
    value = _first(row, CHOICE_KEYS)
    labels = None
    if isinstance(value, dict) and isinstance(value.get("text"), (list, tuple)):
        labels = value.get("label")
        labels = tuple(str(x).strip() for x in labels) if isinstance(labels, (list, tuple)) else None
        value = value["text"]
    if not isinstance(value, (list, tuple)) or not value:
        return None, None
    options = tuple(str(x).strip() for x in value)
    own = [_OWN_LETTER.match(o) for o in options]
    if all(own) and [m[1] for m in own] == list(LETTERS[: len(options)]):
        labels = labels or tuple(m[1] for m in own)
        options = tuple(o[m.end() :] for o, m in zip(options, own, strict=True))
    return options, labels


def _correct_option(choices: tuple[str, ...], labels: tuple[str, ...] | None, answer, where: str) -> int:
    """Index of the correct option: an integer answer is a 0-based index (MMLU's `answer`); text is one
    of the data's labels, the option's own text, a letter, or else a 0-based index."""
    if len(choices) > len(LETTERS):
        raise DataError(f"{where}: {len(choices)} options; at most {len(LETTERS)} can be lettered")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    answer = str(answer).strip()
    if labels and answer in labels and len(labels) == len(choices):
        return labels.index(answer)
    if answer in choices:
        return choices.index(answer)
    own = _OWN_LETTER.match(answer)  # "B)28" where the options lost their own letters
    if own and own[1] in LETTERS[: len(choices)] and answer[own.end() :] == choices[LETTERS.index(own[1])]:
        return LETTERS.index(own[1])
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(answer.upper())
    if answer.isdigit() and int(answer) < len(choices):
        return int(answer)
    raise DataError(f"{where}: the answer {answer!r} is none of the {len(choices)} options, their labels or letters")


def as_multiple_choice(problem: Problem, seed: int, index: int) -> Problem:
    """The question with its options shuffled (by seed and the problem's index in its source) and
    lettered; the answer becomes the correct option's new letter. The data's chat messages are dropped:
    the options must be in what the policy reads."""
    import random

    order = list(range(len(problem.choices)))
    random.Random(seed * 1_000_003 + index).shuffle(order)
    options = "\n".join(f"{LETTERS[k]}. {problem.choices[i]}" for k, i in enumerate(order))
    question = f"{problem.question}\n\n{options}\n\nAnswer with the letter of the correct option."
    correct = LETTERS.index(problem.answer)
    return replace(
        problem, question=question, answer=LETTERS[order.index(correct)], messages=None, multiple_choice=True
    )


def _parsed_json(text: str, path: Path, line: int | None = None):
    """`text` as JSON; errors name the file and the line (`line`: where `text` starts, one JSON Lines row)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line or err.lineno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{line or 1}: JSON nested too deeply") from None


def _jsonl_rows(path: Path) -> list[tuple[str, object]]:
    # Lines end at "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() splits on.
    lines = read_utf8(path, DataError).split("\n")
    return [(f"{path}:{n}", _parsed_json(line, path, n)) for n, line in enumerate(lines, start=1) if line.strip()]


def _numbered(rows, where: str) -> list[tuple[str, object]]:
    return [(f"{where}: row {i}", row) for i, row in enumerate(rows)]


def _json_rows(path: Path) -> list[tuple[str, object]]:
    data = _parsed_json(read_utf8(path, DataError), path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows")
    return _numbered(data, str(path))


def _csv_rows(path: Path) -> list[tuple[str, object]]:
    import csv
    import io

    text = read_utf8(path, DataError)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a field (a long solution) may be as long as the file
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        start = reader.line_num + 1 if reader.fieldnames else 1  # a row is named by its first line
        for row in reader:
            rows.append((f"{path}:{start}", row))
            start = reader.line_num + 1
        return rows
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(path: Path) -> list[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    return _numbered(table.to_pylist(), str(path))


def _dataset_folder_rows(path: Path) -> list[tuple[str, object]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:  # datasets/load.py:1748-1750: neither a Dataset nor a DatasetDict folder
        raise DataError(f"{path}: a folder, but not a dataset saved with save_to_disk") from None
    if isinstance(dataset, DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return _numbered(dataset, str(path))


HUB_SOURCE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]%:-]+))?$"
)


def _hub_rows(source: str) -> list[tuple[str, object]]:
    """`org/name[:config][@split]` through `datasets.load_dataset` (split `train` by default)."""
    from datasets import load_dataset

    m = HUB_SOURCE.match(source)
    try:
        dataset = load_dataset(m["repo"], m["config"], split=m["split"] or "train")
    except Exception as err:  # offline, unknown id or split: the run stops before it starts
        raise DataError(f"{source}: the hub dataset could not be loaded ({type(err).__name__}: {err})") from None
    return _numbered(dataset, source)


ROW_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def read_rows(source: str) -> list[tuple[str, object]]:
    """The rows of a file, a saved HF dataset folder or a hub dataset, each with where it is (file:line)."""
    path = Path(source)
    if not path.exists() and HUB_SOURCE.match(source):
        rows = _hub_rows(source)
    elif not path.exists():
        raise DataError(f"{source}: no such file or folder, nor a hub id org/name (or use gym:<task>)")
    elif path.is_dir():
        rows = _dataset_folder_rows(path)
    elif path.suffix in ROW_READERS:
        rows = ROW_READERS[path.suffix](path)
    else:
        raise DataError(
            f"{source}: unknown format; use {', '.join(ROW_READERS)}, a saved HF dataset folder or a hub id"
        )
    if not rows:
        raise DataError(f"{source}: holds no rows")
    return rows


def _generate_gym(tasks: str, size: int, seed: int) -> list[Problem]:
    import reasoning_gym

    names = [t for t in tasks.split("+") if t]
    if not names:
        raise DataError(f"gym:{tasks}: name at least one reasoning-gym task")
    if size < 0:
        raise DataError(f"gym:{tasks}: cannot generate {size} problems")
    # reasoning-gym asserts size > 0: an empty set (data.num_eval=0) still checks the task names.
    per_task = [
        reasoning_gym.create_dataset(name, size=max(size, 1), seed=seed + i, **GYM_TASK_SETTINGS.get(name, {}))
        for i, name in enumerate(names)
    ]
    # Interleave the tasks so every batch mixes them.
    return [
        Problem(entry["question"], str(entry["answer"]), entry["metadata"].get("answer_cot"))
        for i in range(size)
        for entry in (dataset[i] for dataset in per_task)
    ][:size]


def _generate_chain(split: str, size: int, seed: int) -> list[Problem]:
    return [Problem(r["question"], r["answer"], r["reference_solution"]) for r in split_rows(split, size, seed)]


def is_generated(source: str) -> bool:
    """Whether `source` names an offline generator (its size is data.num_train / num_eval), not rows."""
    return source.startswith(("gym:", "chain:"))


def held_out_source(train: str) -> str:
    """Where held-out problems come from when data.eval is empty: the same generator (another seed for gym,
    the held-out split for the chain task), or none for files."""
    if train.startswith("gym:"):
        return train
    return "chain:heldout" if train.startswith("chain:") else ""


def load_problems(source: str, *, size: int, seed: int, keys: DataKeys = DataKeys()) -> list[Problem]:
    """Problems from `source` (see the module docstring); `size` and `seed` apply to generators, and `seed`
    shuffles the options of multiple-choice rows."""
    if source.startswith("chain:"):
        try:
            return _generate_chain(source[6:], size, seed)
        except ValueError as err:
            raise DataError(str(err)) from None
    if source.startswith("gym:"):
        try:
            return _generate_gym(source[4:], size, seed)
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{source}: {err}") from None
    problems = [problem_from_row(row, where, keys) for where, row in read_rows(source)]
    return [as_multiple_choice(p, seed, i) if p.choices else p for i, p in enumerate(problems)]


def prompt_messages(problem: Problem, system_prompt: str) -> list[dict]:
    """The chat the policy sees: the data's own messages when it has them (the system prompt added only
    when they bring none), else the system prompt and the question."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if problem.messages is not None:
        own = [dict(m) for m in problem.messages]
        return own if any(m["role"] == "system" for m in own) else system + own
    return system + [{"role": "user", "content": problem.question}]


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
