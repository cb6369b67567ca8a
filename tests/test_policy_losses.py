"""The policy-loss registry: each loss against numbers worked out by hand and a float64 statement of it.

Hand-computed vectors: two sequences (2 and 3 tokens) with CAPO credit, a_i = (1, -0.5), p = 0.5 and
e_t = (0, 1 | 1, 0, 0), so A_t = (1, 0.5 | -1, -0.5, -0.5); eps_low = eps_high = 0.2.
"""

from __future__ import annotations

import math

import pytest
import torch

from capo_fast.config import ConfigError, load_config
from capo_fast.kernels import PolicyLossOptions, aggregation_weights, fused_linear_policy_loss, reference
from capo_fast.kernels.policy_loss import token_mean_weights
from capo_fast.policy_losses import (
    POLICY_LOSSES,
    PolicyLossInputs,
    aggregate,
    compute_policy_loss,
    register_logprob_loss,
)

SEQ_IDS = torch.tensor([0, 0, 1, 1, 1])
ADVANTAGES = torch.tensor([1.0, 1.0, -0.5, -0.5, -0.5], dtype=torch.float64)
CREDIT = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
GROUP_PENALTY = torch.full((5,), 0.5, dtype=torch.float64)
A_T = [1.0, 0.5, -1.0, -0.5, -0.5]


def _inputs(
    old, weights, labels=None, ref=None, seq_ids=SEQ_IDS, adv=ADVANTAGES, credit=CREDIT, group_penalty=GROUP_PENALTY
):
    labels = torch.zeros(len(old), dtype=torch.long) if labels is None else labels
    return PolicyLossInputs(labels, old, adv, weights, seq_ids, credit, group_penalty, ref)


def _token_loss_and_grad(name, logp, inputs, options):
    """(total, per-token loss, clip codes, d total / d logp) through the registry's [N] statement."""
    logp = logp.clone().requires_grad_(True)
    per_token, code = POLICY_LOSSES[name].token_loss(logp, inputs, options)
    out = aggregate(POLICY_LOSSES[name].token_loss, logp, torch.zeros_like(logp), inputs, options, vocab_size=1)
    out.loss.backward()
    return out.loss.item(), per_token.detach(), out.clipped, logp.grad


# ---- GSPO --------------------------------------------------------------------------------------------

# log-ratios (0.1, 0.3 | -0.3, 0, -0.3): sequence means 0.2 and -0.2, so s_0 = e^0.2 = 1.2214027582 (above
# 1 + eps with A > 0: clipped to 1.2, no gradient) and s_1 = e^-0.2 = 0.8187307531 (inside the range).
GSPO_OLD = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], dtype=torch.float64)
GSPO_LOGP = GSPO_OLD + torch.tensor([0.1, 0.3, -0.3, 0.0, -0.3], dtype=torch.float64)
S1 = 0.8187307531
GSPO_TOKEN_LOSS = [-1.2, -0.6, S1 * 1.0, S1 * 0.5, S1 * 0.5]  # -A_t * 1.2 | -A_t * s_1
GSPO_CODES = [2, 2, 0, 0, 0]
# Weights per token: seq-mean-token-mean 1/(2*2), 1/(3*2); token-mean 1/5; token-sum-norm (L=4) 1/(4*2).
GSPO_CASES = {
    "seq-mean-token-mean": ([0.25, 0.25] + [1 / 6] * 3, -0.45 + 2 * S1 / 6),  # -0.1770897490
    "token-mean": ([0.2] * 5, (-1.8 + 2 * S1) / 5),  # -0.0325076988
    "seq-mean-token-sum-norm": ([0.125] * 5, (-1.8 + 2 * S1) / 8),  # -0.0203173117
}


