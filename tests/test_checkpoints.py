"""Which checkpoints a run keeps: the latest `checkpoint.keep` periodic ones, and the best by eval accuracy."""

import json
import random
from types import SimpleNamespace

import torch

from capo_fast.checkpoints import Checkpoints
from capo_fast.data import PromptSampler


class FolderTrainer:
    """Writes checkpoint folders and the `latest` pointer as DeepSpeed's save_checkpoint does."""

    def __init__(self):
        self.states = {}

    def save(self, directory, tag, client_state, *, latest=True):
        (directory / tag).mkdir(parents=True, exist_ok=True)  # a tag saved again is overwritten
        (directory / tag / "state.json").write_text(json.dumps({"step": client_state["step"]}))
        self.states[tag] = client_state
        if latest:
            (directory / "latest").write_text(tag)

    def load(self, directory, tag):
        return self.states[tag]


def test_the_best_checkpoint_outlives_pruning_and_leaves_latest_alone(tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoints = Checkpoints(folder, FolderTrainer(), PromptSampler(4, seed=0), rank=0, keep=1)
    for step, accuracy in ((1, 0.2), (2, 0.5), (3, 0.3)):
        checkpoints.save(step)
        checkpoints.keep_if_best(step, accuracy)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["best", "step3"]
    assert json.loads((folder / "best.json").read_text()) == {"step": 2, "eval/accuracy": 0.5}
    assert json.loads((folder / "best" / "state.json").read_text()) == {"step": 2}
    assert checkpoints.latest() == "step3"  # a restart resumes from the newest, not the best


def test_a_resumed_run_compares_against_the_best_before_the_restart(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.json").write_text(json.dumps({"step": 4, "eval/accuracy": 0.6}) + "\n")
    sampler = SimpleNamespace(state_dict=lambda: {})
    checkpoints = Checkpoints(tmp_path / "checkpoints", FolderTrainer(), sampler, rank=0, keep=2)
    checkpoints.keep_if_best(7, 0.55)
    assert not (tmp_path / "checkpoints" / "best").exists()
    checkpoints.keep_if_best(7, 0.65)
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 7


def test_resume_restores_the_step_the_sampler_and_the_random_streams(tmp_path, capsys):
    trainer, sampler = FolderTrainer(), PromptSampler(10, seed=3)
    checkpoints = Checkpoints(tmp_path / "checkpoints", trainer, sampler, rank=0, keep=2)
    assert checkpoints.resume() is None  # nothing saved yet
    sampler.next_batch(4)
    checkpoints.save(5)
    batch, draws, number = sampler.next_batch(3), torch.rand(2), random.random()
    restarted = PromptSampler(10, seed=3)
    assert Checkpoints(tmp_path / "checkpoints", trainer, restarted, rank=0, keep=2).resume() == 5
    assert restarted.next_batch(3) == batch  # the prompts after step 5, not the first ones again
    assert torch.equal(torch.rand(2), draws) and random.random() == number
    assert f"resumed from {tmp_path / 'checkpoints' / 'step5'} at step 5" in capsys.readouterr().out
