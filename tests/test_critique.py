"""Step splitting, critique parsing and voting: hand-checked cases and hypothesis properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_fast.critique import (
    FAILED,
    VOTING,
    Critique,
    critique_agreement,
    critique_messages,
    load_template,
    parse_critique,
    parse_judgment,
    render_critique_prompt,
    split_steps,
    vote,
)

FOUR = [Critique(True, frozenset(s)) for s in ([1, 3], [1, 2, 3], [1, 3], [2, 3])]


def test_vote_of_four_critiques_in_every_mode():
    """The overview figure's four critiques: counts 0, 3, 2, 4 of k = 4."""
    expected = {
        "greedy": [0, 1, 0, 1],
        "intersection": [0, 0, 0, 1],
        "majority": [0, 1, 1, 1],  # section 3.1: count >= k/2, so 2 of 4 flag step 2: [1, 2, 3]
        "union": [0, 1, 1, 1],
        "average": [0, 0.75, 0.5, 1.0],
    }
    assert set(expected) == set(VOTING)
    for mode, weights in expected.items():
        assert vote(FOUR, 4, mode).weights == weights, mode
    # a threshold above one half is the figure's strict majority: [1, 3]
    assert vote(FOUR, 4, "majority", threshold=0.6).weights == [0, 1, 0, 1]
    assert vote(FOUR, 4, "majority", threshold=0.75).weights == [0, 1, 0, 1]  # 3 of 4 is exactly 0.75
    assert vote(FOUR, 4, "majority", threshold=1.0).weights == vote(FOUR, 4, "intersection").weights


def test_majority_threshold_is_met_exactly_where_float_products_round_up():
    """3 of 10 critiques meet a threshold of 0.3 (0.3 * 10 is 3.0000000000000004 in floats)."""
    ten = [Critique(True, frozenset({0}))] * 3 + [Critique(True, frozenset())] * 7
    assert vote(ten, 1, "majority", threshold=0.3).weights == [1.0]
    assert vote(ten, 1, "majority", threshold=0.31).weights == [0.0]


def test_a_yes_without_a_block_is_a_valid_vote_that_flags_nothing():
    """Judge texts in the paper's format: three say No and name step 2, the fourth says Yes and stops."""
    no = "Judgment: Is the solution correct (Yes/No)? No\n<incorrect_steps>2</incorrect_steps>"
    yes = "Judgment: Is the solution correct (Yes/No)? Yes"
    critiques = [parse_critique(t, 4) for t in (no, no, no, yes)]
    assert critiques[3] == Critique(True, frozenset(), True)
    assert vote(critiques, 4, "intersection").weights == [0, 0, 0, 0]  # the Yes vote is heard
    assert vote(critiques, 4, "majority").weights == [0, 0, 1, 0]  # 3 of 4
    assert vote(critiques, 4, "majority", threshold=0.8).weights == [0, 0, 0, 0]
    assert vote(critiques, 4, "average").weights == [0, 0, 0.75, 0]
    assert vote(critiques, 4, "intersection").num_valid == 4
    # a No without a block abstains: it is not a vote for "nothing is wrong"
    bare_no = parse_critique("Judgment: Is the solution correct (Yes/No)? No\nStep 2 is off.", 4)
    assert bare_no == Critique(False, frozenset(), False)
    assert vote([*critiques[:3], bare_no], 4, "intersection").weights == [0, 0, 1, 0]
    assert vote([*critiques[:3], bare_no], 4, "intersection").num_valid == 3


def test_greedy_decodes_its_one_critique_at_temperature_zero():
    from capo_fast.config import SamplingConfig

    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    greedy = VOTING["greedy"]
    assert greedy.num_critiques == 1 and greedy.critic_sampling(sampling).temperature == 0.0
    assert greedy.critic_sampling(sampling).top_p == 0.9 and sampling.temperature == 0.7
    assert VOTING["majority"].critic_sampling(sampling) is sampling


def test_failed_critiques_abstain():
    assert vote([FAILED, FOUR[0], FAILED], 4, "majority").weights == [0, 1, 0, 1]
    none = vote([FAILED, FAILED], 4, "majority")
    assert none.weights == [0, 0, 0, 0] and none.num_valid == 0