@pytest.mark.parametrize("mode", sorted(GSPO_CASES))
def test_gspo_hand_computed(mode):
    weights, expected = GSPO_CASES[mode]
    w = torch.tensor(weights, dtype=torch.float64)
    torch.testing.assert_close(aggregation_weights(torch.ones(5), SEQ_IDS, mode, norm_length=4.0).double(), w)
    total, per_token, codes, grad = _token_loss_and_grad("gspo", GSPO_LOGP, _inputs(GSPO_OLD, w), PolicyLossOptions())
    torch.testing.assert_close(per_token, torch.tensor(GSPO_TOKEN_LOSS, dtype=torch.float64), atol=1e-9, rtol=0)
    assert codes.tolist() == GSPO_CODES
    assert total == pytest.approx(expected, abs=1e-9)
    # GSPO-token: d loss_t / d logp_t = -A_t * s_i where unclipped (w_t times that), 0 where clipped.
    expected_grad = [0.0, 0.0] + [-a * S1 * wt for a, wt in zip(A_T[2:], weights[2:], strict=True)]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-9, rtol=0)


def _plain_gspo_token(logp, old, adv, seq_ids, eps_low, eps_high):
    """GSPO-token written sequence by sequence: s_t = sg[s_i] * pi_t / sg[pi_t], clipped PPO on s_t."""
    out = []
    for t in range(len(logp)):
        rows = (seq_ids == seq_ids[t]).nonzero()[:, 0]
        s_i = torch.exp((logp[rows] - old[rows]).mean()).detach()
        s_t = s_i * torch.exp(logp[t] - logp[t].detach())
        out.append(torch.maximum(-adv[t] * s_t, -adv[t] * s_t.clamp(1 - eps_low, 1 + eps_high)))
    return torch.stack(out)


def _random_case(seed, n=9, num_seqs=3, spread=0.15):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(n, generator=g, dtype=torch.float64) * spread
    seq_ids = torch.arange(n) * num_seqs // n
    adv = torch.randn(num_seqs, generator=g, dtype=torch.float64)[seq_ids]
    credit = (torch.rand(n, generator=g) > 0.5).double()
    group_penalty = torch.rand(num_seqs, generator=g, dtype=torch.float64)[seq_ids]
    return logp, old, seq_ids, adv, credit, group_penalty


@pytest.mark.parametrize("seed", range(4))
def test_gspo_gradient_matches_a_plain_float64_statement(seed):
    logp, old, seq_ids, adv, credit, group_penalty = _random_case(seed)
    w = aggregation_weights(torch.ones(len(logp)), seq_ids, "seq-mean-token-mean").double()
    options = PolicyLossOptions(eps_low=0.1, eps_high=0.12)
    inputs = _inputs(old, w, seq_ids=seq_ids, adv=adv, credit=credit, group_penalty=group_penalty)
    total, _, _, grad = _token_loss_and_grad("gspo", logp, inputs, options)
    x = logp.clone().requires_grad_(True)
    plain = (w * _plain_gspo_token(x, old, adv - group_penalty * credit, seq_ids, 0.1, 0.12)).sum()
    plain.backward()
    assert total == pytest.approx(plain.item(), abs=1e-12)
    torch.testing.assert_close(grad, x.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_gspo_is_the_sequence_level_objective_with_one_advantage_per_sequence(seed):
    """Without credit and with seq-mean-token-mean, GSPO-token equals the paper's sequence objective
    J = mean_i min(s_i A_i, clip(s_i) A_i) with s_i differentiable, value and gradient."""
    logp, old, seq_ids, adv, _, _ = _random_case(seed, spread=0.3)  # 3 sequences of 3 tokens
    w = torch.full((9,), 1 / 9, dtype=torch.float64)
    torch.testing.assert_close(aggregation_weights(torch.ones(9), seq_ids, "seq-mean-token-mean").double(), w)
    inputs = _inputs(old, w, seq_ids=seq_ids, adv=adv, credit=None, group_penalty=None)
    total, _, _, grad = _token_loss_and_grad("gspo", logp, inputs, PolicyLossOptions())
    x = logp.clone().requires_grad_(True)
    terms = []
    for i in range(3):
        rows = seq_ids == i
        s_i, a_i = torch.exp((x[rows] - old[rows]).mean()), adv[rows][0]
        terms.append(torch.minimum(s_i * a_i, s_i.clamp(0.8, 1.2) * a_i))
    (-torch.stack(terms).mean()).backward()
    assert total == pytest.approx(-torch.stack(terms).mean().item(), abs=1e-12)
    torch.testing.assert_close(grad, x.grad, atol=1e-12, rtol=0)


# ---- CISPO -------------------------------------------------------------------------------------------

# log-ratios (0.5, 0 | -0.5, 0.1, 0): r = (1.6487, 1 | 0.6065, 1.1052, 1), clipped to (1.2, 1 | 0.8, 1.1052, 1).
CISPO_LOGP = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], dtype=torch.float64)
CISPO_OLD = CISPO_LOGP - torch.tensor([0.5, 0.0, -0.5, 0.1, 0.0], dtype=torch.float64)
R3 = 1.1051709181  # e^0.1
# -sg(clip(r)) * A_t * logp_t per token: 1.2, 1.0 | -0.4, -0.75 * R3, -1.5
CISPO_TOKEN_LOSS = [1.2, 1.0, -0.4, -0.75 * R3, -1.5]
CISPO_TOKEN_MEAN = (1.2 + 1.0 - 0.4 - 0.75 * R3 - 1.5) / 5  # -0.1057756378
CISPO_GRAD = [-1.2 / 5, -0.5 / 5, 0.8 / 5, 0.5 * R3 / 5, 0.5 / 5]  # -sg(clip(r)) * A_t * w_t
CISPO_CODES = [2, 0, 1, 0, 0]


