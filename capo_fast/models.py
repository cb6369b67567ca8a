"""Where a run's models come from: `model.path` / `critic.model` resolved to an HF model folder.

A name is an HF model folder, a hub id (`org/name`, downloaded into the HF cache, or found there when
HF_HUB_OFFLINE=1), or one of the models that ship offline: `chain` (the warmed-up arithmetic policy),
`smollm2` and `tiny`. Under several ranks `resolve_model_once` makes every rank agree on the outcome.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from capo_fast import local_models
from capo_fast.chain_arithmetic import warmed_up_policy
from capo_fast.distributed import all_gather_objects, broadcast_object, rank_and_world
from capo_fast.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model(name: str, cache_dir: str | None = None, key: str = "model.path") -> Path:
    """A model folder for `model.path`: an HF model folder, a hub id (`org/name`, downloaded into the
    HF cache, or found there when HF_HUB_OFFLINE=1), or `chain` / `smollm2` / `tiny`, the models that ship offline."""
    if name == "smollm2":
        return local_models.smollm2_instruct()
    if name == "tiny":
        return local_models.build_tiny_model(local_models.default_cache_dir() / "tiny-qwen2")
    if name == "chain":
        return warmed_up_policy()
    path = Path(name)
    if (path / "config.json").exists():
        return path
    if path.exists() or not HUB_ID.match(name):
        raise ConfigError(
            f"{key}: {name!r} is not an HF model folder (no config.json), a hub id, chain, smollm2 or tiny"
        )
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        folder = snapshot_download(name, allow_patterns=MODEL_FILES, cache_dir=cache_dir, local_files_only=offline)
    except Exception as err:  # offline, unknown id, gated model: all end the run before it starts
        raise ConfigError(
            f"{key}: hub model {name!r} could not be had ({type(err).__name__}: {err}); download it where "
            f"there is a network (huggingface-cli download {name}) and pass its folder, or put it in the HF cache"
        ) from None
    return Path(folder)


def _try_resolve(name: str, key: str, rank: int) -> tuple[str, str]:
    """("ok", folder) or ("error", message): any failure must reach the collectives of
    resolve_model_once, or the other ranks wait there."""
    try:
        return "ok", str(resolve_model(name, key=key))
    except Exception as err:
        message = str(err) if isinstance(err, ConfigError) else f"{key}: {type(err).__name__}: {err}"
        return "error", message if rank == 0 else f"rank {rank} ({socket.gethostname()}): {message}"


def resolve_model_once(name: str, key: str = "model.path") -> Path:
    """Rank 0 resolves (builds, converts or downloads) first and tells the others whether it worked; then
    every other rank resolves in its own cache (another node has its own), and a failure anywhere stops
    every rank with that error instead of leaving the others at the next collective."""
    rank, _ = rank_and_world()
    status, detail = broadcast_object(_try_resolve(name, key, rank) if rank == 0 else None)
    if status == "error":
        raise ConfigError(detail)
    mine = (status, detail) if rank == 0 else _try_resolve(name, key, rank)
    failures = [detail for status, detail in all_gather_objects(mine) if status == "error"]
    if failures:
        raise ConfigError(failures[0])
    return Path(mine[1])
