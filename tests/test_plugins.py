"""Plug-ins named in the config as module:function: a verifier, a step splitter, a critic backend."""

import textwrap

import pytest

from capo_fast.config import ConfigError, load_config
from capo_fast.critics import CRITIC_BACKENDS, CritiqueRequest
from capo_fast.critique import Critique, make_splitter, split_steps
from capo_fast.reward import OutcomeVerifier


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        textwrap.dedent("""
        from capo_fast.critique import Critique

        def exact(response, gold):
            return float(response.strip().endswith(gold))

        def lines(response):
            return response.splitlines(keepends=True)

        def checker(requests, num_critiques, seed):
            # flags every step whose line holds "wrong"; one Critique object and one judge-style text
            out = []
            for r in requests:
                bad = frozenset(s.index for s in r.steps if "wrong" in s.text)
                listed = ",".join(map(str, sorted(bad)))
                text = f"Judgment: Is the solution correct (Yes/No)? No\\n<incorrect_steps>{listed}</incorrect_steps>"
                out.append([Critique(True, bad, not bad), text][:num_critiques])
            return out
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_task"


def test_a_verifier_function_runs_in_the_workers(user_module):
    with OutcomeVerifier(num_workers=1, verifier=f"{user_module}:exact") as verifier:
        scores = verifier.score(["so it is 12", "it is 13"], ["12", "12"])
    assert [s.correct for s in scores] == [1.0, 0.0]


def test_step_splitters_regex_and_function(user_module):
    text = "a = 1\nb = 2\n\nc = 3"
    assert make_splitter("") is split_steps
    assert [s.text for s in make_splitter(r"\n")(text)] == ["a = 1\n", "b = 2\n\n", "c = 3"]
    steps = make_splitter(f"{user_module}:lines")(text)
    assert [s.text for s in steps] == ["a = 1\n", "b = 2\n", "c = 3"] and steps[-1].end == len(text)


def test_a_critic_backend_that_is_a_function(user_module):
    config = load_config(None, ["--critic.backend=function", f"--critic.function={user_module}:checker"])
    critic = CRITIC_BACKENDS["function"](config.critic)
    steps = split_steps("x = 1\n\nthis is wrong\n\nso 2")
    (critiques,) = critic.critique([CritiqueRequest("q", steps)])
    assert critiques == [Critique(True, frozenset({1}), False), Critique(True, frozenset({1}), False)]


def test_bad_plugin_names_are_config_errors(user_module):
    with pytest.raises(ConfigError, match=r"algorithm\.verifier: cannot import 'nope'"):
        load_config(None, ["--algorithm.verifier=nope:f"])
    with pytest.raises(ConfigError, match=r"critic\.function: my_task has no function 'missing'"):
        load_config(None, ["--critic.backend=function", f"--critic.function={user_module}:missing"])
    with pytest.raises(ConfigError, match=r"critic\.step_splitter: '\(' is neither"):
        load_config(None, ["--critic.step_splitter=("])
