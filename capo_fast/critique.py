"""GenPRM critiques: step splitting, the critique prompt, parsing the verdict, voting over critiques.

A response is split into steps on blank lines; the critic reads all steps at once, each tagged
`<step_k>`, judges the whole solution against the ground truth, and only when it is wrong names the
wrong steps in `<incorrect_steps>`, each judged on its own. N critiques of one rollout are then
combined by a voting mode into a weight per step (DESIGN.md section 1, steps 2 to 4).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from capo_fast.errors import ConfigError
from capo_fast.plugins import is_callable_spec, load_callable

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n\s*")
# Critique parsing (DESIGN.md 1.3). Each pattern below starts at a literal or a digit run and scans forward
# over one character class, and no stretch of text is scanned twice, so parsing costs linear time whatever a
# judge writes (32k tokens of unclosed tags took seconds with a lazy block pattern that restarts at each tag).
_TAG = re.compile(r"<(/?)incorrect_steps>", re.IGNORECASE)
_STEP_TOKEN = re.compile(r"</?step_(\d+)>", re.IGNORECASE)
# An index or a range of them ("2-4", "2 to 4", "2..4"); a number right after a minus sign is negative, not a step.
_INDEX_OR_RANGE = re.compile(r"(?<![\d-])(\d+)(?:[ \t]*(?:-|\u2013|\u2014|\.\.|to\b)[ \t]*(\d+))?", re.IGNORECASE)
_MAX_INDEX_DIGITS = 9  # longer numbers are no step of any response (and int() of 4,300+ digits raises)
_JUDGMENT_KEY = re.compile(r"judge?ment", re.IGNORECASE)
_YES_NO_QUESTION = re.compile(r"\(\s*yes\s*/\s*no\s*\)\s*\??", re.IGNORECASE)
_ANSWER = re.compile(r"[ \t\r*_`'\"\[:]*(yes|no)\b", re.IGNORECASE)  # the first word after the question
_NOTHING_BUT_MARKUP = re.compile(r"[ \t\r*_`'\"\[:]*$")
# "Judgment: No" without the question, at the start of a line; the verdict must end its clause (punctuation,
# the line's end or the list's tag), so that "Judgment: no step is wrong" is prose, not a verdict.
_KEYED_VERDICT = re.compile(
    r"[ \t>#*_-]*judge?ment[ \t*_]*:[ \t*_]*(yes|no)\b(?=[ \t\r*_]*(?:[.,;:!)]|<incorrect_steps>|$))", re.IGNORECASE
)


@dataclass(frozen=True)
class Step:
    """One step of a response: `text == response[start:end]`; trailing blank lines belong to it."""

    index: int
    start: int
    end: int
    text: str


def split_steps(response: str, separator: re.Pattern = _BLANK_LINE) -> list[Step]:
    """Splits after each `separator` match (blank lines by default), keeping spans that tile the response.

    Whitespace-only pieces are not steps: their characters join the step before them (or the
    first step, for leading whitespace). A response with no visible text has no steps.
    """
    spans: list[list[int]] = []
    start = 0
    cuts = [m.end() for m in separator.finditer(response)] + [len(response)]
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


def make_splitter(spec: str = "") -> Callable[[str], list[Step]]:
    """`critic.step_splitter`: empty for blank lines, `module:function` returning the response's pieces
    in order (they must join to the response), or a regex whose matches end a step."""
    if not spec:
        return split_steps
    if is_callable_spec(spec):
        pieces_of = load_callable(spec, "critic.step_splitter")

        def split(response: str) -> list[Step]:
            pieces = [str(p) for p in pieces_of(response)]
            if "".join(pieces) != response:
                raise ValueError(f"critic.step_splitter {spec}: the pieces do not join to the response")
            steps, start = [], 0
            for piece in pieces:
                if piece.strip():
                    steps.append(Step(len(steps), start, start + len(piece), piece))
                start += len(piece)
            return steps

        return split
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise ConfigError(f"critic.step_splitter: {spec!r} is neither module:function nor a regex ({err})") from None
    return lambda response: split_steps(response, pattern)


# The default GenPRM prompt (DESIGN.md 1.3, the paper's Appendix F instructions in this project's
# words). A user's template is any text file with the same three placeholders.
TEMPLATE_FIELDS = ("{question}", "{reference_solution}", "{steps}")
NO_REFERENCE = "(none given: judge the solution on its own)"
JUDGMENT_LINE = "Judgment: Is the solution correct (Yes/No)?"


def default_template_path() -> Path:
    return Path(__file__).parent / "prompts" / "critic.txt"


def load_template(path: str | Path | None = None) -> str:
    """The critic prompt template at `path` (default: the packaged one); every placeholder must be there."""
    source = Path(path) if path else default_template_path()
    if not source.is_file():
        raise ConfigError(f"critic.prompt_template: {source} does not exist")
    text = source.read_text()
    missing = [f for f in TEMPLATE_FIELDS if f not in text]
    if missing:
        raise ConfigError(f"critic.prompt_template: {source} lacks the placeholder(s) {', '.join(missing)}")
    return text


def critique_messages(
    question: str, steps: Sequence[Step], reference_solution: str | None = None, template: str | None = None
) -> list[dict]:
    """Chat messages asking the critic for one pass over all steps (render with the judge's template).

    Placeholders are replaced literally (LaTeX braces in the problem are left alone).
    """
    tagged = "\n".join(f"<step_{s.index}>{s.text.strip()}</step_{s.index}>" for s in steps)
    text = template if template is not None else load_template()
    values = (question.strip(), (reference_solution or "").strip() or NO_REFERENCE, tagged)
    for placeholder, value in zip(TEMPLATE_FIELDS, values, strict=True):
        text = text.replace(placeholder, value)
    return [{"role": "user", "content": text}]


def render_critique_prompt(tokenizer, question: str, steps: Sequence[Step], reference_solution: str | None = None):
    """The critic prompt as text, through the judge tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        critique_messages(question, steps, reference_solution), tokenize=False, add_generation_prompt=True
    )