def test_one_surviving_critique_does_not_decide_intersection_below_min_valid():
    lone = vote([FAILED, FOUR[0], FAILED, FAILED], 4, "intersection", min_valid=2)
    assert lone.weights == [0, 0, 0, 0] and lone.num_valid == 1 and not lone.counted
    assert vote(FOUR[:2], 4, "intersection", min_valid=2).weights == [0, 1, 0, 1]


def test_split_keeps_spans_and_attaches_blank_lines_to_the_previous_step():
    text = "\n\nFirst, 2 + 2 = 4.\n\n\n  \nThen 4 * 3 = 12.\n\nSo \\boxed{12}"
    steps = split_steps(text)
    assert [s.text.strip() for s in steps] == ["First, 2 + 2 = 4.", "Then 4 * 3 = 12.", "So \\boxed{12}"]
    assert steps[0].start == 0 and steps[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(steps, steps[1:], strict=False))
    assert steps[0].text.endswith("\n\n\n  \n")
    assert split_steps("   \n\n ") == []


def test_parser_reads_the_papers_judgment_line():
    line = "Judgment: Is the solution correct (Yes/No)? No"
    assert parse_judgment(line) is False  # not the "Yes" inside "(Yes/No)"
    assert parse_judgment("Judgement: Is the solution correct (Yes/No)?\n**Yes**") is True
    assert parse_judgment("I checked it.\nJudgment: Is the solution correct (Yes/No)? Yes. Well done.") is True
    assert parse_judgment("**Judgment:** Is the solution correct (Yes/No)? **No**") is False
    assert parse_judgment("Step 2 is wrong, so no.\nJudgment: No") is False
    assert parse_judgment("The solution looks fine to me.") is None
    paper = parse_critique(f"Reasoning...\n{line}\n<incorrect_steps>1,3</incorrect_steps>", 5)
    assert paper == Critique(True, frozenset({1, 3}), False)


def test_later_prose_never_flips_the_verdict():
    yes = "Judgment: Is the solution correct (Yes/No)? Yes"
    assert parse_judgment(f"{yes}\nIn my judgment no step is wrong.") is True
    assert parse_judgment(f"{yes}. My judgement: no errors.") is True
    assert parse_judgment(f"{yes}\nJudgment: no step is wrong.") is True
    # the first answered judgment line is the verdict, a second one in the reasoning is prose
    assert parse_judgment(f"{yes}\nas in Judgment: Is the solution correct (Yes/No)? No") is True
    # an echo of the instruction (X) answers nothing: the next judgment line does
    assert parse_judgment("Format: Judgment: Is the solution correct (Yes/No)? X\n" + yes) is True
    assert parse_judgment("Judgment: no step is wrong, I think") is None  # prose, not "No"
    assert parse_judgment("In my judgment: yes") is None  # the short form must start its line


def test_a_judge_counting_from_one_is_caught():
    c = parse_critique("Judgment: Is the solution correct (Yes/No)? No\n<incorrect_steps>2,4</incorrect_steps>", 4)
    assert c.incorrect == {2} and c.out_of_range == 1


def test_parser_forms():
    assert parse_critique("Judgment: No\n<incorrect_steps>1, 3</incorrect_steps>", 5) == Critique(
        True, frozenset({1, 3}), False
    )
    assert parse_critique("<incorrect_steps><step_0>,<step_2></incorrect_steps> Judgement: yes", 3).incorrect == {0, 2}
    text = "<incorrect_steps>0</incorrect_steps> on reflection <incorrect_steps>2, 2, 9, -1</incorrect_steps>"
    assert parse_critique(text, 4).incorrect == {2}  # last block wins, out-of-range and repeats dropped
    assert parse_critique(text, 4).out_of_range == 1  # 9; -1 is no index (ProcessBench's "none")
    assert parse_critique("<incorrect_steps></incorrect_steps>", 4) == Critique(True, frozenset(), None)
    assert parse_critique("Judgment: Yes, all good.", 4) == Critique(True, frozenset(), True)
    assert parse_critique("Judgment: No, step 1.", 4) == Critique(False, frozenset(), False)
    assert parse_critique("Looks fine.", 4) == Critique(False, frozenset(), None)


