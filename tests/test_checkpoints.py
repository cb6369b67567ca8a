"""Which checkpoints a run keeps: the latest `checkpoint.keep` periodic ones, and the best by eval accuracy."""

import json
from types import SimpleNamespace

from capo_fast.config import Config
from capo_fast.data import PromptSampler
from capo_fast.train import Run


class FolderTrainer:
    """Writes checkpoint folders and the `latest` pointer as DeepSpeed's save_checkpoint does."""

    def save(self, directory, tag, client_state, *, latest=True):
        (directory / tag).mkdir(parents=True, exist_ok=True)  # a tag saved again is overwritten
        (directory / tag / "state.json").write_text(json.dumps({"step": client_state["step"]}))
        if latest:
            (directory / "latest").write_text(tag)


def test_the_best_checkpoint_outlives_pruning_and_leaves_latest_alone(tmp_path):
    run = Run.__new__(Run)  # the checkpoint logic only: no model, engines or process group
    config = Config()
    config.checkpoint.keep = 1
    run.config, run.rank, run.out = config, 0, tmp_path
    run.trainer, run.sampler = FolderTrainer(), PromptSampler(4, seed=0)
    for step, accuracy in ((1, 0.2), (2, 0.5), (3, 0.3)):
        run.step = step
        run.save_checkpoint()
        run.keep_if_best(accuracy)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["best", "step3"]
    assert json.loads((folder / "best.json").read_text()) == {"step": 2, "eval/accuracy": 0.5}
    assert json.loads((folder / "best" / "state.json").read_text()) == {"step": 2}
    assert run.latest_checkpoint() == "step3"  # a restart resumes from the newest, not the best


def test_a_resumed_run_compares_against_the_best_before_the_restart(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.json").write_text(json.dumps({"step": 4, "eval/accuracy": 0.6}) + "\n")
    run = Run.__new__(Run)
    run.config, run.rank, run.out, run.step = Config(), 0, tmp_path, 7
    run.trainer, run.sampler = FolderTrainer(), SimpleNamespace(state_dict=lambda: {})
    run.keep_if_best(0.55)
    assert not (tmp_path / "checkpoints" / "best").exists()
    run.keep_if_best(0.65)
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 7