def test_cispo_hand_computed():
    w = torch.full((5,), 0.2, dtype=torch.float64)
    torch.testing.assert_close(aggregation_weights(torch.ones(5), SEQ_IDS, "token-mean").double(), w)
    total, per_token, codes, grad = _token_loss_and_grad(
        "cispo", CISPO_LOGP, _inputs(CISPO_OLD, w), PolicyLossOptions()
    )
    torch.testing.assert_close(per_token, torch.tensor(CISPO_TOKEN_LOSS, dtype=torch.float64), atol=1e-9, rtol=0)
    assert total == pytest.approx(CISPO_TOKEN_MEAN, abs=1e-9)
    assert codes.tolist() == CISPO_CODES
    torch.testing.assert_close(grad, torch.tensor(CISPO_GRAD, dtype=torch.float64), atol=1e-9, rtol=0)


def test_cispo_clip_range_is_eps_low_and_eps_high():
    w = torch.full((5,), 0.2, dtype=torch.float64)
    options = PolicyLossOptions(eps_low=0.5, eps_high=0.05)  # clip(r) = (1.05, 1 | 0.6065, 1.05, 1)
    total, *_ = _token_loss_and_grad("cispo", CISPO_LOGP, _inputs(CISPO_OLD, w), options)
    r2 = 0.6065306597  # e^-0.5
    expected = (1.05 * 1.0 + 1.0 + -r2 * 0.5 + -1.05 * 0.75 - 1.5) / 5
    assert total == pytest.approx(expected, abs=1e-9)


# ---- every loss through hidden states, with KL, entropy, temperature and a masked token -----------------


def _plain_cispo(logp, old, adv, eps_low, eps_high):
    return -torch.exp(logp - old).clamp(1 - eps_low, 1 + eps_high).detach() * adv * logp


