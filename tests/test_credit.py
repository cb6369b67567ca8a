"""Token credit, Eq. 1 rewards and Eq. 2 advantages against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from capo_fast.credit import (
    CreditConfig,
    RolloutSignals,
    credit_metrics,
    factored_advantages,
    group_advantages,
    token_char_spans,
    token_credit,
    token_rewards,
)
from capo_fast.critique import split_steps

CFG = CreditConfig(correct_reward=2.0, penalty=1.0, format_weight=0.0)


def hand_group():
    # three rollouts of 3, 4 and 2 tokens; r_v = 1, 0, 1; flagged tokens marked by e_t = 1
    return [
        RolloutSignals(1.0, 1.0, torch.tensor([0.0, 0.0, 0.0])),
        RolloutSignals(0.0, 1.0, torch.tensor([0.0, 1.0, 1.0, 0.0])),
        RolloutSignals(1.0, 0.0, torch.tensor([1.0, 0.0])),
    ]


def test_whole_group_by_hand():
    group = hand_group()
    rewards = [token_rewards(s, CFG) for s in group]
    assert [r.tolist() for r in rewards] == [[2, 2, 2], [0, -1, -1, 0], [1, 2]]
    # pooled over 9 tokens: mean 7/9, E[R^2] = 19/9, so std = sqrt(122)/9
    std = math.sqrt(122) / 9
    expected = [[(r - 7 / 9) / (std + CFG.eps) for r in row] for row in ([2, 2, 2], [0, -1, -1, 0], [1, 2])]
    for got, want in zip(group_advantages(rewards, CFG.eps), expected, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-9)
    assert group_advantages(rewards)[0][0].item() == pytest.approx(11 / math.sqrt(122), abs=1e-5)


def test_format_weight_and_modes():
    sig = RolloutSignals(0.0, 1.0, torch.tensor([1.0, 0.5]), judge_verdict=1.0)
    assert token_rewards(sig, CreditConfig(format_weight=0.2)).tolist() == pytest.approx([-0.8, -0.3])
    assert token_rewards(sig, CreditConfig(reward_mode="outcome", format_weight=0.2)).tolist() == pytest.approx(
        [0.2, 0.2]
    )
    genorm = 1 / (1 + math.exp(-1.0)) + 0.0 - 1.0
    assert token_rewards(sig, CreditConfig(reward_mode="genorm")).tolist() == pytest.approx([genorm, genorm])
    # GenORM gets the format reward as the other modes do (Table 5's common settings)
    with_format = token_rewards(sig, CreditConfig(reward_mode="genorm", format_weight=0.2)).tolist()
    assert with_format == pytest.approx([genorm + 0.2, genorm + 0.2])
    with pytest.raises(ValueError, match="reward_mode"):
        CreditConfig(reward_mode="nope")


def test_constant_group_gives_zero_advantage():
    group = [RolloutSignals(1.0, 0.0, torch.zeros(3)), RolloutSignals(1.0, 0.0, torch.zeros(5))]
    f = factored_advantages(group, CFG)
    assert f.rollout_advantages.tolist() == [0.0, 0.0]
    assert all((a == 0).all() for a in group_advantages([token_rewards(s, CFG) for s in group]))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.booleans(), st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=12)
        ),
        min_size=1,
        max_size=6,
    ),
    st.floats(0, 3),
    st.floats(0, 1),
    st.sampled_from(["capo"]),
)
def test_factored_equals_direct(rollouts, penalty, format_weight, mode):
    cfg = CreditConfig(penalty=penalty, format_weight=format_weight, reward_mode=mode)
    group = [RolloutSignals(float(c), float(f), torch.tensor(e)) for c, f, e in rollouts]
    direct = group_advantages([token_rewards(s, cfg) for s in group], cfg.eps)
    f = factored_advantages(group, cfg)
    for i, d in enumerate(direct):
        assert torch.allclose(
            (f.rollout_advantages[i].double() - f.group_penalty * f.credits[i].double()), d, atol=1e-6
        )


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_token_credit_aligns_with_the_policy_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "First 12 + 30 = 42.\n\nThen 42 * 2 = 85.\n\nSo the answer is \\boxed{85}."
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    spans = token_char_spans(tok, ids, text)
    assert len(spans) == len(ids) and spans[-1][0] == spans[-1][1]  # EOS covers no text
    assert "".join(text[a:b] for a, b in spans) == text
    steps = split_steps(text)
    credit = token_credit(steps, [0.0, 1.0, 0.0], spans)
    flagged_text = "".join(text[a:b] for (a, b), e in zip(spans, credit, strict=True) if e > 0)
    # tokens touching step 1 only; a token straddling the boundary may bring its neighbour's characters
    assert "Then 42 * 2 = 85." in flagged_text
    assert "First" not in flagged_text and "answer" not in flagged_text


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([*"ab1+= \n", "é", "€", "😀", "\n\n", "\\boxed{"]), max_size=50).map("".join),
    st.data(),
)
def test_token_credit_is_always_aligned(tiny_model_dir, text, data):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text)["input_ids"]
    spans = token_char_spans(tok, ids, text)
    steps = split_steps(text)
    weights = data.draw(st.lists(st.floats(0, 1), min_size=len(steps), max_size=len(steps)))
    credit = token_credit(steps, weights, spans)
    assert len(spans) == len(ids) == credit.numel()
    assert all(0 <= a <= b <= len(text) for a, b in spans)
    assert all(0.0 <= e <= 1.0 for e in credit.tolist())


def prefix_decoding_spans(tok, ids, text_len):
    """The definition of a token's span when the text is not the tokens' bytes: what decoding the tokens up
    to it adds to the text (an unfinished character, U+FFFD, not yet), clipped to the text."""
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = min(len(tok.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")), text_len)
        spans.append((prev, max(prev, end)))
        prev = max(prev, end)
    return spans


class CountingTokenizer:
    """A tokenizer whose decode calls and the ids they decode are counted."""

    def __init__(self, tok):
        self.tok, self.calls, self.ids_decoded = tok, 0, 0

    def decode(self, ids, **kwargs):
        self.calls += 1
        self.ids_decoded += len(ids)
        return self.tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


TEXTS = st.lists(st.sampled_from([*"ab1+= \n", "é", "€", "😀", "\n\n", "\\boxed{", "日本"]), max_size=40).map("".join)


@settings(max_examples=40, deadline=None)
@given(TEXTS, st.data())
def test_a_text_cut_short_maps_through_the_bytes(tiny_model_dir, text, data):
    """A stop string trimmed or a character held back: each token's span is its span in the whole text,
    clipped to the part kept, and no decoding is needed."""
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    ids = tok.tok(text)["input_ids"]
    full = token_char_spans(tok, ids, text)
    cut = data.draw(st.integers(0, len(text)))
    assert token_char_spans(tok, ids, text[:cut]) == [(min(a, cut), min(b, cut)) for a, b in full]
    assert tok.calls == 0


@settings(max_examples=40, deadline=None)
@given(TEXTS.filter(lambda t: t), st.data())
def test_a_text_that_is_not_the_tokens_is_mapped_as_decoding_prefixes_would(tiny_model_dir, text, data):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text)["input_ids"]
    other = "Z" + text[1:]  # not what the tokens decode to, nor a prefix of it
    cut = data.draw(st.integers(0, len(other)))
    assert token_char_spans(tok, ids, other[:cut]) == prefix_decoding_spans(tok, ids, cut)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(TEXTS.filter(lambda t: t).map(lambda t: t.replace("日", " 日")), st.data())
def test_smollm2_spans_of_a_text_that_is_not_the_tokens_match_prefix_decoding(smol_tokenizer, text, data):
    # byte pieces of one character split over tokens, a space before them: " 日" is three tokens in SmolLM2
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    other = "Z" + text[1:]
    cut = data.draw(st.integers(0, len(other)))
    assert token_char_spans(smol_tokenizer, ids, other[:cut]) == prefix_decoding_spans(smol_tokenizer, ids, cut)


def test_span_mapping_is_linear_in_the_tokens(tiny_model_dir):
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    text = "Step 1: 12 + 30 = 42, so é€😀 日本.\n\n" * 200
    ids = tok.tok(text)["input_ids"][:2048]
    spans = token_char_spans(tok, ids, "Z" + text[1:])  # decoding every prefix: 2,098,176 ids decoded
    assert len(spans) == 2048 and spans[-1][1] == len(tok.tok.decode(ids).rstrip("\ufffd"))
    assert tok.calls <= 2 * len(ids) and tok.ids_decoded <= 16 * len(ids), (tok.calls, tok.ids_decoded)


@pytest.mark.slow
def test_straddling_byte_level_pieces_with_smollm2(smol_tokenizer):
    text = "Compute 3€ + 4€.\n\n😀 7€ 😀\n\nSo \\boxed{7}"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    spans = token_char_spans(smol_tokenizer, ids, text)
    pieces = smol_tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) > len(text.split())  # multi-byte characters are split into several byte pieces
    assert all(0 <= a <= b <= len(text) for a, b in spans) and spans[-1][1] == len(text)
    steps = split_steps(text)
    credit = token_credit(steps, [0.0, 1.0, 0.0], spans)
    middle = [i for i, (a, b) in enumerate(spans) if a >= steps[1].start and b <= steps[1].end and b > a]
    assert credit[middle].min() == 1.0 and credit[: middle[0] - 1].max() == 0.0, pieces


def test_metrics():
    m = credit_metrics([[0, 1, 0.5], [0, 0]], valid_critiques=[4, 0], num_critiques=4)
    assert m["credit/flagged_step_rate"] == pytest.approx(2 / 5)
    assert m["credit/failed_critique_rate"] == pytest.approx(0.5)
    assert m["credit/rollouts_without_critique"] == 1.0


def test_eq1_token_values_for_c2_p1():
    """Correct and unflagged +2, correct and flagged +1, wrong and unflagged 0, wrong and flagged -1."""
    cfg = CreditConfig(correct_reward=2.0, penalty=1.0)
    correct = token_rewards(RolloutSignals(1.0, 0.0, torch.tensor([0.0, 1.0])), cfg)
    wrong = token_rewards(RolloutSignals(0.0, 0.0, torch.tensor([0.0, 1.0])), cfg)
    assert correct.tolist() == [2.0, 1.0] and wrong.tolist() == [0.0, -1.0]


def test_grpo_rule_counts_every_response_once():
    """Two short correct and two long wrong responses: GRPO gives +1 and -1 whatever the lengths
    (Eq. 2's token pooling would give +2.12 and -0.47)."""
    group = [RolloutSignals(1.0, 0.0, torch.zeros(2)), RolloutSignals(1.0, 0.0, torch.zeros(2)),
             RolloutSignals(0.0, 0.0, torch.zeros(9)), RolloutSignals(0.0, 0.0, torch.zeros(9))]  # fmt: skip
    grpo = factored_advantages(group, CreditConfig(reward_mode="outcome"))
    assert grpo.rollout_advantages.tolist() == pytest.approx([1, 1, -1, -1], abs=1e-5) and grpo.group_penalty == 0
    pooled = factored_advantages(group, CreditConfig(reward_mode="capo", penalty=0.0))
    assert pooled.rollout_advantages.tolist() == pytest.approx([2.12, 2.12, -0.47, -0.47], abs=5e-3)


def test_genorm_eq3_with_alpha_and_beta_one_half():
    cfg = CreditConfig(reward_mode="genorm", genorm_alpha=0.5, genorm_beta=0.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cases = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)]  # (r_v, r_m)
    expected = [sigmoid(0.5 * rm) + (0.5 * rv - 1) for rv, rm in cases]  # 0.1225, -0.3775, 0.0, -0.5
    assert expected == pytest.approx([0.1225, -0.3775, 0.0, -0.5], abs=1e-4)
    group = [RolloutSignals(rv, 0.0, torch.zeros(3), judge_verdict=rm) for rv, rm in cases]
    scores = torch.tensor(expected, dtype=torch.float64)
    want = (scores - scores.mean()) / (scores.std(unbiased=False) + cfg.eps)
    assert factored_advantages(group, cfg).rollout_advantages.tolist() == pytest.approx(want.tolist(), abs=1e-9)


