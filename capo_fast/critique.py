"""GenPRM critiques: step splitting, the critique prompt, parsing the verdict, voting over critiques.

A response is split into steps on blank lines; the critic reads all steps at once, each tagged
`<step_k>`, and names the wrong ones in `<incorrect_steps>`. N critiques of one rollout are then
combined by a voting mode into a weight per step (DESIGN.md section 1, steps 2 to 4).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n\s*")
_BLOCK = re.compile(r"<incorrect_steps>(.*?)</incorrect_steps>", re.DOTALL | re.IGNORECASE)
_INDEX = re.compile(r"(?<![-\d])\d+")  # negative numbers are not step indices
_JUDGMENT = re.compile(r"judge?ment\s*[:：]?[^\n]*?\b(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    """One step of a response: `text == response[start:end]`; trailing blank lines belong to it."""

    index: int
    start: int
    end: int
    text: str


def split_steps(response: str) -> list[Step]:
    """Splits on blank lines, keeping character spans that tile the whole response.

    Whitespace-only pieces are not steps: their characters join the step before them (or the
    first step, for leading whitespace). A response with no visible text has no steps.
    """
    spans: list[list[int]] = []
    start = 0
    cuts = [m.end() for m in _BLANK_LINE.finditer(response)] + [len(response)]
    for end in cuts:
        if end <= start:
            continue
        if response[start:end].strip():
            spans.append([start, end])
        elif spans:
            spans[-1][1] = end
        else:
            continue  # leading whitespace: the first step will start at 0
        start = end
    if spans:
        spans[0][0] = 0
        spans[-1][1] = len(response)
    return [Step(k, s, e, response[s:e]) for k, (s, e) in enumerate(spans)]


CRITIC_INSTRUCTIONS = (
    "You are checking a step-by-step solution to a math problem. Read every step and decide whether "
    "it is mathematically correct and follows from what came before. Explain briefly, then end with "
    "two lines:\n"
    "Judgment: Yes (the final answer is correct) or No (it is not)\n"
    "<incorrect_steps>comma-separated numbers of the wrong steps, empty if none</incorrect_steps>"
)


def critique_messages(question: str, steps: Sequence[Step], reference_solution: str | None = None) -> list[dict]:
    """Chat messages asking the critic for one pass over all steps (render with the judge's template)."""
    tagged = "\n".join(f"<step_{s.index}>{s.text.strip()}</step_{s.index}>" for s in steps)
    parts = [CRITIC_INSTRUCTIONS, f"Problem:\n{question.strip()}"]
    if reference_solution:
        parts.append(f"Reference solution:\n{reference_solution.strip()}")
    parts.append(f"Solution to check, with its steps numbered from 0:\n{tagged}")
    return [{"role": "user", "content": "\n\n".join(parts)}]


def render_critique_prompt(tokenizer, question: str, steps: Sequence[Step], reference_solution: str | None = None):
    """The critic prompt as text, through the judge tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        critique_messages(question, steps, reference_solution), tokenize=False, add_generation_prompt=True
    )


@dataclass(frozen=True)
class Critique:
    """A parsed critique. `valid` is False when the critic gave no `<incorrect_steps>` block."""

    valid: bool
    incorrect: frozenset[int] = frozenset()
    judgment: bool | None = None  # True for "Yes" (correct), None when absent


FAILED = Critique(valid=False)


def parse_critique(text: str, num_steps: int) -> Critique:
    """Reads the last `<incorrect_steps>` block; bare integers and `<step_k>` tokens both count.

    Indices outside [0, num_steps) and repeats are dropped. Never raises.
    """
    blocks = _BLOCK.findall(text)
    judgments = _JUDGMENT.findall(text)
    judgment = judgments[-1].lower() == "yes" if judgments else None
    if not blocks:
        return Critique(valid=False, judgment=judgment)
    indices = {int(x) for x in _INDEX.findall(blocks[-1]) if len(x) < 9}
    return Critique(True, frozenset(i for i in indices if 0 <= i < num_steps), judgment)


# ---- voting ------------------------------------------------------------------------------------------

VoteFn = Callable[[list[frozenset[int]], int, float], list[float]]


def _counts(flagged: list[frozenset[int]], num_steps: int) -> list[int]:
    return [sum(s in f for f in flagged) for s in range(num_steps)]


# Each mode maps the flagged-step sets of k >= 1 valid critiques to a weight per step.
VOTING: dict[str, VoteFn] = {
    "greedy": lambda flagged, n, threshold: [float(s in flagged[0]) for s in range(n)],
    "intersection": lambda flagged, n, threshold: [float(c == len(flagged)) for c in _counts(flagged, n)],
    "majority": lambda flagged, n, threshold: [float(c > threshold * len(flagged)) for c in _counts(flagged, n)],
    "union": lambda flagged, n, threshold: [float(c > 0) for c in _counts(flagged, n)],
    "average": lambda flagged, n, threshold: [c / len(flagged) for c in _counts(flagged, n)],
}


@dataclass(frozen=True)
class StepVote:
    """Vote weight e in [0, 1] per step; `num_valid` critiques took part."""

    weights: list[float]
    num_valid: int


def vote(critiques: Sequence[Critique], num_steps: int, mode: str = "majority", threshold: float = 0.5) -> StepVote:
    """Combines the valid critiques of one rollout into a weight per step.

    With no valid critique every weight is 0: the rollout keeps its outcome reward only.
    """
    if mode not in VOTING:
        raise ValueError(f"unknown voting mode {mode!r}; choose one of {sorted(VOTING)}")
    flagged = [c.incorrect for c in critiques if c.valid]
    if not flagged:
        return StepVote([0.0] * num_steps, 0)
    return StepVote(VOTING[mode](flagged, num_steps, threshold), len(flagged))


def critique_agreement(critiques: Sequence[Critique], num_steps: int) -> float | None:
    """Mean pairwise Jaccard agreement of the valid critiques' flagged sets (1 when both flag nothing)."""
    sets = [c.incorrect for c in critiques if c.valid]
    if len(sets) < 2 or num_steps == 0:
        return None
    scores = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = sets[i] | sets[j]
            scores.append(1.0 if not union else len(sets[i] & sets[j]) / len(union))
    return sum(scores) / len(scores)