def _plain_ppo(logp, old, adv, eps_low, eps_high):
    ratio = torch.exp(logp - old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_losses_on_hidden_states_match_float64(name, mode):
    n, h, v, num_seqs = 11, 16, 37, 3
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[4] = -100  # masked: out of the loss and of its sequence's mean ratio
    seq_ids = torch.arange(n) * num_seqs // n
    temperature, eps_low, eps_high, kl_coef, entropy_coef = 0.7, 0.2, 0.28, 0.05, 0.01
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp64, ent64 = reference.token_logprobs_and_entropy(h64 @ w64.T, labels, temperature)
    old = (logp64.detach() + torch.randn(n, generator=g, dtype=torch.float64) * 0.2).float()
    ref = (logp64.detach() + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(num_seqs, generator=g)[seq_ids]
    credit = (torch.rand(n, generator=g) > 0.5).float()
    group_penalty = torch.full((n,), 0.4)
    mask = (labels >= 0).float()
    w = aggregation_weights(mask, seq_ids, mode)
    options = PolicyLossOptions(temperature=temperature, eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                                entropy_coef=entropy_coef)  # fmt: skip

    x, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    inputs = PolicyLossInputs(labels, old, adv, w, seq_ids, credit, group_penalty, ref)
    out = compute_policy_loss(name, x, wt, inputs, options)
    out.loss.backward()

    # The float64 statement: only the tokens that count, every term written out.
    a_t = (adv - group_penalty * credit).double()
    old64, ref64, keep = old.double(), ref.double(), mask.bool()
    if name == "gspo":
        pg = _plain_gspo_token(logp64[keep], old64[keep], a_t[keep], seq_ids[keep], eps_low, eps_high)
    else:
        plain = _plain_cispo if name == "cispo" else _plain_ppo
        pg = plain(logp64[keep], old64[keep], a_t[keep], eps_low, eps_high)
    d = ref64[keep] - logp64[keep]
    token = pg + kl_coef * (torch.exp(d) - d - 1) - entropy_coef * ent64[keep]
    expected = (w.double()[keep] * token).sum()
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out.logprobs[keep].double(), logp64[keep].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(wt.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)
    assert out.clipped[4] == 0


def test_counted_skips_labels_outside_the_vocabulary_as_the_kernels_do():
    """A label >= V is a masked token (the kernels' rule and token_mean_weights'): counted() leaves it out,
    and so the [N] log-prob losses give it no part in the loss or in its sequence's mean ratio."""
    v = 7
    labels = torch.tensor([0, -100, 6, 7, 50, 3])
    weights = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.0])
    inputs = PolicyLossInputs(labels, torch.zeros(6), torch.ones(6), weights)
    assert inputs.counted(v).tolist() == [True, False, True, False, False, False]
    all_weighted = inputs._replace(loss_weights=torch.ones(6))
    assert torch.equal(all_weighted.counted(v), token_mean_weights(labels, v) != 0)

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(6, 4, generator=g), torch.randn(v, 4, generator=g)
    old, adv = -1.0 - torch.rand(6, generator=g), torch.tensor([1.0, 1.0, 1.0, -0.5, -0.5, -0.5])
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    labels = torch.tensor([0, 5, 6, 7, 50, 3])
    weights = torch.full((6,), 1 / 6)
    masked = torch.where(labels < v, labels, -100)
    options = PolicyLossOptions(eps_low=0.5, eps_high=0.5, entropy_coef=0.05)
    for name in ("gspo", "cispo"):
        out = compute_policy_loss(name, hidden, weight, PolicyLossInputs(labels, old, adv, weights, seq_ids), options)
        expected = compute_policy_loss(
            name, hidden, weight, PolicyLossInputs(masked, old, adv, weights, seq_ids), options
        )
        assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6, abs=1e-7), name
        assert torch.equal(out.logprobs, expected.logprobs) and torch.equal(out.clipped, expected.clipped)


def test_ppo_entry_is_the_fused_loss_unchanged():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(19, 8, generator=g)
    labels, old = torch.randint(0, 19, (6,), generator=g), -torch.rand(6, generator=g) * 3
    adv, credit, group_penalty = torch.randn(6, generator=g), torch.ones(6), torch.full((6,), 0.3)
    w = torch.full((6,), 1 / 6)
    options = PolicyLossOptions(eps_high=0.28, dual_clip=3.0)
    via_registry = compute_policy_loss("ppo", hidden, weight, PolicyLossInputs(
        labels, old, adv, w, torch.zeros(6, dtype=torch.long), credit, group_penalty), options)  # fmt: skip
    direct = fused_linear_policy_loss(hidden, weight, labels, old, adv, credit=credit, group_penalty=group_penalty,
                                      loss_weights=w, options=options)  # fmt: skip
    assert torch.equal(via_registry.loss, direct.loss) and torch.equal(via_registry.clipped, direct.clipped)


# ---- the registry ------------------------------------------------------------------------------------