def test_an_unclosed_draft_tag_does_not_swallow_the_final_block():
    text = "<incorrect_steps>6,0,7\nhmm, let me write that again.\n<incorrect_steps></incorrect_steps>"
    assert parse_critique(text, 2) == Critique(True, frozenset(), None, 0)
    text = "<INCORRECT_STEPS>1</incorrect_steps> then <incorrect_steps>0,\n</incorrect_steps> stray </incorrect_steps>"
    assert parse_critique(text, 3).incorrect == {0}  # a closing tag without an opening one closes nothing
    assert parse_critique("<incorrect_steps>1, 2", 3) == Critique(False, frozenset(), None)  # cut off: no block


def test_ranges_expand_and_every_dropped_index_is_counted():
    def read(block, n):
        c = parse_critique(f"<incorrect_steps>{block}</incorrect_steps>", n)
        return sorted(c.incorrect), c.out_of_range

    assert read("2-4", 5) == ([2, 3, 4], 0)
    assert read("<step_1>-<step_3>", 5) == ([1, 2, 3], 0)
    assert read("1 to 2, 4..4, 3\u20134", 5) == ([1, 2, 3, 4], 0)
    assert read("4-2", 5) == ([2, 3, 4], 0)  # written backwards, the same steps
    assert read("3-6", 5) == ([3, 4], 2)  # 5 and 6 do not exist
    assert read("3-6, 6, 5-7", 5) == ([3, 4], 3)  # 5, 6, 7: each dropped index counted once
    assert read("123456789", 5) == ([], 1)
    assert read("1234567890", 5) == ([], 1)  # ten digits: out of range, counted
    assert read("1234567890, 01234567890, 9" * 3 + "0" * 5000, 5) == ([], 3)  # 4,300+ digits do not raise
    assert read("0-1234567890", 3) == ([0], 1)  # a range to a number no step can have is two indices


def test_prompt_follows_the_papers_instructions():
    """Appendix F point by point: instructions first, then the three labelled parts."""
    steps = split_steps("a = 1\n\nb = {2}")
    content = critique_messages("Find $b$ in {x}.", steps, reference_solution="b is 2")[0]["content"]
    assert "<step_0>a = 1</step_0>\n<step_1>b = {2}</step_1>" in content  # braces survive the template
    parts = ["[Question]\nFind $b$ in {x}.", "[Ground Truth Solution]\nb is 2", "[Solution To Judge]\n<step_0>"]
    at = [content.index(p) for p in parts]
    assert at == sorted(at), "question, ground truth, solution to judge, in that order"
    instructions = " ".join(content[: at[0]].split())
    points = [
        "counting from 0",
        "Give your answer directly",  # long critiques hit the token cap and lose their block
        "decide whether the student's solution is correct, using the ground-truth solution",
        "Judgment: Is the solution correct (Yes/No)? X",
        "If your answer is Yes, stop after that line",  # the list only if incorrect
        "Only if your answer is No, find the wrong steps, using the ground-truth solution",
        "Judge every step on its own",
        "not wrong merely because it uses a result that an earlier wrong step produced",
        "<incorrect_steps>i,j,...</incorrect_steps>",
    ]
    where = [instructions.index(p) for p in points]  # every point is there, before the data ...
    assert where == sorted(where), "... and in the paper's order"
    assert "(none given" in critique_messages("Find b.", steps)[0]["content"]


def test_a_users_template_replaces_the_prompt(tmp_path):
    from capo_fast.config import ConfigError

    path = tmp_path / "mine.txt"
    path.write_text("Q: {question}\nGT: {reference_solution}\nS:\n{steps}")
    text = critique_messages("1+1?", split_steps("2"), "2", load_template(path))[0]["content"]
    assert text == "Q: 1+1?\nGT: 2\nS:\n<step_0>2</step_0>"
    path.write_text("Q: {question}")
    with pytest.raises(ConfigError, match=r"critic\.prompt_template: .* lacks .*\{steps\}"):
        load_template(path)


def test_agreement():
    assert critique_agreement(FOUR[:2], 4) == 2 / 3
    assert critique_agreement([FOUR[0]], 4) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab \n\t\r<>é€") + ["\n\n"]), max_size=120).map("".join))
