"""A task whose steps a program can check, its step critic, and a small policy warmed up on it.

Each problem is a chain of operations ("Start with 7. Add 5. Multiply by 3. Subtract 4."); a solution
writes one equation per step ("7 + 5 = 12"), steps separated by blank lines, and ends with
"The answer is \\boxed{32}.". The critic (`critic.backend=function`, `critic.function=
capo_fast.chain_arithmetic:critique`) judges a rollout the way DESIGN.md 1.3 asks of a GenPRM: "Yes" when the
final answer is right, otherwise "No" and the wrong steps, each judged on its own (a step that applies the
right operation correctly to an earlier wrong result is not wrong). Its noise is set by environment
variables, so the training loop runs it like any other critic:
  CHAIN_CRITIC_RECALL       r: probability that a critique names a truly wrong step (default 1)
  CHAIN_CRITIC_FALSE_FLAG   f: probability that it names a correct step of a wrong solution (default 0)
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from capo_fast.critique import Critique
from capo_fast.reward import verify_answer

OPERATIONS = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
MAX_VALUE = 99
# Results go below zero once a forgotten carry has been carried on (2 - 5 = -3): signed numbers throughout.
_EQUATION = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"^\s*The answer is \\boxed\{(-?\d+)\}\.\s*$")
_START = re.compile(r"Start with (\d+)\.")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class Chain:
    start: int
    operations: tuple[tuple[str, int], ...]  # (symbol, operand) per step

    @property
    def values(self) -> list[int]:
        values = [self.start]
        for op, b in self.operations:
            values.append(apply(values[-1], op, b))
        return values

    def question(self) -> str:
        names = {symbol: name for name, symbol in OPERATIONS.items()}
        ops = " ".join(f"{names[op]} {b}." for op, b in self.operations)
        return f"Start with {self.start}. {ops} What is the result?"

    def solution(self, rng: random.Random | None = None, slip: float = 0.0) -> str:
        """The worked solution; with `rng`, each step that needs a carry or a borrow forgets it with
        probability `slip` (the demonstrator's systematic error), and later steps go on from the result
        written, as a student would."""
        value, steps = self.start, []
        for op, b in self.operations:
            result = apply(value, op, b)
            if rng is not None and needs_carry(value, op, b) and rng.random() < slip:
                result = forgot_carry(value, op, b)
            steps.append(f"{value} {op} {b} = {result}")
            value = result
        return "\n\n".join([*steps, f"The answer is \\boxed{{{value}}}."])


def needs_carry(a: int, op: str, b: int) -> bool:
    return (op == "+" and a % 10 + b >= 10) or (op == "-" and a % 10 < b and a >= 10)


def forgot_carry(a: int, op: str, b: int) -> int:
    """The result with the carry (or the borrow) forgotten: 38 + 5 = 33, 42 - 7 = 45."""
    return apply(a, op, b) - 10 if op == "+" else apply(a, op, b) + 10


def random_chain(rng: random.Random, min_steps: int = 3, max_steps: int = 4) -> Chain:
    """Values stay in [0, MAX_VALUE]; operands are one digit, multipliers 2 or 3."""
    value = rng.randint(2, 20)
    start, operations, length = value, [], rng.randint(min_steps, max_steps)
    while len(operations) < length:
        op = rng.choice(list(OPERATIONS.values()))
        b = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
        result = apply(value, op, b)
        if 0 <= result <= MAX_VALUE:
            operations.append((op, b))
            value = result
    return Chain(start, tuple(operations))


def _row(chain: Chain, rng: random.Random, slip: float) -> dict:
    row = {"question": chain.question(), "answer": str(chain.values[-1]), "reference_solution": chain.solution()}
    if slip:
        row["demonstration"] = chain.solution(rng, slip)
    return row


def write_split(path: Path, size: int, seed: int, slip: float = 0.0, exclude: set[str] = frozenset()) -> Path:
    """`size` problems as jsonl rows (question, answer, reference_solution) that data.py loads unchanged,
    none of whose questions is in `exclude`; `slip` > 0 adds `demonstration`, a solution that forgets
    carries (the warm-up's data)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(size):
            chain = random_chain(rng)
            while chain.question() in exclude:
                chain = random_chain(rng)
            f.write(json.dumps(_row(chain, rng, slip)) + "\n")
    return path


# ---- the default run's data: generated offline, held-out questions never seen in warm-up or training ----

SPLITS = ("train", "heldout")
WARMUP_STEPS = 900  # supervised steps of the default run's policy: it still forgets carries for RL to fix
WARMUP_DRAWS = 8000  # demonstrations drawn; the held-out questions among them (about one in eight) are dropped
WARMUP_SLIP = 0.6  # the demonstrations forget 60% of the carries they meet
WARMUP_SEED = 1


def is_heldout(question: str) -> bool:
    """One question in eight, by a hash of its text: held-out questions are apart from every training and
    warm-up question whatever the seeds and sizes."""
    return zlib.crc32(question.encode()) % 8 == 0


def split_rows(split: str, size: int, seed: int, slip: float = 0.0) -> list[dict]:
    """`size` problems of `split` ("train" or "heldout") as rows data.py reads (question, answer,
    reference_solution; with `slip`, a `demonstration` that forgets carries)."""
    if split not in SPLITS:
        raise ValueError(f"chain:{split}: the chain task's splits are {', '.join(SPLITS)}")
    rng, rows = random.Random(f"chain-{split}-{seed}"), []
    while len(rows) < size:
        chain = random_chain(rng)
        if is_heldout(chain.question()) != (split == "heldout"):
            continue
        rows.append(_row(chain, rng, slip))
    return rows


def warmup_rows() -> list[dict]:
    """The warm-up's demonstrations: the learning experiment's draw (bench/learning_experiment.py writes the
    same stream with write_split(size=8000, seed=1, slip=0.6)) without its held-out questions. Where a warm-up
    lands depends on its draw, and RL's gain on where it lands (README, Learning experiment)."""
    rng = random.Random(WARMUP_SEED)
    drawn = (_row(random_chain(rng), rng, WARMUP_SLIP) for _ in range(WARMUP_DRAWS))
    return [row for row in drawn if not is_heldout(row["question"])]


# The launcher's variables: a warm-up that saw them would make transformers' Trainer join the run's
# process group (accelerate/state.py reads WORLD_SIZE / LOCAL_RANK) while the other ranks wait elsewhere.
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK",
                     "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def warmed_up_policy(cache_dir: Path | None = None) -> Path:
    """The default run's policy (`model.path: chain`): a tiny Qwen2 warmed up on demonstrations of the train
    split, built on first use (a few minutes on 2 cores) and cached after.

    The warm-up runs in a process of its own, outside the launch's process group and random state, and
    lands in the cache by an atomic rename, so ranks that build it at once (another node) never see half.
    """
    from capo_fast.local_models import default_cache_dir

    name = f"chain-policy-s{WARMUP_STEPS}-seed{WARMUP_SEED}-draws{WARMUP_DRAWS}-slip{WARMUP_SLIP}"
    out = (cache_dir or default_cache_dir()) / name
    if (out / "warmup.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"warming up the chain-arithmetic policy ({WARMUP_STEPS} supervised steps, once) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{name}.partial-") as tmp:
        demonstrations = Path(tmp) / "warmup.jsonl"
        rows = warmup_rows()
        demonstrations.write_text("".join(json.dumps(row) + "\n" for row in rows))
        code = "import sys; from pathlib import Path; from capo_fast.chain_arithmetic import warm_up_policy; " \
               f"warm_up_policy(Path(sys.argv[1]), Path(sys.argv[2]), steps={WARMUP_STEPS})"
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
        subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "policy"), str(demonstrations)], env=env,
                       check=True)  # fmt: skip
        try:
            os.rename(Path(tmp) / "policy", out)
        except OSError:  # another process finished first: its policy is the same one
            if not (out / "warmup.json").exists():
                raise
    return out


