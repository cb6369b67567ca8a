"""Token credit: step votes to token weights, token rewards (Eq. 1) and group advantages (Eq. 2).

R_t = C * r_v + w_f * r_f - P * e_t, and A_t = (R_t - mean_g) / (std_g + eps) with mean and
(population) std pooled over every response token of the prompt's group. Because R_t is constant
within a rollout up to the credit term, A_t = a_i - p_g * e_t: the factored form the fused kernel
consumes (per-rollout a_i, per-token e_t, per-group p_g = P / (std_g + eps)).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from capo_fast.critique import Critique, Step, StepVote, critique_agreement, majority_judgment, vote

# ---- step spans to token credit ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the byte-to-printable-character table of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_SP_BYTE = {f"<0x{b:02X}>": bytes([b]) for b in range(256)}


def _token_bytes(tokenizer, token_ids: Sequence[int]) -> list[bytes] | None:
    """The bytes each token contributes to the decoded text, or None if the vocabulary is not byte-mapped."""
    special = set(tokenizer.all_special_ids)
    decoder = _byte_level_decoder()
    pieces = []
    for tid, tok in zip(token_ids, tokenizer.convert_ids_to_tokens(list(token_ids)), strict=True):
        if tid in special or tok is None:
            pieces.append(b"")
        elif tok in _SP_BYTE:  # SentencePiece byte fallback
            pieces.append(_SP_BYTE[tok])
        elif all(c in decoder for c in tok):
            pieces.append(bytes(decoder[c] for c in tok))
        elif "▁" in tok:
            pieces.append(tok.replace("▁", " ").encode("utf-8"))
        else:
            return None
    return pieces


def token_char_spans(tokenizer, token_ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span [start, end) of `text` covered by each of the policy's own tokens.

    Works from the tokens' bytes, so a token holding part of a multi-byte character covers that whole
    character. `text` may be a prefix of what the tokens decode to (a stop string trimmed off, a cut
    character held back): tokens past its end get empty spans, as do special tokens (EOS). Vocabularies
    whose tokens do not map to bytes are decoded a few tokens at a time. Time is linear in the tokens.
    """
    n = len(text)
    pieces = _token_bytes(tokenizer, token_ids)
    if pieces is not None:
        spans, decoded = _spans_from_bytes(pieces)
        if decoded.startswith(text):
            return [(min(a, n), min(b, n)) for a, b in spans]
    return _spans_by_window_decoding(tokenizer, token_ids, n)


