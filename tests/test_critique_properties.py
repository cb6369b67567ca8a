"""Property tests of the critique parser against an oracle that does not read text.

Each case is built from what a judge means (a verdict, the wrong steps, the indices it names that the
response lacks) and then written out in the paper's format the many ways judges write it: reasoning before
the judgment line, the line in its spellings, drafts of the list left unclosed or revised, ranges, `<step_k>`
tokens, repeats, prose after it all. The parser must read back what was meant (DESIGN.md 1.3).
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_fast.critics import guided_critique_regex
from capo_fast.critique import Critique, parse_critique, parse_judgment

QUESTION = "Is the solution correct (Yes/No)?"
# Prose with no judgment line in it: it may come anywhere, even before the verdict.
PROSE = [
    "Let me check each step.", "Step 3 adds 17 and 25.", "x < 3 and y > 2, so", "yes", "no", "No.", "Yes!",
    "the answer 42 matches", "2-4 is a range", "(Yes/No)", "correct", "It is wrong.", "Step <step_1> is fine",
    "", "   ", "\t", "$\\frac{1}{2}$", "* item", "**bold**", "é€", "1, 2, 3",
]  # fmt: skip
# Prose a judge may write after its verdict: "judgment" in passing, even a second judgment line.
AFTER = PROSE + [
    "In my judgment no step is wrong.", "My judgement: no errors.", "Judgment: no step is wrong, I think",
    f"as I said, Judgment: {QUESTION} No", f"Judgement: {QUESTION} Yes", "judgment", "Judgment:",
]  # fmt: skip


def prose(pool, max_size=4):
    return st.lists(st.sampled_from(pool), max_size=max_size).flatmap(
        lambda parts: st.lists(st.sampled_from([" ", "\n", "\n\n"]), min_size=len(parts), max_size=len(parts)).map(
            lambda seps: "".join(p + s for p, s in zip(parts, seps, strict=True))
        )
    )


@st.composite
def judgment_line(draw, verdict: bool):
    word = draw(st.sampled_from(["Yes", "yes", "YES"] if verdict else ["No", "no", "NO"]))
    key = draw(st.sampled_from(["Judgment", "Judgement", "judgment", "**Judgment:**", "### Judgment"]))
    colon = "" if key.endswith(":**") else ":"
    shape = draw(st.sampled_from(["line", "bold", "next line", "short"]))
    end = draw(st.sampled_from(["", ".", " ", ", as explained.", "!"]))
    if shape == "short":  # the line without the question: the verdict ends its clause, or the line
        return f"{key}{colon} {word}{end}" + draw(st.sampled_from(["\n", " <incorrect_steps>", ", so"]))
    answer = {"line": f" {word}", "bold": f" **{word}**", "next line": f"\n{word}"}[shape]
    return f"{key}{colon} {QUESTION}{answer}{end}"


def runs(values):
    """Sorted values cut into runs of consecutive integers."""
    out = []
    for v in sorted(values):
        if out and v == out[-1][-1] + 1:
            out[-1].append(v)
        else:
            out.append([v])
    return out


@st.composite
def written_indices(draw, named, missing, huge):
    """The list's text: `named` (in range) and `missing` (out of range) in any order and form, each at least
    once, plus the long numbers `huge` (strings of 10+ digits)."""
    tokens = []
    for run in runs(named) + runs(missing):
        if len(run) >= 2 and draw(st.booleans()):
            dash = draw(st.sampled_from(["-", " - ", " to ", "..", "\u2013"]))
            lo, hi = (run[0], run[-1]) if draw(st.booleans()) else (run[-1], run[0])
            tokens.append(f"{lo}{dash}{hi}")
        else:
            tokens += [draw(st.sampled_from([str(v), f"<step_{v}>"])) for v in run]
    tokens += huge
    tokens += draw(st.lists(st.sampled_from(tokens), max_size=3)) if tokens else []  # repeats
    tokens = draw(st.permutations(tokens))
    seps = draw(st.lists(st.sampled_from([",", ", ", " ", "\n", " and "]), min_size=len(tokens), max_size=len(tokens)))
    return "".join(t + s for t, s in zip(tokens, seps, strict=True))


@st.composite
def critiques(draw):
    """(text, num_steps, the Critique it means)."""
    num_steps = draw(st.integers(0, 12))
    verdict = draw(st.sampled_from([True, False, None]))
    has_block = draw(st.booleans()) if verdict is not False else draw(st.sampled_from([True, True, False]))
    named = draw(st.frozensets(st.integers(0, num_steps - 1), max_size=num_steps)) if num_steps else frozenset()
    missing = draw(st.frozensets(st.integers(num_steps, num_steps + 30), max_size=4))
    huge = draw(st.lists(st.from_regex(r"[1-9][0-9]{9,14}", fullmatch=True), max_size=2, unique=True))

    parts = [draw(prose(PROSE))]  # reasoning before the verdict
    if verdict is not None:
        parts.append("\n" + draw(judgment_line(verdict)))  # the judgment line starts a line
    if has_block:
        for _ in range(draw(st.integers(0, 2))):  # drafts: left unclosed, or closed and revised
            draft = draw(st.lists(st.integers(0, 40), max_size=4))
            closed = "</incorrect_steps>" if draw(st.booleans()) else ""
            parts.append(f"<incorrect_steps>{','.join(map(str, draft))}{closed}\n{draw(prose(PROSE, 2))}")
        opening = draw(st.sampled_from(["<incorrect_steps>", "<INCORRECT_STEPS>", "<Incorrect_Steps>"]))
        parts.append(f"{opening}{draw(written_indices(named, missing, huge))}</incorrect_steps>")
    parts.append(draw(prose(AFTER) if verdict is not None else prose(PROSE)))
    if draw(st.booleans()):  # a new draft begun after the final block, never closed
        parts.append("<incorrect_steps>0, 1")
    text = draw(st.sampled_from(["\n", " "])).join(parts)
    if not has_block:
        return text, num_steps, Critique(verdict is True, frozenset(), verdict)
    return text, num_steps, Critique(True, named, verdict, out_of_range=len(missing) + len(huge))


def _check(case):
    text, num_steps, meant = case
    got = parse_critique(text, num_steps)
    assert got == meant, text
    assert got.out_of_range == meant.out_of_range, text
    assert parse_judgment(text) is meant.judgment, text


@settings(max_examples=200, deadline=None)
@given(critiques())
def test_the_parser_reads_back_what_the_judge_meant(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(critiques())
def test_the_parser_reads_back_what_the_judge_meant_many(case):
    _check(case)


def _check_grammar(data, reasoning_chars, num_steps):
    """Every text the guided grammar admits parses as a valid critique with the verdict of its first line,
    naming only steps the response has; a Yes names none."""
    text = data.draw(st.from_regex(guided_critique_regex(reasoning_chars, num_steps), fullmatch=True))
    c = parse_critique(text, num_steps)
    said_yes = text.split("\n", 1)[0].endswith("Yes")
    assert c.valid and c.judgment is said_yes and c.out_of_range == 0, text
    assert all(0 <= s < num_steps for s in c.incorrect) and not (said_yes and c.incorrect), text


@settings(max_examples=100, deadline=None)
@given(st.data(), st.integers(0, 60), st.integers(0, 12))
def test_every_critique_the_guided_grammar_admits_parses_as_it_says(data, reasoning_chars, num_steps):
    _check_grammar(data, reasoning_chars, num_steps)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(st.data(), st.integers(0, 200), st.integers(0, 30))
def test_every_critique_the_guided_grammar_admits_parses_as_it_says_many(data, reasoning_chars, num_steps):
    _check_grammar(data, reasoning_chars, num_steps)
