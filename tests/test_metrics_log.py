"""Run logs: a resumed run continues the same wandb run."""

import sys
import types

from capo_fast.metrics import MetricsLog


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    inits, ids = [], iter(["first1", "second2"])
    fake = types.SimpleNamespace(
        init=lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None),
        util=types.SimpleNamespace(generate_id=lambda: next(ids)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):  # the first start, then a restart in the same output folder
        MetricsLog(tmp_path, enabled=True, tensorboard=False, wandb_project="capo", config={"a": 1})
    assert [i["id"] for i in inits] == ["first1", "first1"] and all(i["resume"] == "allow" for i in inits)
    MetricsLog(tmp_path / "other", enabled=True, tensorboard=False, wandb_project="capo", config={})
    assert inits[-1]["id"] == "second2"  # a new output folder is a new run