def test_split_properties(text):
    steps = split_steps(text)
    assert "".join(s.text for s in steps) == (text if steps else "")
    assert all(s.text == text[s.start : s.end] and s.text.strip() for s in steps)
    assert [s.index for s in steps] == list(range(len(steps)))


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=300)
    | st.lists(
        st.sampled_from(
            ["<incorrect_steps>", "</incorrect_steps>", "<step_", ">", "12", ",", "Judgment:", "Yes", "No", "x", "-3"]
        ),
        max_size=30,
    ).map("".join),
    st.integers(0, 20),
)
def test_parser_never_raises_and_stays_in_range(text, num_steps):
    c = parse_critique(text, num_steps)
    assert all(0 <= i < num_steps for i in c.incorrect)
    assert c.valid or not c.incorrect


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.builds(Critique, st.booleans(), st.frozensets(st.integers(0, 9))), max_size=6),
    st.integers(0, 10),
    st.sampled_from(sorted(VOTING)),
    st.floats(0, 1),
)
def test_voting_properties(critiques, num_steps, mode, threshold):
    critiques = [Critique(c.valid, frozenset(i for i in c.incorrect if i < num_steps)) for c in critiques]
    result = vote(critiques, num_steps, mode, threshold)
    assert len(result.weights) == num_steps
    assert all(0.0 <= w <= 1.0 for w in result.weights)
    assert result.num_valid == sum(c.valid for c in critiques)


def test_prompt_goes_through_the_judge_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = render_critique_prompt(tokenizer, "Find b.", split_steps("a = 1\n\nb = 2"))
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<step_1>b = 2</step_1>" in prompt


def test_the_judge_sees_the_reference_solution_else_the_gold_answer():
    from capo_fast.config import CriticConfig
    from capo_fast.critics import ChatCritic, CritiqueRequest

    class Recording(ChatCritic):
        def _complete(self, messages, seeds, regexes):
            self.prompts = [m[0]["content"] for m in messages]
            return [["Judgment: Is the solution correct (Yes/No)? No\n<incorrect_steps>0</incorrect_steps>"]] * len(
                messages
            )

    steps = split_steps("2 + 2 = 5\n\nSo \\boxed{5}")
    requests = [
        CritiqueRequest("What is 2 + 2?", steps, "2 + 2 = 4, so \\boxed{4}.", "4"),
        CritiqueRequest("What is 2 + 2?", steps, None, "4"),  # a DAPO-Math row: the answer only
        CritiqueRequest("What is 2 + 2?", steps),
    ]
    critic = Recording(CriticConfig(num_critiques=1))
    critiques = critic.critique(requests)
    assert [c[0].incorrect for c in critiques] == [frozenset({0})] * 3
    with_solution, with_answer, without = critic.prompts
    assert "2 + 2 = 4, so \\boxed{4}." in with_solution
    assert "The final answer is 4." in with_answer and "none given" in without
    critic = Recording(CriticConfig(num_critiques=1, include_reference=False))
    critic.critique(requests[:1])
    assert "\\boxed{4}" not in critic.prompts[0] and "none given" in critic.prompts[0]


def test_vote_threshold_must_be_a_fraction_of_the_critiques_in_zero_one():
    from capo_fast.config import ConfigError, load_config

    for bad in ("0", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"algorithm\.vote_threshold.*\(0, 1\]"):
            load_config(None, [f"--algorithm.vote_threshold={bad}"])
    with pytest.raises(ConfigError, match=r"algorithm\.vote_threshold: must be a finite float"):
        load_config(None, ["--algorithm.vote_threshold=.nan"])
    assert load_config(None, ["--algorithm.vote_threshold=1"]).algorithm.vote_threshold == 1.0
    assert load_config(None).algorithm.vote_threshold == 0.5


def test_windows_line_ends_read_the_same():
    text = "Reasoning.\r\nJudgment: No\r\n<incorrect_steps>1</incorrect_steps>\r\n"
    assert parse_critique(text, 3) == Critique(True, frozenset({1}), False)
    assert parse_judgment("Judgment: Is the solution correct (Yes/No)?\r\n**Yes**\r\n") is True