@dataclass(frozen=True)
class Critique:
    """A parsed critique. `valid`: it has an `<incorrect_steps>` block, or it judges the solution correct
    and writes none (the paper asks for the list only when the solution is wrong: it flags nothing).
    Anything else is an abstention. `judgment` is read whether or not there is a block (GenORM counts it)."""

    valid: bool
    incorrect: frozenset[int] = frozenset()
    judgment: bool | None = None  # True for "Yes" (correct), None when absent
    out_of_range: int = 0  # indices the critic named that the response does not have (e.g. counting from 1)
    text: str | None = field(default=None, compare=False)  # what the critic wrote, for the rollout samples


FAILED = Critique(valid=False)


def _answer_after(lines: list[str], row: int, column: int) -> bool | None:
    """The Yes or No that answers a question ending at lines[row][column]: the first word after it on the
    line, or, when nothing but markup follows it there, the first word of the next non-blank line."""
    line = lines[row]
    if _NOTHING_BUT_MARKUP.match(line, column):
        row = next((r for r in range(row + 1, len(lines)) if lines[r].strip()), None)
        if row is None:
            return None
        line, column = lines[row], 0
    answer = _ANSWER.match(line, column)
    return None if answer is None else answer.group(1).lower() == "yes"


def parse_judgment(text: str) -> bool | None:
    """The verdict of the judgment line: the Yes or No that answers "(Yes/No)?" on a line that says
    "Judgment" (or "Judgement") before the question, or a line that starts "Judgment: Yes" or
    "Judgment: No" (the verdict ending its clause). The first such line counts: the paper's judge answers
    it first, and whatever it writes after (prose with "judgment" in it, a second judgment line in its
    reasoning) never overrides it. None when there is none."""
    lines = text.split("\n")
    for row, line in enumerate(lines):
        keyed = _KEYED_VERDICT.match(line)  # at the start of the line: before any question on it
        if keyed:
            return keyed.group(1).lower() == "yes"
        asked_from = 0
        for question in _YES_NO_QUESTION.finditer(line):
            if _JUDGMENT_KEY.search(line, asked_from, question.start()):
                answer = _answer_after(lines, row, question.end())
                if answer is not None:
                    return answer
            asked_from = question.end()
    return None


def _last_block(text: str) -> str | None:
    """The text of the last complete `<incorrect_steps>...</incorrect_steps>`: a closing tag closes the
    latest opening tag before it, so an unclosed draft tag earlier on cannot swallow the final block."""
    opened, block = None, None
    for tag in _TAG.finditer(text):
        if not tag.group(1):
            opened = tag.end()
        elif opened is not None:
            block, opened = text[opened : tag.start()], None
    return block


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive integer intervals merged into disjoint ones, in order."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _read_indices(block: str, num_steps: int) -> tuple[frozenset[int], int]:
    """The step indices a block names (integers, `<step_k>` tokens, ranges "a-b" with both ends included)
    and how many distinct indices it names that the response does not have."""
    block = _STEP_TOKEN.sub(r" \1 ", block)
    inside: list[tuple[int, int]] = []
    outside: list[tuple[int, int]] = []
    too_long: set[str] = set()  # numbers of more than _MAX_INDEX_DIGITS digits, each named once
    for match in _INDEX_OR_RANGE.finditer(block):
        ends = [d.lstrip("0") or "0" for d in match.groups() if d is not None]
        if any(len(d) > _MAX_INDEX_DIGITS for d in ends):  # no range: each end on its own
            too_long.update(d for d in ends if len(d) > _MAX_INDEX_DIGITS)
            ends = [d for d in ends if len(d) <= _MAX_INDEX_DIGITS]
            pairs = [(int(d), int(d)) for d in ends]
        else:
            values = [int(d) for d in ends]
            pairs = [(min(values), max(values))]
        for lo, hi in pairs:
            if lo < num_steps:
                inside.append((lo, min(hi, num_steps - 1)))
            if hi >= num_steps:
                outside.append((max(lo, num_steps), hi))
    named = frozenset(s for lo, hi in _merged(inside) for s in range(lo, hi + 1))
    return named, len(too_long) + sum(hi - lo + 1 for lo, hi in _merged(outside))


