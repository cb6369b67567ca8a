"""Outcome rewards: math-verify on the final answer, plus a format reward.

math-verify (sympy underneath) can hang on pathological answers and relies on signals that only
work on a main thread, so it runs on the main thread of worker processes; a worker that overruns
its per-item budget is killed and replaced. A timeout or a parser error scores 0 and is counted,
never raised.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Literal, NamedTuple

Status = Literal["ok", "timeout", "error"]
STARTUP_LIMIT_S = 300.0  # a worker importing math-verify on a loaded machine
_BOXED = re.compile(r"\\boxed\s*\{")


@dataclass(frozen=True)
class OutcomeScore:
    correct: float  # r_v in {0, 1}
    formatted: float  # r_f in {0, 1}: the response puts its answer in a non-empty \boxed{}
    status: Status


_BRACE = re.compile(r"[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (the last one whose brace is closed), or None.

    One pass pairs every brace with a stack, so a response of n unclosed `\\boxed{` costs O(n), where
    scanning to the end of the text for each of them cost O(n^2) (12 s for 3,000 of them).
    """
    starts = {m.end() for m in _BOXED.finditer(text)}  # just after each \boxed's opening brace
    if not starts:
        return None
    open_braces: list[int] = []
    last: tuple[int, int] | None = None
    for m in _BRACE.finditer(text, min(starts) - 1):
        if m[0] == "{":
            open_braces.append(m.end())
        elif open_braces:
            start = open_braces.pop()
            if start in starts and (last is None or start > last[0]):
                last = (start, m.start())
    return None if last is None else text[last[0] : last[1]]


# An explicit statement of the final answer, when there is no \boxed{}: "The final answer is 12.",
# "Answer: 12", GSM8K's "#### 12", read wherever it stands (the last one wins). Never the last number
# of free text.
#
# Every pattern runs in time linear in the text: no two whitespace runs that can trade characters (`\s*:?\s*`),
# no lazy run followed by `\s*` (which rescans a whitespace run from each of its characters), line starts as
# `^` in MULTILINE mode rather than `\n\s*` (which rescans a run of blank lines from each of them), and a
# run up to a concluding verb stops at the next "so" (each "so" would otherwise rescan the whole sentence).
# Captures keep trailing whitespace, stripped afterwards.
_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)"
_UNTIL_SENTENCE_END = r"([^\n]+?)(?:\.(?=\s|$)|(?=\n)|$)"
_EXPLICIT = [
    re.compile(r"^[^\S\n]*####\s*([^\n]+)", re.MULTILINE),
    re.compile(
        r"final answer\s*(?:is|:|=)\s*(?::\s*)?(?:the final answer is\s*(?::\s*)?)?" + _UNTIL_SENTENCE_END,
        re.IGNORECASE,
    ),
    re.compile(r"^[^\S\n]*\**answer\**\s*[:=]\s*(?:\*+\s*)?" + _UNTIL_SENTENCE_END, re.IGNORECASE | re.MULTILINE),
    re.compile(r"\bthe answer is\s*(?::\s*)?" + _UNTIL_SENTENCE_END, re.IGNORECASE),
]
# A number that is a result, not the first operand of more arithmetic ("is 20 - 5 = 15", "is 6, and ...").
_RESULT = _NUMBER + (
    r"\b(?!\s*(?:[-+*/×÷=^(]|\\times|\\cdot|\\div|times\b|minus\b|plus\b|divided\b|multiplied\b|over\b"
    r"|,\s*(?:and|then|but|so|which|plus|minus)\b))"
)
# A concluding sentence: "So there are 13 ways ...", "So, 5 - 2 = 3." Read only in the response's last
# sentence, and only when that sentence is finished: "So 5*4=20." followed by more work, or a response
# cut off at "So 5*4=20", concludes nothing.
_SO = r"\b(?:so|therefore|thus|hence)\b"
_CONCLUDING = [
    re.compile(
        _SO + r"\s*(?:,\s*)?(?:there (?:are|is|were|was)|we (?:get|have|obtain)|the result is)\s+" + _RESULT,
        re.IGNORECASE,
    ),
    # "So, 3 / 3 is indeed 1.", "The result is 90."
    re.compile(_SO + rf"(?:(?!{_SO})[^.\n=])*?\bis\s+(?:indeed\s+|equal to\s+)?" + _RESULT, re.IGNORECASE),
    re.compile(r"\bthe (?:result|total|sum|product|difference|quotient) is\s+" + _RESULT, re.IGNORECASE),
    re.compile(_SO + rf"(?:(?!{_SO})[^.\n])*?=\s*([^=\n,;]+?)(?:[.!](?=\s|$)|(?=\n)|$)", re.IGNORECASE),
]
_SENTENCE_END = re.compile(r"[.!]\s+|\n")


