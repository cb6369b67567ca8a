"""The verifier's answer extraction on generated responses whose answer is known, against oracles written
here, and inputs that only a linear-time extraction finishes on."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_fast.reward import final_answer, format_reward, last_boxed


def naive_last_boxed(text: str) -> str | None:
    """The rule in its plainest form: from each `\\boxed{` (spaces allowed before the brace; last first), count
    braces to the one closing it."""
    starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


# Balanced LaTeX-ish answers with nested braces: 12, \frac{3}{4}, {a{b}}, x^{2}.
ATOM = st.sampled_from(["12", "-3", "x", "\\frac{1}{2}", "\\sqrt{2}", "a+b", "\\pi", "0.5", "y^{2}", " "])
ANSWER = st.recursive(
    ATOM,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: "{" + "".join(xs) + "}")
        | st.tuples(inner, inner).map("".join)
    ),
    max_leaves=8,
).filter(lambda a: a.strip())
# Noise: prose, whitespace runs, stray braces, other numbers; never a \boxed of its own.
NOISE = st.lists(st.sampled_from(["So ", "the answer is 7", "{", "}", "\n", "\n\n", "   ", "\t", "####", "x = 3.",
                                  "Answer: 5", "final answer: 9", "$", "\\frac", "boxed", "\\", "12"]),
                 max_size=20).map("".join)  # fmt: skip
SMALL = settings(max_examples=150, deadline=None)
LARGE = settings(max_examples=1000, deadline=None)


def check_boxed(before, answer, after):
    response = f"{before}\\boxed{{{answer}}}{after.replace('{', '')}"  # nothing after may close a brace opened before
    assert last_boxed(response) == answer
    assert final_answer(response) == f"\\boxed{{{answer}}}"
    assert format_reward(response) == 1.0


def check_against_naive(text):
    assert last_boxed(text) == naive_last_boxed(text)


BRACES = st.lists(st.sampled_from(["\\boxed{", "{", "}", "a", " ", "\\boxed {", "\\boxed"]), max_size=30).map("".join)


@SMALL
@given(NOISE, ANSWER, NOISE)
def test_the_boxed_answer_is_found_among_noise(before, answer, after):
    check_boxed(before, answer, after)


@SMALL
@given(BRACES)
def test_last_boxed_agrees_with_the_plain_rule(text):
    check_against_naive(text)


@SMALL
@given(NOISE.filter(lambda s: "####" not in s and "nswer" not in s and "\\boxed" not in s),
       st.integers(-10**6, 10**6), st.sampled_from(["\n", "\n\n", "\n   \n", ""]))  # fmt: skip
def test_a_gsm8k_marker_states_the_answer(noise, number, gap):
    assert final_answer(f"{noise}\n{gap}#### {number}\n") == f"${number}$"


@pytest.mark.slow
@LARGE
@given(NOISE, ANSWER, NOISE, BRACES)
def test_many_responses(before, answer, after, text):
    check_boxed(before, answer, after)
    check_against_naive(text)


# Inputs on which a quadratic scan would run for minutes (n^2 / 2 steps of a Python loop or a regex
# backtrack with n in the tens of thousands); the values say what the linear one must return.


def test_many_unclosed_boxes():
    assert last_boxed("\\boxed{" * 30_000) is None
    assert last_boxed("\\boxed{" * 30_000 + "\\boxed{7}") == "7"
    assert format_reward("\\boxed{" * 30_000) == 0.0
    assert last_boxed("\\boxed{1}" + "\\boxed{" * 30_000) == "1"


def test_whitespace_runs_do_not_make_answer_patterns_backtrack():
    assert final_answer("\n" * 100_000) is None
    assert final_answer("\n" * 100_000 + "#### 5") == "$5$"
    assert final_answer("Answer:" + "\n" * 100_000) is None
    assert final_answer("The final answer is 4" + " " * 100_000 + "x") == "$4" + " " * 100_000 + "x$"
    assert final_answer("The answer is" + " \t" * 50_000 + "\n") is None
    assert final_answer("So there are 12 apples. " + "so " * 30_000 + "x is 5.") == "$5$"
    assert final_answer("Thus" + " " * 100_000 + "we get 3.") == "$3$"


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf")])
def test_a_verifier_timeout_must_be_a_finite_positive_number(timeout_s):
    from capo_fast.reward import OutcomeVerifier

    with pytest.raises(ValueError, match="timeout_s a finite number > 0"):
        OutcomeVerifier(timeout_s=timeout_s)