def parse_critique(text: str, num_steps: int) -> Critique:
    """Reads the last complete `<incorrect_steps>` block and the judgment (DESIGN.md 1.3).

    Bare integers, `<step_k>` tokens and ranges ("2-4": steps 2, 3 and 4) all name steps; indices outside
    [0, num_steps) are dropped and counted once each, repeats dropped; negative numbers are not indices.
    A critique without a block is valid when it says "Yes" (it flags nothing), else an abstention.
    Never raises; linear time in the length of `text`.
    """
    judgment = parse_judgment(text)
    block = _last_block(text)
    if block is None:
        return Critique(judgment is True, frozenset(), judgment, text=text)
    named, out_of_range = _read_indices(block, num_steps)
    return Critique(True, named, judgment, out_of_range=out_of_range, text=text)


def majority_judgment(critiques: Sequence[Critique]) -> bool | None:
    """Whether a strict majority of the judgments given (block or not) says the solution is correct
    (GenORM's r_m); None when no critique gives one."""
    judged = [c.judgment for c in critiques if c.judgment is not None]
    return sum(judged) > len(judged) / 2 if judged else None


# ---- voting ------------------------------------------------------------------------------------------

VoteFn = Callable[[list[frozenset[int]], int, float], list[float]]


def _counts(flagged: list[frozenset[int]], num_steps: int) -> list[int]:
    return [sum(s in f for f in flagged) for s in range(num_steps)]


@dataclass(frozen=True)
class VotingMode:
    """How k >= 1 valid critiques' flagged-step sets become a weight per step, and what the mode needs."""

    combine: VoteFn
    num_critiques: int | None = None  # the mode reads exactly this many critiques
    temperature: float | None = None  # the mode decodes its critiques at this temperature

    def critic_sampling(self, sampling):
        """The critic's sampling settings under this mode (any dataclass with a `temperature`)."""
        return sampling if self.temperature is None else dataclasses.replace(sampling, temperature=self.temperature)


VOTING: dict[str, VotingMode] = {
    # one critique, decoded greedily (DESIGN.md 1.4)
    "greedy": VotingMode(lambda flagged, n, threshold: [float(s in flagged[0]) for s in range(n)], 1, 0.0),
    "intersection": VotingMode(lambda flagged, n, threshold: [float(c == len(flagged)) for c in _counts(flagged, n)]),
    # count / k >= threshold rather than count >= threshold * k: the division rounds once, so a count of 3
    # of 10 meets a threshold of 0.3 (3 >= 0.3 * 10 = 3.0000000000000004 fails)
    "majority": VotingMode(
        lambda flagged, n, threshold: [float(c / len(flagged) >= threshold) for c in _counts(flagged, n)]
    ),
    "union": VotingMode(lambda flagged, n, threshold: [float(c > 0) for c in _counts(flagged, n)]),
    "average": VotingMode(lambda flagged, n, threshold: [c / len(flagged) for c in _counts(flagged, n)]),
}


@dataclass(frozen=True)
class StepVote:
    """Vote weight e in [0, 1] per step; `num_valid` valid critiques; `counted` when they were enough."""

    weights: list[float]
    num_valid: int
    counted: bool = True


def vote(
    critiques: Sequence[Critique],
    num_steps: int,
    mode: str = "majority",
    threshold: float = 0.5,
    min_valid: int = 1,
) -> StepVote:
    """Combines the valid critiques of one rollout into a weight per step.

    `majority` flags a step named by at least `threshold` of the k valid critiques, count >= threshold * k
    (0.5: section 3.1's S_maj = {s | count(s) >= k/2}, so 2 of 4 flag a step; a threshold above one half,
    e.g. 0.6, gives the strict majority of the paper's overview figure). A critique that says "Yes" without
    a block is valid and flags nothing: it counts in k.
    With fewer than `min_valid` valid critiques every weight is 0: the rollout keeps its outcome
    reward only, so one surviving critique cannot turn `intersection` into what it alone said.
    """
    if mode not in VOTING:
        raise ValueError(f"unknown voting mode {mode!r}; choose one of {sorted(VOTING)}")
    flagged = [c.incorrect for c in critiques if c.valid]
    if not flagged or len(flagged) < min_valid:
        return StepVote([0.0] * num_steps, len(flagged), counted=False)
    return StepVote(VOTING[mode].combine(flagged, num_steps, threshold), len(flagged))


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