def _spans_from_bytes(pieces: Sequence[bytes]) -> tuple[list[tuple[int, int]], str]:
    """Each piece's character span in the UTF-8 decoding of all of them (invalid bytes as U+FFFD, as
    tokenizers decode them), and that decoding. A piece that leaves a character unfinished covers it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    spans, chars, out = [], 0, []
    for piece in pieces:
        new = decoder.decode(piece)
        unfinished = piece != b"" and decoder.getstate()[0] != b""
        spans.append((chars, chars + len(new) + unfinished) if piece else (chars, chars))
        chars += len(new)
        out.append(new)
    out.append(decoder.decode(b"", final=True))
    return spans, "".join(out)


MAX_SILENT_TOKENS = 8  # tokens without text after which a window restarts (a character is at most 4 bytes)


def _spans_by_window_decoding(tokenizer, token_ids: Sequence[int], text_len: int) -> list[tuple[int, int]]:
    """What decoding every prefix would give each token (the text it adds; an unfinished character, U+FFFD,
    not yet), from a short window of tokens, as vLLM detokenizes incrementally
    (vllm/tokenizers/detokenizer_utils.py:176-276): the window starts a few tokens back (`prefix`), so the
    decoder keeps its context (SentencePiece's leading spaces), and moves on once its text is complete.
    Decoding every prefix instead cost O(L^2) (16 s for 8,192 tokens)."""
    ids = list(token_ids)
    special = set(tokenizer.all_special_ids)
    spans, pos, prefix, read = [], 0, 0, 0
    placed, shown = "", 0  # decode(ids[prefix:read]), and how much of the window's text tokens already hold
    for k, tid in enumerate(ids):
        added = 0
        if tid not in special:
            decoded = tokenizer.decode([t for t in ids[prefix : k + 1] if t not in special], skip_special_tokens=True)
            visible = len(decoded.rstrip("\ufffd"))
            added, shown = max(visible - shown, 0), max(visible, shown)
            if len(decoded) > len(placed) and not decoded.endswith("\ufffd"):
                prefix, read = read, k + 1
                placed = tokenizer.decode([t for t in ids[prefix:read] if t not in special], skip_special_tokens=True)
                shown = len(placed)
            elif k + 1 - read > MAX_SILENT_TOKENS:  # no text from many tokens: start afresh after them
                prefix = read = k + 1
                placed, shown = "", 0
        end = min(pos + added, text_len)
        spans.append((pos, end))
        pos = end
    return spans


def token_credit(
    steps: Sequence[Step], step_weights: Sequence[float], spans: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """e_t per token: the largest vote weight among the steps the token's characters touch.

    A token straddling a step boundary is penalised if either step is; empty spans get 0.
    """
    credit = torch.zeros(len(spans), dtype=torch.float32)
    flagged = [(s.start, s.end, w) for s, w in zip(steps, step_weights, strict=True) if w > 0]
    for t, (a, b) in enumerate(spans):
        if b > a:
            credit[t] = max((w for s, e, w in flagged if a < e and s < b), default=0.0)
    return credit


# ---- rewards and advantages --------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditConfig:
    """Eq. 1 to 3 constants. `reward_mode` picks an entry of REWARD_MODES."""

    correct_reward: float = 2.0  # C
    penalty: float = 1.0  # P
    format_weight: float = 0.0  # w_f
    eps: float = 1e-6
    reward_mode: str = "capo"
    genorm_alpha: float = 1.0
    genorm_beta: float = 1.0

    def __post_init__(self):
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode {self.reward_mode!r} is not one of {sorted(REWARD_MODES)}")
        if self.penalty < 0 or self.eps <= 0:
            raise ValueError("penalty must be >= 0 and eps > 0")


@dataclass(frozen=True)
class RolloutSignals:
    """What one rollout brings to credit assignment."""

    correct: float  # r_v
    formatted: float  # r_f
    credit: torch.Tensor  # e_t per response token
    judge_verdict: float = 0.0  # r_m in {0, 1} for GenORM: the majority of the N judgments says "correct"


def _capo_score(sig: RolloutSignals, cfg: CreditConfig) -> float:
    return cfg.correct_reward * sig.correct + cfg.format_weight * sig.formatted


def _sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow: e^-x is never formed for x < 0."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _genorm_score(sig: RolloutSignals, cfg: CreditConfig) -> float:
    """Eq. 3, sigmoid(alpha * r_m) + (beta * r_v - 1), plus the format reward w_f * r_f that the paper's
    common settings (Table 5) give every method."""
    verdict = _sigmoid(cfg.genorm_alpha * sig.judge_verdict)
    return verdict + cfg.genorm_beta * sig.correct - 1.0 + cfg.format_weight * sig.formatted


def _critique_votes(c: Critique) -> bool:
    """A block, or a Yes without one (it votes for no wrong step)."""
    return c.valid


def _critique_has_verdict(c: Critique) -> bool:
    return c.valid or c.judgment is not None


@dataclass(frozen=True)
class RewardMode:
    """How a run scores and normalises a prompt group (DESIGN.md 1.5-1.6)."""

    score: Callable[[RolloutSignals, CreditConfig], float]  # the per-rollout outcome score
    token_penalty: bool  # Eq. 1's -P * e_t on the tokens of flagged steps
    per_response: bool  # GRPO: normalise the n scores (each response once); else Eq. 2's token pooling
    needs_judge: Callable[[float], bool]  # given the step penalty P: whether the mode reads critiques
    name: str  # what the logs call the run
    params: Callable[[CreditConfig], str]  # the constants the logs name
    usable: Callable[[Critique], bool] = _critique_votes  # a critique this mode reads (else: failed)


REWARD_MODES: dict[str, RewardMode] = {
    "capo": RewardMode(
        _capo_score, True, False, lambda penalty: penalty > 0, "CAPO (Eq. 1-2)",
        lambda cfg: f", C={cfg.correct_reward}, P={cfg.penalty}",
    ),
    "outcome": RewardMode(_capo_score, False, True, lambda penalty: False, "GRPO-Rule", lambda cfg: ""),
    "genorm": RewardMode(
        _genorm_score, False, True, lambda penalty: True, "GRPO-GenORM (Eq. 3)",
        lambda cfg: f", alpha={cfg.genorm_alpha}, beta={cfg.genorm_beta}", _critique_has_verdict,
    ),
}  # fmt: skip
# Metrics that count events: summed over ranks, where the others are averaged.
COUNTED_METRICS = frozenset(
    {"credit/rollouts_without_critique", "judge/abstentions", "judge/out_of_range_indices", "judge/votes_not_counted"}
)


def describe(cfg: CreditConfig) -> str:
    """The run's method in words, for the logs: which of CAPO and its baselines it is."""
    mode = REWARD_MODES[cfg.reward_mode]
    return f"{mode.name}: reward_mode={cfg.reward_mode}{mode.params(cfg)}"


def token_rewards(sig: RolloutSignals, cfg: CreditConfig) -> torch.Tensor:
    """R_t of Eq. 1 for every response token of one rollout (a constant for the baselines)."""
    mode = REWARD_MODES[cfg.reward_mode]
    rewards = torch.full_like(sig.credit, mode.score(sig, cfg), dtype=torch.float64)
    return rewards - cfg.penalty * sig.credit.double() if mode.token_penalty else rewards


def _pooled_stats(rewards: Sequence[torch.Tensor], eps: float) -> tuple[float, float]:
    """Mean and std + eps over every token of the group (population std; a constant group gives A = 0)."""
    pooled = torch.cat([r.double() for r in rewards]) if rewards else torch.zeros(0, dtype=torch.float64)
    if pooled.numel() == 0:
        return 0.0, 1.0
    return pooled.mean().item(), pooled.std(unbiased=False).item() + eps


def group_advantages(rewards: Sequence[torch.Tensor], eps: float = 1e-6) -> list[torch.Tensor]:
    """Eq. 2 in the direct form: normalise token rewards by the group's pooled mean and std."""
    mean, scale = _pooled_stats(rewards, eps)
    return [(r.double() - mean) / scale for r in rewards]


@dataclass(frozen=True)
class FactoredAdvantages:
    """A_t = rollout_advantages[i] - group_penalty * credit_i[t]."""

    rollout_advantages: torch.Tensor  # [n] a_i, float64: a_i and p_g * e_t can be large and nearly cancel
    group_penalty: float  # p_g
    credits: list[torch.Tensor]  # e_t per rollout


def factored_advantages(group: Sequence[RolloutSignals], cfg: CreditConfig) -> FactoredAdvantages:
    """Advantages in the form the fused kernel consumes.

    CAPO: Eq. 2, equal to `group_advantages` of `token_rewards`. GRPO-Rule and GenORM:
    A_i = (s_i - mean(s)) / (std(s) + eps) over the n rollout scores, each response counted once.
    """
    mode = REWARD_MODES[cfg.reward_mode]
    scores = torch.tensor([mode.score(sig, cfg) for sig in group], dtype=torch.float64)
    if mode.per_response:
        mean, scale = _pooled_stats([scores], cfg.eps)
        return FactoredAdvantages((scores - mean) / scale, 0.0, [s.credit for s in group])
    mean, scale = _pooled_stats([token_rewards(sig, cfg) for sig in group], cfg.eps)
    penalty = cfg.penalty if mode.token_penalty else 0.0
    return FactoredAdvantages((scores - mean) / scale, float(penalty / scale), [s.credit for s in group])


# ---- one step's rollouts, as records ---------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled answer as it goes through a step: verify, critique, vote, credit, advantage (its prompt
    and the other answers to it: data.PromptGroup)."""

    token_ids: list[int]
    text: str
    truncated: bool
    steps: list[Step]
    correct: float = 0.0  # r_v
    formatted: float = 0.0  # r_f
    critiques: list[Critique] = field(default_factory=list)
    vote: StepVote | None = None
    credit: torch.Tensor | None = None  # e_t per response token
    advantage: float = 0.0  # a_i
    group_penalty: float = 0.0  # p_g = P / (std_g + eps) of its group: A_t = advantage - group_penalty * e_t

    @property
    def judge_verdict(self) -> float:
        """r_m of Eq. 3: 1 when a strict majority of the judgments (block or not) says correct."""
        return float(majority_judgment(self.critiques) is True)

    def token_reward(self, cfg: CreditConfig) -> torch.Tensor:
        return token_rewards(RolloutSignals(self.correct, self.formatted, self.credit, self.judge_verdict), cfg)


@dataclass(frozen=True)
class VotingConfig:
    mode: str = "majority"
    threshold: float = 0.5
    min_valid: int = 1


def assign_credit(groups: Sequence[Sequence[Rollout]], tokenizer, voting: VotingConfig, cfg: CreditConfig) -> None:
    """Fills vote, credit, advantage and group_penalty of every rollout; each group is one prompt's n rollouts."""
    for group in groups:
        for r in group:
            r.vote = vote(r.critiques, len(r.steps), voting.mode, voting.threshold, voting.min_valid)
            r.credit = token_credit(r.steps, r.vote.weights, token_char_spans(tokenizer, r.token_ids, r.text))
        signals = [RolloutSignals(r.correct, r.formatted, r.credit, r.judge_verdict) for r in group]
        adv = factored_advantages(signals, cfg)
        for r, a in zip(group, adv.rollout_advantages.tolist(), strict=True):
            r.advantage, r.group_penalty = a, adv.group_penalty


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def rollout_metrics(rollouts: Sequence[Rollout], cfg: CreditConfig, num_critiques: int) -> dict[str, float]:
    """The training dynamics of a step (the paper's plots) and what the judge did, for this rank's rollouts.

    Means over rollouts (or over steps where named), which the loop averages over ranks, and the counts
    of COUNTED_METRICS, which it sums. A critique the reward mode cannot read counts as failed. A run
    without a judge (num_critiques=0) has no judge/* metrics.
    """
    usable = REWARD_MODES[cfg.reward_mode].usable
    valid = [sum(usable(c) for c in r.critiques) for r in rollouts]
    metrics = credit_metrics([r.vote.weights for r in rollouts], valid, num_critiques)
    per_token = [float(r.token_reward(cfg).mean()) for r in rollouts if r.credit.numel()]
    metrics["reward/token_mean"] = _mean(per_token)
    for label, wanted in (("correct", 1.0), ("incorrect", 0.0)):
        weights = [w for r in rollouts if r.correct == wanted for w in r.vote.weights]
        metrics[f"credit/flagged_step_rate_{label}"] = _mean([float(w > 0) for w in weights])
    if not num_critiques:  # no judge in this run: no judge/* metrics, rather than zeros that read as measured
        return metrics
    judged = [(c.judgment, r.correct) for r in rollouts for c in r.critiques if c.judgment is not None]
    metrics["judge/verifier_agreement"] = _mean([float(j == bool(v)) for j, v in judged])
    agreements = [critique_agreement(r.critiques, len(r.steps)) for r in rollouts]
    metrics["judge/critique_agreement"] = _mean([a for a in agreements if a is not None])
    metrics["judge/abstentions"] = float(sum(not c.valid for r in rollouts for c in r.critiques))
    metrics["judge/out_of_range_indices"] = float(sum(c.out_of_range for r in rollouts for c in r.critiques))
    metrics["judge/votes_not_counted"] = float(sum(not r.vote.counted for r in rollouts if r.critiques))
    return metrics


def credit_metrics(
    step_weights: Sequence[Sequence[float]], valid_critiques: Sequence[int], num_critiques: int
) -> dict[str, float]:
    """Flagged-step rate (over all steps) and failed-critique rate for a batch of rollouts."""
    steps = sum(len(w) for w in step_weights)
    flagged = sum(sum(1 for x in w if x > 0) for w in step_weights)
    asked = num_critiques * len(valid_critiques)
    return {
        "credit/flagged_step_rate": flagged / steps if steps else 0.0,
        "credit/failed_critique_rate": 1.0 - sum(valid_critiques) / asked if asked else 0.0,
        "credit/rollouts_without_critique": float(sum(v == 0 for v in valid_critiques)),
    }