def annotated_solution(chain: Chain, rng: random.Random, wrong: bool) -> tuple[list[str], int] | None:
    """A worked solution as steps and the index of its first wrong step (-1 for none). With `wrong`, one
    step that needs a carry or a borrow forgets it and the later steps go on correctly from what it wrote,
    so that step is the only wrong one and the final answer is off; None when no step needs a carry."""
    values = chain.values
    slips = [k for k, (op, b) in enumerate(chain.operations) if needs_carry(values[k], op, b)]
    if wrong and not slips:
        return None
    slip = rng.choice(slips) if wrong else -1
    value, steps = chain.start, []
    for k, (op, b) in enumerate(chain.operations):
        result = forgot_carry(value, op, b) if k == slip else apply(value, op, b)
        steps.append(f"{value} {op} {b} = {result}")
        value = result
    return [*steps, f"The answer is \\boxed{{{value}}}."], slip


def write_annotated(path: Path, size: int, seed: int) -> Path:
    """`size` solutions in ProcessBench's layout (problem, steps, label: the first wrong step or -1), half
    of them with one forgotten carry, plus the reference solution and answer the judge sees in training."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        written = 0
        while written < size:
            chain = random_chain(rng)
            annotated = annotated_solution(chain, rng, wrong=written % 2 == 1)
            if annotated is None:
                continue
            steps, label = annotated
            row = {"problem": chain.question(), "steps": steps, "label": label,
                   "reference_solution": chain.solution(), "answer": str(chain.values[-1])}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            written += 1
    return path


def questions(path: Path) -> set[str]:
    return {json.loads(line)["question"] for line in path.read_text().splitlines()}


def chain_of(question: str, reference_solution: str) -> Chain:
    """The chain a problem asks for, read back from its question and reference solution."""
    start = int(_START.search(question).group(1))
    operations = []
    for line in reference_solution.split("\n\n"):
        match = _EQUATION.match(line)
        if match:
            operations.append((match.group(2), int(match.group(3))))
    return Chain(start, tuple(operations))


def wrong_steps(chain: Chain, steps: list[str]) -> set[int]:
    """Indices of the steps that are wrong on their own: the n-th equation with the wrong operation or
    operand for the n-th instruction, a wrong result, a left side that is not the previous step's result, an equation
    past the end of the chain, an answer given before the chain is done or not copied from the last
    result, or a step that is neither an equation nor the answer."""
    wrong, previous, done = set(), chain.start, 0  # done: equations written so far
    for k, text in enumerate(steps):
        equation, answer = _EQUATION.match(text), _ANSWER.match(text)
        if equation:
            a, op, b, c = int(equation.group(1)), equation.group(2), int(equation.group(3)), int(equation.group(4))
            expected = chain.operations[done] if done < len(chain.operations) else None
            if expected != (op, b) or a != previous or c != apply(a, op, b):
                wrong.add(k)
            previous, done = c, done + 1
        elif answer:
            if done != len(chain.operations) or int(answer.group(1)) != previous:
                wrong.add(k)
        else:
            wrong.add(k)
    return wrong


_NUMBER = r"-?\d+(?:\.\d+)?"
_OPERATOR = r"[-+*×x·−/]"
# One operation and its result, not the tail of a longer expression (7 + 5 + 3 = 15) nor its head.
_FREE_EQUATION = re.compile(
    rf"(?<![\d.]\s)(?<![\d.])(?<!{_OPERATOR}\s)(?<!{_OPERATOR})({_NUMBER})\s*({_OPERATOR})\s*({_NUMBER})\s*=\s*({_NUMBER})"
    rf"(?!\s*{_OPERATOR}\s*\d)"
)
_SYMBOLS = {"×": "*", "x": "*", "·": "*", "−": "-"}


def equation_error(text: str) -> bool | None:
    """For free text (another model's steps): True when an equation `a op b = c` in it is false, False
    when every one holds, None when it has none a program can check. Only the arithmetic is checked
    (not whether the operation is the one the question asks for); a result rounded to two decimals
    counts as right."""
    found = _FREE_EQUATION.findall(text)
    if not found:
        return None
    for a, op, b, c in found:
        a, b, c, op = float(a), float(b), float(c), _SYMBOLS.get(op, op)
        if op == "/":
            value = a / b if b else math.nan
        else:
            value = apply(a, op, b)
        if not abs(value - c) <= 0.005 + 1e-9:
            return True
    return False


def judge(chain: Chain, steps: list[str], rng: random.Random, recall: float, false_flag: float) -> Critique:
    """One critique: Yes for a right final answer (read by the outcome verifier itself, so the two never
    disagree); else No and each truly wrong step named with probability `recall`, each other step with
    probability `false_flag`. The verdict itself is never wrong: the noise is in the step flags only."""
    if verify_answer("".join(steps), str(chain.values[-1])) == 1.0:
        return Critique(valid=True, judgment=True)
    truly_wrong = wrong_steps(chain, steps)
    named = {k for k in range(len(steps)) if rng.random() < (recall if k in truly_wrong else false_flag)}
    return Critique(valid=True, incorrect=frozenset(named), judgment=False)


def critique(requests, num_critiques: int, seed: int) -> list[list[Critique]]:
    """The `critic.function` of this task: N critiques per request (critics.FunctionCritic)."""
    recall = float(os.environ.get("CHAIN_CRITIC_RECALL", "1"))
    false_flag = float(os.environ.get("CHAIN_CRITIC_FALSE_FLAG", "0"))
    out = []
    for i, request in enumerate(requests):
        chain = chain_of(request.question, request.reference_solution)
        steps = [step.text for step in request.steps]
        rngs = [random.Random(seed * 1_000_003 + i * 101 + j) for j in range(num_critiques)]
        out.append([judge(chain, steps, rng, recall, false_flag) for rng in rngs])
    return out


# ---- the policy: a tiny Qwen2 warmed up by supervised fine-tuning (transformers' Trainer) -------------


def tokenizer_corpus(size: int = 3000) -> list[str]:
    rng = random.Random(12345)
    chains = [random_chain(rng) for _ in range(size)]
    return [f"{c.question()}\n{c.solution()}" for c in chains] + [str(v) for v in range(MAX_VALUE + 1)] * 20


def warm_up_policy(out_dir: Path, train_file: Path, *, steps: int, lr: float = 2e-3, batch_size: int = 32) -> Path:
    """A tiny Qwen2 (hidden 128, 4 layers) trained on the demonstrations of `train_file` for `steps`
    optimizer steps: few enough that the policy still makes step errors for RL to fix."""
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Qwen2ForCausalLM, Trainer, TrainingArguments

    from capo_fast.local_models import build_tiny_model

    if (out_dir / "model.safetensors").exists() and (out_dir / "warmup.json").exists():
        return out_dir
    base = build_tiny_model(out_dir.with_name(out_dir.name + "-init"), vocab_size=400, corpus=tokenizer_corpus(),
                            hidden_size=128, num_layers=4)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    examples = []
    for line in train_file.read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                               add_generation_prompt=True, tokenize=False)  # fmt: skip
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(row["demonstration"], add_special_tokens=False) + [tokenizer.eos_token_id]
        examples.append({"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids})
    args = TrainingArguments(
        output_dir=str(out_dir.with_name(out_dir.name + "-trainer")), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=batch_size, lr_scheduler_type="cosine", warmup_steps=steps // 10,
        weight_decay=0.0, logging_steps=max(steps // 5, 1), save_strategy="no", report_to=[], use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"steps": steps, "lr": lr, "batch_size": batch_size, "examples": len(examples),
              "seconds": time.perf_counter() - start}  # fmt: skip
    (out_dir / "warmup.json").write_text(json.dumps({**record, "loss": result.training_loss}))
    return out_dir
