"""Every shipped config on 1, 2, 4 and 8 GPUs of a node: start-up checks, prompt shares, and sampling seeds
that never repeat across prompts, children, ranks and critiques."""

from pathlib import Path

import pytest

from capo_fast.config import Config, CriticConfig, load_config
from capo_fast.critics import ChatCritic, CritiqueRequest
from capo_fast.critique import split_steps
from capo_fast.seeds import Stream, rank_seeds, sampling_seed
from capo_fast.train import describe_shares, my_share

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
WORLDS = (1, 2, 4, 8)


def _config(path: Path | None) -> Config:
    return load_config(path) if path else Config().validate()  # None: `make train`'s embedded default


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda p: p.name if p else "default")
def test_every_config_starts_on_every_gpu_count_of_a_node(path, world, monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed_config paths are relative to the repository
    config = _config(path)
    config.check_world_size(world)
    prompts = list(range(config.trainer.prompts_per_step))
    shares = [my_share(prompts, rank, world) for rank in range(world)]
    assert [p for share in shares for p in share] == prompts, "every prompt on exactly one rank, in order"
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_uneven_shares_are_said_at_start():
    assert describe_shares(16, 8) is None
    note = describe_shares(12, 8)
    assert "1 or 2 prompt groups" in note and "multiple of 8" in note
    assert "ranks without a prompt" in describe_shares(4, 8)  # `make train` on an 8-GPU node
    assert [len(my_share(list(range(12)), r, 8)) for r in range(8)] == [1, 2, 1, 2, 1, 2, 1, 2]


class RecordingCritic(ChatCritic):
    """A chat critic whose backend records the seed of every request and answers nothing."""

    def __init__(self, num_critiques: int):
        super().__init__(CriticConfig(num_critiques=num_critiques, answer_format="free"))
        self.seeds: list[int] = []

    def _complete(self, messages, seeds, regexes):
        self.seeds += seeds
        return [[None] * self.config.num_critiques for _ in messages]


def _step_samples(config: Config, world: int, step: int) -> list[tuple[str, int]]:
    """(stream, seed) of every sample one step draws over `world` ranks: rollout children and critiques,
    as train_step computes them and as vLLM derives children (seed + k)."""
    n, N = config.rollout.n, config.critic.num_critiques
    request = CritiqueRequest("1 + 1?", split_steps("2"))
    samples = []
    for rank in range(world):
        positions = my_share(list(range(config.trainer.prompts_per_step)), rank, world)
        seeds = rank_seeds(config.trainer.seed, step, positions, n, N)
        samples += [("rollout", s + k) for s in seeds.rollouts for k in range(n)]
        critic = RecordingCritic(N)
        critic.critique([request] * (len(positions) * n), seed=seeds.critiques)
        samples += [("critique", s + k) for s in critic.seeds for k in range(N)]
    return samples


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda p: p.name if p else "default")
def test_sampling_seeds_are_disjoint_over_a_whole_step_and_the_same_for_any_world_size(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = _config(path)
    single = _step_samples(config, 1, step=3)
    n, N, prompts = config.rollout.n, config.critic.num_critiques, config.trainer.prompts_per_step
    assert len(single) == prompts * n * (1 + N)
    seeds = [s for _, s in single] + [s for _, s in _step_samples(config, 1, step=4)]
    seeds.append(sampling_seed(config.trainer.seed, Stream.SHUFFLE, 3, 0))
    assert len(set(seeds)) == len(seeds), "two samples share a seed"
    for world in WORLDS[1:]:
        assert sorted(_step_samples(config, world, step=3)) == sorted(single), f"world {world} draws other samples"


def test_adjacent_prompts_no_longer_share_children():
    """The old layout gave prompt p+1 seed s+1, so with n=16 it reused 15 of prompt p's children's seeds."""
    first, second = rank_seeds(0, 0, [0, 1], n=16, num_critiques=4).rollouts
    assert second - first == 16