def test_config_choices_are_the_registry_and_a_new_loss_needs_only_its_decorated_function():
    assert load_config(None).algorithm.policy_loss == "ppo"
    with pytest.raises(ConfigError, match=r"algorithm.policy_loss: 'grpo' is not one of \['cispo', 'gspo', 'ppo'\]"):
        load_config(None, ["--algorithm.policy_loss=grpo"])

    @register_logprob_loss("reinforce-test")
    def reinforce(logp, inputs, options):
        return -inputs.token_advantages(logp.dtype) * logp, torch.zeros_like(logp, dtype=torch.int8)

    try:
        assert load_config(None, ["--algorithm.policy_loss=reinforce-test"]).algorithm.policy_loss == "reinforce-test"
        hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
        labels = torch.tensor([1, 2, 3])
        inputs = PolicyLossInputs(labels, torch.zeros(3), torch.tensor([1.0, 1.0, -2.0]), torch.full((3,), 1 / 3),
                                  torch.tensor([0, 0, 1]))  # fmt: skip
        out = compute_policy_loss("reinforce-test", hidden, weight, inputs, PolicyLossOptions())
        logp = torch.log_softmax(hidden.double() @ weight.double().T, -1)[torch.arange(3), labels]
        assert out.loss.item() == pytest.approx((-(logp[0] + logp[1]) + 2 * logp[2]).item() / 3, rel=1e-5)
        with pytest.raises(ValueError, match="registered twice"):
            register_logprob_loss("reinforce-test")(reinforce)
    finally:
        del POLICY_LOSSES["reinforce-test"]


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_dual_clip_is_refused_where_a_loss_has_none(name):
    with pytest.raises(ConfigError, match=f"algorithm.dual_clip: policy_loss={name} has no dual clip"):
        load_config(None, [f"--algorithm.policy_loss={name}", "--algorithm.dual_clip=3"])
    assert load_config(None, ["--algorithm.policy_loss=ppo", "--algorithm.dual_clip=3"]).algorithm.dual_clip == 3
    inputs = PolicyLossInputs(torch.tensor([0]), torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1).long())
    with pytest.raises(ValueError, match=f"policy loss '{name}' has no dual clip"):
        compute_policy_loss(name, torch.randn(1, 2), torch.randn(3, 2), inputs, PolicyLossOptions(dual_clip=2.0))
    with pytest.raises(ValueError, match=r"unknown policy loss 'nope'; choose one of \['cispo', 'gspo', 'ppo'\]"):
        compute_policy_loss("nope", torch.randn(1, 2), torch.randn(3, 2), inputs, PolicyLossOptions())


def test_hand_numbers_are_what_the_comments_say():
    assert S1 == pytest.approx(math.exp(-0.2), abs=1e-10) and R3 == pytest.approx(math.exp(0.1), abs=1e-10)


# ---- through the DeepSpeed trainer ---------------------------------------------------------------------




def test_trainer_takes_the_loss_from_the_config(single_rank, tiny_model_dir):
    """At ratio 1 (old log-probs just recomputed), token-mean: GSPO's loss is -mean_t(A_t) and CISPO's
    -mean_t(A_t * logp_t), with A_t = a - p * e_t over packed micro-batches."""
    from capo_fast.trainer import PolicyTrainer, TrainSequence

    overrides = ["--model.path=tiny", "--trainer.micro_batch_tokens=64", "--trainer.lr=1e-3",
                 "--algorithm.aggregation=token-mean", "--rollout.sampling.temperature=1.0"]  # fmt: skip
    config = load_config(None, overrides)
    trainer = PolicyTrainer(config, tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    seqs = [
        TrainSequence(ids(p), ids(r), a, 0.5, (torch.rand(r, generator=g) > 0.5).float())
        for p, r, a in [(5, 7, 1.0), (3, 11, -0.5), (9, 2, 0.25)]
    ]
    adv = torch.cat([s.advantage - s.group_penalty * s.credit for s in seqs]).double()
    for name in ("gspo", "cispo"):
        trainer.config.algorithm.policy_loss = name
        trainer.compute_logprobs(seqs)
        logp = torch.cat([s.old_logprobs for s in seqs]).double()
        expected = -adv.mean() if name == "gspo" else -(adv * logp).mean()
        stats = trainer.train_mini_batch(seqs)
        assert stats["loss"] == pytest.approx(expected.item(), abs=1e-5), name
        assert stats["clipped"] == 0 and stats["skipped"] == 0 and stats["tokens"] == 20
