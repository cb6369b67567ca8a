"""A run's checkpoint folder: periodic checkpoints pruned to the newest few, the best one by held-out
accuracy kept apart, and resuming from the newest.

Every rank takes part in a save (DeepSpeed writes each rank's shards); what is decided from files (which
checkpoint is best, which old ones go) is decided on rank 0 alone, since another rank may read a stale
copy of the folder from a shared filesystem's cache.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Protocol

import torch

from capo_fast.distributed import broadcast_object

logger = logging.getLogger("capo_fast")


class CheckpointWriter(Protocol):
    """What the folder needs of the trainer (trainer.PolicyTrainer)."""

    def save(self, directory: Path, tag: str, client_state: dict, *, latest: bool = True) -> None: ...

    def load(self, directory: Path, tag: str) -> dict: ...


class ResumableSampler(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpoints:
    """The folder `checkpoints/` of a run: `step<N>` folders (the newest `keep` of them), `best` with
    best.json naming its step and accuracy, and DeepSpeed's `latest` pointer.

    Args:
        folder: the checkpoint folder (shared by every rank).
        trainer: writes and reads the model and optimizer shards.
        sampler: the prompt sampler, whose position is saved and restored with the step and the RNGs.
        rank: this process's rank; rank 0 makes the decisions.
        keep: periodic checkpoints kept (`checkpoint.keep`).
    """

    def __init__(self, folder: Path, trainer: CheckpointWriter, sampler: ResumableSampler, *, rank: int, keep: int):
        self.folder, self.trainer, self.sampler, self.rank, self.keep = folder, trainer, sampler, rank, keep

    def latest(self) -> str | None:
        """The tag DeepSpeed's `latest` pointer names, or None before the first save."""
        pointer = self.folder / "latest"
        return pointer.read_text().strip() if pointer.exists() else None

    def state(self, step: int) -> dict:
        """What a checkpoint holds beside the trainer's shards: the step, the sampler's position, the RNGs."""
        return {
            "step": step,
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def save(self, step: int) -> None:
        """Checkpoint `step<step>`; the periodic ones beyond the newest `keep` are removed."""
        tag = f"step{step}"
        self.trainer.save(self.folder, tag, self.state(step))  # `latest` last, after every rank's shards
        if self.rank == 0:
            tags = sorted((p for p in self.folder.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
            for old in tags[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint %s written to %s", tag, self.folder)

    def keep_if_best(self, step: int, accuracy: float) -> None:
        """The paper reports its best checkpoint: `best` holds the one with the highest held-out accuracy
        so far (best.json says which step); the periodic ones are pruned, this one is not."""
        record = self.folder / "best.json"

        def beats_best() -> bool:
            try:
                best = json.loads(record.read_text())["eval/accuracy"]
            except (OSError, ValueError, KeyError, TypeError):  # none yet, or cut short by a crash: no best
                best = float("-inf")
            return accuracy > best

        # Decided on rank 0 alone: another rank may read a stale best.json from a shared filesystem's cache,
        # and ranks that disagree would not all enter the collective save.
        if not broadcast_object(beats_best() if self.rank == 0 else None):
            return
        self.trainer.save(self.folder, "best", self.state(step), latest=False)
        if self.rank == 0:
            partial = record.with_suffix(".json.partial")
            partial.write_text(json.dumps({"step": step, "eval/accuracy": accuracy}) + "\n")
            os.replace(partial, record)  # a crash leaves the old record or the new one, never half
            logger.info("best checkpoint so far: step %d, eval accuracy %.3f", step, accuracy)

    def resume(self) -> int | None:
        """Loads the newest checkpoint (shards, sampler position, RNGs) and returns its step; None when
        there is none."""
        tag = self.latest()
        if tag is None:
            return None
        state = self.trainer.load(self.folder, tag)
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if self.rank == 0:
            print(f"resumed from {self.folder / tag} at step {state['step']}", flush=True)
        return state["step"]
