"""Loss aggregation as per-token weights: the fused kernels only ever compute sum(w_t * loss_t).

Each mode turns a loss mask and the sequence id of every token into weights. The normalisers can
be given globally (summed over data-parallel ranks) so every rank scales its loss the same way and
the gradient does not depend on how the batch was split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

AggregationMode = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def _token_mean(mask, seq_ids, num_tokens, num_seqs, norm_length):
    return mask / num_tokens


def _num_seqs(seq_ids: torch.Tensor) -> int:
    return int(seq_ids.max()) + 1 if seq_ids.numel() else 1


def _seq_mean_token_mean(mask, seq_ids, num_tokens, num_seqs, norm_length):
    tokens_per_seq = torch.zeros(_num_seqs(seq_ids), dtype=mask.dtype, device=mask.device)
    tokens_per_seq.index_add_(0, seq_ids, mask)
    return mask / (tokens_per_seq[seq_ids].clamp_min(1.0) * num_seqs)


def _seq_mean_token_sum_norm(mask, seq_ids, num_tokens, num_seqs, norm_length):
    if norm_length is None:
        raise ValueError("seq-mean-token-sum-norm needs norm_length (the maximum response length)")
    return mask / (norm_length * num_seqs)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregation_weights(
    loss_mask: torch.Tensor,
    seq_ids: torch.Tensor,
    mode: AggregationMode = "seq-mean-token-mean",
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Per-token loss weights for `fused_policy_loss(loss_weights=...)`.

    Args:
        loss_mask: [N] 1 for response tokens that count, 0 otherwise.
        seq_ids: [N] int64 index of the sequence each token belongs to (0..S-1).
        mode: `seq-mean-token-mean` (mean over tokens, then over sequences), `token-mean` (mean over
            all tokens) or `seq-mean-token-sum-norm` (token sum divided by `norm_length`, mean over
            sequences).
        global_num_tokens, global_num_seqs: normalisers summed over data-parallel ranks; default to the
            local counts (sequences that hold at least one counted token).
        norm_length: the constant length of `seq-mean-token-sum-norm`.

    Returns:
        [N] float32 weights; they sum to 1 over the global batch for the two mean modes.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {sorted(AGGREGATIONS)}")
    mask = loss_mask.to(torch.float32)
    seq_ids = seq_ids.long()
    if global_num_tokens is None:
        global_num_tokens = mask.sum().clamp_min(1.0)
    if global_num_seqs is None:
        counted = torch.zeros(_num_seqs(seq_ids), device=mask.device)
        counted.index_add_(0, seq_ids, mask)
        global_num_seqs = (counted > 0).sum().clamp_min(1).to(torch.float32)
    return AGGREGATIONS[mode](mask, seq_ids, global_num_tokens, global_num_seqs, norm_length)
