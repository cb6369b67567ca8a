"""Sampling seeds that never overlap: across prompts, children of one request, ranks, critiques and steps.

vLLM gives child k of a request with seed s the seed s + k (vllm/v1/engine/parallel_sampling.py:76-81;
the OpenAI server builds the same SamplingParams for a remote judge), so two requests whose seeds are
closer than their number of children share samples. Each request's seed is therefore the first of a block
as wide as its children, at the request's global index within the step: the same seeds whatever the
number of ranks, the batch split or a resume. Streams (rollouts, critiques, mini-batch order) and steps
get disjoint bit fields of one 63-bit integer (vLLM's OpenAI server accepts int64 seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

_INDEX_BITS = 32  # seeds of one stream in one step: prompts x rollouts x critiques < 4e9
_STEP_BITS = 20  # steps before the seeds of a stream repeat (over a million)
_STREAM_BITS = 2
_BASE_BITS = 63 - _INDEX_BITS - _STEP_BITS - _STREAM_BITS  # trainer.seed modulo 512


class Stream(IntEnum):
    ROLLOUT = 0
    CRITIQUE = 1
    SHUFFLE = 2


def sampling_seed(base: int, stream: Stream, step: int, index: int) -> int:
    """The seed of the `index`-th seed slot of `stream` in `step` of a run seeded with `base`."""
    if not 0 <= index < 1 << _INDEX_BITS:
        raise ValueError(f"seed index {index} is outside [0, 2**{_INDEX_BITS})")
    high = ((base % (1 << _BASE_BITS)) << _STREAM_BITS | int(stream)) << _STEP_BITS | step % (1 << _STEP_BITS)
    return high << _INDEX_BITS | index


def rollout_seeds(base: int, step: int, positions: list[int], n: int) -> list[int]:
    """One seed per prompt (its position in the step's global batch), n children apart."""
    return [sampling_seed(base, Stream.ROLLOUT, step, p * n) for p in positions]


def critique_seed(base: int, step: int, first_rollout: int, num_critiques: int) -> int:
    """The seed of a rank's first critique request, whose rollout has global index `first_rollout` in the
    step; request i of the rank then takes this + i * num_critiques (`critique_request_seeds`)."""
    return sampling_seed(base, Stream.CRITIQUE, step, first_rollout * num_critiques)


def critique_request_seeds(first: int, count: int, num_critiques: int) -> list[int]:
    """Seeds of `count` consecutive critique requests of N = num_critiques children each."""
    return [first + i * num_critiques for i in range(count)]


@dataclass(frozen=True)
class RankSeeds:
    """A rank's seeds for one step: per prompt (n children each), and its first critique request's."""

    rollouts: list[int]
    critiques: int


def rank_seeds(base: int, step: int, positions: list[int], n: int, num_critiques: int) -> RankSeeds:
    """Seeds of the rank holding the prompts at `positions` of the step's global batch (contiguous, as
    train.my_share gives them): its rollouts' global indices start at positions[0] * n."""
    first_rollout = positions[0] * n if positions else 0
    return RankSeeds(rollout_seeds(base, step, positions, n), critique_seed(base, step, first_rollout, num_critiques))