_FINISHED = (".", "!", "$", "\\]", "\\)")  # a sentence's end, or closed math ("Therefore, $$x = 4$$")


def _last_finished_sentence(response: str) -> str | None:
    """The response's last sentence when the response ends by finishing it, else None."""
    text = response.rstrip()
    if not text.endswith(_FINISHED):
        return None
    ends = [m.end() for m in _SENTENCE_END.finditer(text[:-1])]
    sentence = text[ends[-1] if ends else 0 :]
    return None if sentence.count("$") % 2 else sentence  # "... and then $": cut inside math


def _stated(patterns: list[re.Pattern], text: str) -> str | None:
    for pattern in patterns:
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip().strip("$").strip()
            return f"${answer}$" if answer else None
    return None


def final_answer(response: str) -> str | None:
    """The response's final answer as LaTeX for math-verify: the last \\boxed{} first, then the last
    explicit final-answer statement, then a concluding last sentence; None when the response states none."""
    boxed = last_boxed(response)
    if boxed is not None and boxed.strip():
        return f"\\boxed{{{boxed}}}"
    explicit = _stated(_EXPLICIT, response)
    if explicit is not None:
        return explicit
    last = _last_finished_sentence(response)
    return None if last is None else _stated(_CONCLUDING, last)


def format_reward(response: str) -> float:
    content = last_boxed(response)
    return float(content is not None and content.strip() != "")


def _gold_for_parsing(gold: str) -> str:
    gold = gold.strip()
    return gold if "$" in gold or "\\boxed" in gold else f"${gold}$"


def verify_answer(response: str, gold: str) -> float:
    """1.0 when math-verify finds the response's final answer equal to `gold` (no time limit here)."""
    from math_verify import parse, verify

    stated = final_answer(response)
    if stated is None:
        return 0.0
    gold_parsed = parse(_gold_for_parsing(gold), parsing_timeout=None)
    answer = parse(stated, parsing_timeout=None)
    return float(bool(gold_parsed) and bool(answer) and verify(gold_parsed, answer, timeout_seconds=None))


DEFAULT_VERIFIER = "capo_fast.reward:verify_answer"


def _worker_loop(conn: Connection, verifier: str) -> None:
    from capo_fast.plugins import load_callable

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with no timeout set
    verify = load_callable(verifier, "algorithm.verifier")
    verify("\\boxed{1}", "1")  # import math-verify and sympy before any item's clock starts
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        index, response, gold = job
        try:
            conn.send((index, float(verify(response, gold)), "ok"))
        except Exception:  # a parser failure is a wrong answer, reported as an error status
            conn.send((index, 0.0, "error"))