def test_judge_verdict_is_the_majority_of_judgments_with_or_without_a_block():
    from capo_fast.credit import Rollout
    from capo_fast.critique import Critique

    r = Rollout([1], "x", False, [])
    r.critiques = [Critique(False, judgment=True), Critique(True, judgment=True), Critique(True, judgment=False)]
    assert r.judge_verdict == 1.0
    r.critiques = [Critique(False, judgment=True), Critique(True, judgment=False)]  # a tie is not a majority
    assert r.judge_verdict == 0.0


def test_genorm_format_reward_moves_the_group_advantages():
    """Two rollouts alike but for r_f: scores -0.5 + 0.2 and -0.5, so advantages +1 and -1 (std 0.1)."""
    cfg = CreditConfig(reward_mode="genorm", format_weight=0.2)
    group = [RolloutSignals(0.0, f, torch.zeros(2), judge_verdict=0.0) for f in (1.0, 0.0)]
    got = factored_advantages(group, cfg).rollout_advantages.tolist()
    assert got == pytest.approx([0.1 / (0.1 + cfg.eps), -0.1 / (0.1 + cfg.eps)], abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_genorm_defaults_keep_the_verifiers_order_for_any_alpha(alpha, beta_above_one):
    """The documented reason for beta = 1: the judge moves a score by sigmoid(alpha) - 1/2 < 1/2, so with
    beta >= 1 a verified answer the judge rejects still scores at least 1/2 above an unverified one it
    accepts; a large alpha never overflows."""
    from capo_fast.credit import _genorm_score

    cfg = CreditConfig(reward_mode="genorm", genorm_alpha=alpha, genorm_beta=1.0 + beta_above_one)
    rejected = _genorm_score(RolloutSignals(1.0, 0.0, torch.zeros(1), judge_verdict=0.0), cfg)
    accepted = _genorm_score(RolloutSignals(0.0, 0.0, torch.zeros(1), judge_verdict=1.0), cfg)
    sigmoid = 0.5 * (1 + math.tanh(alpha / 2))  # the logistic function written another way
    assert accepted == pytest.approx(sigmoid - 1.0, abs=1e-12)
    assert rejected - accepted >= 0.5 - 1e-12


def test_genorm_constants_are_refused_out_of_domain():
    from capo_fast.config import ConfigError, load_config

    for key, value in (("genorm_alpha", "-1000"), ("genorm_alpha", ".nan"), ("genorm_beta", ".nan"),
                       ("genorm_beta", ".inf")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"algorithm.{key}"):
            load_config(None, [f"--algorithm.{key}={value}"])
    assert load_config(None, ["--algorithm.genorm_alpha=0"]).algorithm.genorm_alpha == 0.0


def test_step_metrics_split_by_outcome(tiny_model_dir):
    from capo_fast.credit import Rollout, VotingConfig, assign_credit, rollout_metrics
    from capo_fast.critique import Critique

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["a = 1\n\nb = 2", "a = 3\n\nb = 5"]
    group = [Rollout(tok(t)["input_ids"], t, False, split_steps(t)) for t in texts]
    group[0].correct, group[1].correct = 1.0, 0.0
    group[0].critiques = [Critique(True, frozenset(), True), Critique(True, frozenset(), True)]
    group[1].critiques = [Critique(True, frozenset({1}), False), Critique(True, frozenset({1, 5 - 5}), True, 1)]
    assign_credit([group], tok, VotingConfig("intersection"), CreditConfig())
    assert group[1].vote.weights == [0.0, 1.0] and group[1].credit.max() == 1.0
    m = rollout_metrics(group, CreditConfig(), num_critiques=2)
    assert m["credit/flagged_step_rate_correct"] == 0.0 and m["credit/flagged_step_rate_incorrect"] == 0.5
    assert m["judge/verifier_agreement"] == 0.75  # three of four judgments match r_v
    assert m["judge/out_of_range_indices"] == 1.0 and m["judge/abstentions"] == 0.0
    assert m["judge/critique_agreement"] == pytest.approx((1.0 + 0.5) / 2)
    assert group[0].advantage > 0 > group[1].advantage
    without_judge = rollout_metrics(group, CreditConfig(reward_mode="outcome"), num_critiques=0)
    assert not [k for k in without_judge if k.startswith("judge/")], "a run without a judge logs no judge metrics"


def test_genorm_counts_a_verdict_without_a_block_as_a_usable_critique(tiny_model_dir):
    """Judge texts in the paper's format. A Yes that stops at the judgment line is a valid critique for every
    mode (it flags nothing); a No without a block serves GenORM (Eq. 3 reads only r_m) and abstains under CAPO."""
    from capo_fast.credit import Rollout, VotingConfig, assign_credit, rollout_metrics
    from capo_fast.critique import parse_critique

    line = "Judgment: Is the solution correct (Yes/No)?"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    group = [Rollout(tok("a = 1")["input_ids"], "a = 1", False, split_steps("a = 1")) for _ in range(2)]
    group[0].critiques = [parse_critique(f"{line} Yes", 1)] * 2
    group[1].critiques = [parse_critique(f"{line} No\nThe sum is off.", 1), parse_critique("I cannot tell.", 1)]
    for mode, failed in (("genorm", 1 / 4), ("capo", 2 / 4)):
        cfg = CreditConfig(reward_mode=mode)
        assign_credit([group], tok, VotingConfig(), cfg)
        assert rollout_metrics(group, cfg, num_critiques=2)["credit/failed_critique_rate"] == failed, mode
    assert [r.judge_verdict for r in group] == [1.0, 0.0]
    assert group[0].vote.num_valid == 2 and group[0].vote.counted and group[0].vote.weights == [0.0]
    assert group[1].vote.num_valid == 0 and not group[1].vote.counted


def test_the_log_names_the_method_and_its_constants():
    from capo_fast.credit import describe

    assert describe(CreditConfig()) == "CAPO (Eq. 1-2): reward_mode=capo, C=2.0, P=1.0"
    assert describe(CreditConfig(reward_mode="outcome")) == "GRPO-Rule: reward_mode=outcome"
    genorm = describe(CreditConfig(reward_mode="genorm", genorm_alpha=0.5, genorm_beta=0.5))
    assert genorm == "GRPO-GenORM (Eq. 3): reward_mode=genorm, alpha=0.5, beta=0.5"


def test_rollout_samples_carry_what_the_judge_wrote_and_each_steps_advantage(tiny_model_dir, tmp_path):
    import json

    from capo_fast.credit import Rollout, VotingConfig, assign_credit
    from capo_fast.critique import parse_critique
    from capo_fast.data import Problem, PromptGroup
    from capo_fast.metrics import RolloutSamples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["a = 1\n\nb = 2", "a = 3\n\nb = 5"]
    group = [Rollout(tok(t)["input_ids"], t, False, split_steps(t)) for t in texts]
    group[0].correct = 1.0
    judge = "Step 1 is wrong.\nJudgment: Is the solution correct (Yes/No)? No\n<incorrect_steps>1</incorrect_steps>"
    group[1].critiques = [parse_critique(judge, 2)] * 2
    assign_credit([group], tok, VotingConfig("majority"), CreditConfig())
    samples = RolloutSamples(tmp_path / "rollouts.jsonl", enabled=True, per_step=2)
    samples.write(3, [PromptGroup(Problem("a and b?", "2"), [7, 8], group)])
    right, wrong = (json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines())
    assert wrong["critiques"][0]["text"] == judge and wrong["critiques"][0]["incorrect"] == [1]
    assert [s["vote"] for s in wrong["steps"]] == [0.0, 1.0]
    a, p = wrong["advantage"], wrong["group_penalty"]
    assert [s["token_advantage"] for s in wrong["steps"]] == pytest.approx([a, a - p]) and p > 0
    assert right["step"] == 3 and right["correct"] == 1.0 and right["critiques"] == []
