"""Outcome reward with math-verify in worker processes, and the format reward."""

import time

import pytest

from capo_fast.reward import OutcomeVerifier, format_reward, last_boxed, outcome_reward, verifier_metrics


def test_last_boxed_and_format():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert format_reward(r"so \boxed{12}") == 1.0 and format_reward(r"\boxed{ }") == 0.0
    assert format_reward("12") == 0.0


@pytest.fixture(scope="module")
def verifier():
    with OutcomeVerifier(num_workers=2, timeout_s=3.0) as v:
        yield v


def test_equivalent_forms_score_one(verifier):
    cases = [
        (r"The answer is \boxed{\frac{3}{4}}", "0.75"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"So we get \boxed{3/4}.", r"\frac{3}{4}"),
        (r"\boxed{12}", "12"),
        (r"\boxed{13}", "12"),
        ("no answer at all", "12"),
    ]
    scores = verifier.score([c[0] for c in cases], [c[1] for c in cases])
    assert [s.correct for s in scores] == [1, 1, 1, 1, 0, 0]
    assert [s.formatted for s in scores] == [1, 1, 1, 1, 1, 0]
    assert all(s.status == "ok" for s in scores)


def test_a_hanging_answer_is_cut_off_and_the_batch_goes_on(verifier):
    hang = r"\boxed{9^{9^{9^{99}}}}"  # sympy tries to evaluate this forever
    start = time.monotonic()
    scores = verifier.score([r"\boxed{2}", hang, r"\boxed{4}", r"\boxed{5}"], ["2", "1", "4", "6"])
    elapsed = time.monotonic() - start
    assert [s.status for s in scores] == ["ok", "timeout", "ok", "ok"]
    assert [s.correct for s in scores] == [1, 0, 1, 0]
    assert elapsed < 3.0 * 4, "the stuck worker must be killed at its timeout"
    assert verifier.score([r"\boxed{7}"], ["7"])[0].correct == 1.0  # the replacement worker serves
    assert verifier_metrics(scores) == {"reward/verifier_timeouts": 1.0, "reward/verifier_errors": 0.0}


def test_mismatched_lengths_are_an_error(verifier):
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        verifier.score(["a", "b"], ["1"])


def test_worker_start_up_does_not_count_against_an_item():
    # Importing math-verify and sympy in a fresh worker takes seconds; the item budget here is shorter.
    with OutcomeVerifier(num_workers=1, timeout_s=0.5) as verifier:
        (score,) = verifier.score(["so \\boxed{2}"], ["2"])
    assert (score.correct, score.status) == (1.0, "ok")


def test_the_final_answer_is_read_never_the_last_number(verifier):
    from capo_fast.reward import final_answer

    cut_off = "We have 5 boxes with 4 apples each. So 5*4=20, and then we need to subtract"
    stated = "Adding the cases gives 4 + 6 + 3 = 13. So there are 13 ways to tile the 2 by 6 board."
    assert final_answer(cut_off) is None  # a response cut off mid-computation states no answer
    assert final_answer(stated) == "$13$"
    assert final_answer("The final answer is 12. Check: 3 * 4 = 12, and 2 more is 14.") == "$12$"
    assert final_answer("x = 3 and so \\boxed{7} ... then 9") == "\\boxed{7}"  # \boxed{} first
    assert final_answer("To calculate 5 - 2, we subtract. So, 5 - 2 = 3.") == "$3$"  # a concluding result
    assert final_answer("Halve it. So x = 3.5.") == "$3.5$"
    assert final_answer("So x = 5!") == "$5$" and final_answer("Therefore, $$x = 4$$") == "$4$"
    assert final_answer("3 / 3 = 1.\n\nSo, 3 / 3 is indeed 1.") == "$1$" and final_answer("The result is 90.") == "$90$"
    assert final_answer("30 * 3 = 90.\n#### 90\nThe result is 90.") == "$90$"  # GSM8K's marker, anywhere
    # a result, never the first operand of more arithmetic in the same sentence
    results = {"So the remaining amount is 20 - 5 = 15.": "$15$", "Thus, the total is 4 + 4 + 4 = 12!": "$12$",
               "So the total is 12 minus 5, which is 7.": "$7$", "So the result is 5 + 3 = 8.": "$8$",
               "The product is 6, and adding 2 gives 8.": None, "**Answer:** 42": "$42$",
               "Final Answer: The final answer is $8$. I hope it is correct.": "$8$"}  # fmt: skip
    assert {text: final_answer(text) for text in results} == results
    assert final_answer("Thus $x = 3.$") == "$3.$" and final_answer("Thus we have $x=2$ and then $") is None
    # a conclusion counts only as the finished last sentence: never mid-work, never cut off
    assert final_answer("So 5*4=20.\n\nThen we need to subtract the") is None
    assert final_answer("We have 5 boxes. So 5*4=20") is None
    assert final_answer("Thus we have 12 apples and then") is None
    assert final_answer("So 5*4=20. Then we subtract 3 to get 17 apples.") is None
    scores = verifier.score([cut_off, stated, "Answer: $\\frac{1}{2}$", "It is 5, then 4."], ["20", "13", "0.5", "4"])
    assert [s.correct for s in scores] == [0, 1, 1, 0]


def test_a_degenerate_rollout_of_unclosed_boxes_is_scored_at_once(verifier):
    # issue 22: 3,000 unclosed \boxed{ took 12 s (9 s of them in the caller's format reward, past any timeout)
    (score,) = verifier.score(["\\boxed{" * 3000], ["1"])
    assert (score.correct, score.formatted, score.status) == (0.0, 0.0, "ok")


# r_v by hand: (response, verifier's score, correct letter or None, truncated, truncated_reward zero) -> r_v
R_V_CASES = [
    ("So the answer is \\boxed{C}.", 0.0, "C", False, False, 1.0),  # the letter is right; math-verify said 0
    ("So the answer is \\boxed{B}.", 1.0, "C", False, False, 0.0),  # the letter is wrong; math-verify said 1
    ("The answer is (C).", 0.0, "C", False, False, 1.0),  # a stated letter without a box
    ("I am not sure.", 1.0, "C", False, False, 0.0),  # no letter stated
    ("\\boxed{12}", 1.0, None, False, False, 1.0),  # not multiple choice: the verifier's score
    ("\\boxed{13}", 0.0, None, False, False, 0.0),
    ("\\boxed{12}", 1.0, None, True, True, 0.0),  # cut at max tokens under truncated_reward: zero
    ("\\boxed{12}", 1.0, None, True, False, 1.0),  # cut, truncated_reward: verify (scored like any other)
    ("\\boxed{C}", 0.0, "C", True, True, 0.0),  # zero wins over a right letter too
    ("\\boxed{12}", 1.0, None, False, True, 1.0),  # zero touches only cut responses
]


@pytest.mark.parametrize(("response", "verified", "choice", "truncated", "zero", "expected"), R_V_CASES)
def test_one_rule_for_r_v_multiple_choice_and_truncation(response, verified, choice, truncated, zero, expected):
    got = outcome_reward(response, verified, choice=choice, truncated=truncated, zero_if_truncated=zero)
    assert got == expected