class _Worker:
    def __init__(self, ctx, verifier: str):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, args=(child, verifier), daemon=True)
        self.process.start()
        child.close()
        self.ready = False  # until its imports are done: start-up time never counts against an item
        self.job: int | None = None
        self.started = 0.0

    def submit(self, index: int, response: str, gold: str) -> None:
        self.conn.send((index, response, gold))
        self.job, self.started = index, time.monotonic()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class OutcomeVerifier:
    """Scores batches of (response, gold answer) in worker processes, keeping the input order.

    Args:
        num_workers: processes running math-verify.
        timeout_s: budget per item; past it the item scores 0 with status "timeout".
        verifier: `module:function(response, gold) -> 0/1` run in the workers (default: math-verify on
            the final answer, `verify_answer`).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, verifier: str = DEFAULT_VERIFIER):
        from capo_fast.plugins import load_callable

        if num_workers < 1 or not 0 < timeout_s < math.inf:  # NaN fails every comparison: no item would time out
            raise ValueError(
                f"num_workers must be >= 1 and timeout_s a finite number > 0, got {num_workers}, {timeout_s}"
            )
        load_callable(verifier, "algorithm.verifier")  # a bad name fails here, not in a worker
        self.num_workers, self.timeout_s, self.verifier = num_workers, timeout_s, verifier
        self._ctx = mp.get_context("spawn")  # no fork of a process holding threads or devices
        self._workers: list[_Worker] = []

    def __enter__(self) -> OutcomeVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def score(self, responses: list[str], golds: list[str]) -> list[OutcomeScore]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.verifier))
        correct: list[tuple[float, Status] | None] = [None] * len(responses)
        pending = list(range(len(responses)))[::-1]
        while pending or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.job is None and pending:
                    i = pending.pop()
                    w.submit(i, responses[i], golds[i])
            busy = [w for w in self._workers if w.job is not None]
            starting = [w for w in self._workers if not w.ready]
            deadline = min(w.started for w in busy) + self.timeout_s if busy else None
            timeout = max(0.0, deadline - time.monotonic()) if deadline is not None else STARTUP_LIMIT_S
            ready = wait([w.conn for w in busy + starting], timeout=timeout)
            if not ready and not busy:
                raise RuntimeError(f"math-verify workers did not start within {STARTUP_LIMIT_S} s")
            for w in starting:
                if w.conn in ready:
                    try:
                        w.ready = w.conn.recv() == "ready"
                    except EOFError:
                        raise RuntimeError("a math-verify worker died while starting") from None
            for w in busy:
                if w.conn in ready:
                    try:
                        index, value, status = w.conn.recv()
                        correct[index], w.job = (value, status), None
                        continue
                    except EOFError:  # the worker died (out of memory, say): its item is an error
                        outcome: tuple[float, Status] = (0.0, "error")
                elif time.monotonic() - w.started >= self.timeout_s:
                    outcome = (0.0, "timeout")
                else:
                    continue
                correct[w.job] = outcome
                w.kill()
                self._workers[self._workers.index(w)] = _Worker(self._ctx, self.verifier)
        return [OutcomeScore(c[0], format_reward(r), c[1]) for c, r in zip(correct, responses, strict=True)]


_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")


def choice_letter(response: str) -> str | None:
    """The option letter a multiple-choice answer states (`\\boxed{B}`, "The answer is (D)."), or None."""
    stated = final_answer(response)
    if stated is None:
        return None
    inner = re.sub(r"^\\boxed\{(.*)\}$|^\$(.*)\$$", lambda m: m[1] or m[2] or "", stated).strip()
    inner = re.sub(r"^\\text\{(.*)\}$", r"\1", inner).strip()
    m = _LETTER.match(inner)
    return m[1] if m else None


def outcome_reward(
    response: str,
    verified: float,
    *,
    choice: str | None = None,
    truncated: bool = False,
    zero_if_truncated: bool = False,
) -> float:
    """r_v of one response, the one rule of training and evaluation alike.

    Args:
        response: the policy's answer.
        verified: the verifier's score of it (`OutcomeScore.correct`); not read for multiple choice.
        choice: the correct option's letter when the question is multiple choice (`Problem.correct_choice`):
            the answer is then scored on the letter it states, never on math-verify's reading of it.
        truncated: the response was cut at max tokens.
        zero_if_truncated: `algorithm.truncated_reward: zero`: a cut response scores 0 whatever it says.
    """
    if truncated and zero_if_truncated:
        return 0.0
    if choice is not None:
        return float(choice_letter(response) == choice)
    return verified


class Answer(NamedTuple):
    """One response to score and what it is scored against."""

    response: str
    gold: str
    choice: str | None = None  # the correct option's letter of a multiple-choice question (Problem.correct_choice)
    truncated: bool = False  # cut at max tokens


def outcome_rewards(
    answers: Sequence[Answer], score: Callable[[list[str], list[str]], list[OutcomeScore]], *,
    zero_if_truncated: bool = False,
) -> tuple[list[float], list[OutcomeScore]]:
    """r_v of every answer by `outcome_reward`, training's and evaluation's alike, and the verifier's scores
    (for its timeout and error counts). `score` (OutcomeVerifier.score) reads only the answers that are not
    multiple choice: a letter is scored on the letter."""
    asked = [a for a in answers if a.choice is None]
    scores = score([a.response for a in asked], [a.gold for a in asked]) if asked else []
    if len(scores) != len(asked):  # fewer would end in a bare StopIteration below, more go unseen
        raise ValueError(f"the verifier returned {len(scores)} scores for {len(asked)} answers")
    verified = iter(s.correct for s in scores)
    rewards = [
        outcome_reward(a.response, 0.0 if a.choice is not None else next(verified), choice=a.choice,
                       truncated=a.truncated, zero_if_truncated=zero_if_truncated)  # fmt: skip
        for a in answers
    ]
    return rewards, scores


COUNTED_METRICS = frozenset({"reward/verifier_timeouts", "reward/verifier_errors"})  # summed over ranks


def verifier_metrics(scores: list[OutcomeScore]) -> dict[str, float]:
    """How many answers of a batch timed out or failed to parse in the verifier (accuracy and format rate
    are the rollouts' r_v and r_f, which `outcome_reward` decides)."""
    return {
        "reward/verifier_timeouts": float(sum(s.status == "timeout" for s in scores)),
        "reward/verifier_errors": float(sum(s.status == "error" for s in scores)),
    }
