"""Property tests of the config loader: what a user types for a text field comes back as typed, numbers
come back as the numbers written, on the command line and in YAML files."""

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capo_fast.config import load_config

TEXT_FIELDS = [("logging", "output_dir"), ("critic", "model"), ("data", "eval"), ("data", "system_prompt")]
# Text YAML 1.1 reads as something else: numbers with leading zeros, floats that lose digits, booleans,
# hexadecimal and octal, sexagesimal (1:30 is 90), null, infinities, dates.
YAML_LOOKALIKES = st.one_of(
    st.from_regex(r"\A[+-]?[0-9]{1,6}(\.[0-9]{0,4})?([eE][+-]?[0-9]{1,2})?\Z"),
    st.from_regex(r"\A[0-9]{1,2}(:[0-5][0-9]){1,2}\Z"),
    st.from_regex(r"\A0[xob][0-9a-fA-F_]{1,6}\Z"),
    st.sampled_from(
        [
            "no",
            "yes",
            "on",
            "off",
            "y",
            "n",
            "true",
            "False",
            "NO",
            "~",
            "null",
            "Null",
            ".inf",
            "-.Inf",
            ".nan",
            ".NaN",
            "2024-01-01",
            "1_000",
            "=",
            "<<",
        ]
    ),  # fmt: skip
)
# Any text a shell can pass: no surrogates (argv is decoded text) and no NUL.
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
SMALL = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LARGE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _get(config, field):
    return getattr(getattr(config, field[0]), field[1])


def check_override_text(field, text):
    assert _get(load_config(None, [f"--{field[0]}.{field[1]}={text}"]), field) == text


def check_yaml_plain_text(tmp_path, field, text):
    path = tmp_path / "run.yaml"
    path.write_text(f"{field[0]}:\n  {field[1]}: {text}\n")
    assert _get(load_config(path), field) == text


def check_yaml_dumped_text(tmp_path, field, text):
    """The config reads a dumped text as PyYAML itself reads it back: the text, except where PyYAML's emitter
    does not round-trip it (it writes U+0085 inside a single-quoted scalar, which its own reader folds to a
    space: yaml/emitter.py:876-885, yaml/scanner.py:1241)."""
    dumped = yaml.safe_dump({field[0]: {field[1]: text}}, allow_unicode=True)
    path = tmp_path / "run.yaml"
    path.write_text(dumped)
    assert _get(load_config(path), field) == yaml.safe_load(dumped)[field[0]][field[1]]
    if "\x85" not in text:
        assert _get(load_config(path), field) == text


def check_numbers(tmp_path, value, seed):
    path = tmp_path / "run.yaml"
    path.write_text(f"algorithm:\n  correct_reward: {value!r}\ntrainer:\n  seed: {seed}\n")
    from_file = load_config(path)
    from_args = load_config(None, [f"--algorithm.correct_reward={value!r}", f"--trainer.seed={seed}"])
    for config in (from_file, from_args):
        assert config.algorithm.correct_reward == value and math.copysign(1, config.algorithm.correct_reward) == (
            math.copysign(1, value)
        )
        assert config.trainer.seed == seed and type(config.trainer.seed) is int


FIELD = st.sampled_from(TEXT_FIELDS)
NUMBER = st.floats(allow_nan=False, allow_infinity=False)
SEED = st.integers(-(2**70), 2**70)


@SMALL
@given(FIELD, st.one_of(ANY_TEXT, YAML_LOOKALIKES))
def test_any_text_on_the_command_line_comes_back_as_typed(field, text):
    check_override_text(field, text)


@SMALL
@given(FIELD, YAML_LOOKALIKES)
def test_plain_yaml_scalars_come_back_as_typed(tmp_path, field, text):
    check_yaml_plain_text(tmp_path, field, text)


@SMALL
@given(FIELD, ANY_TEXT)
def test_any_text_written_by_a_yaml_dumper_comes_back(tmp_path, field, text):
    check_yaml_dumped_text(tmp_path, field, text)


@SMALL
@given(NUMBER, SEED)
def test_numbers_round_trip(tmp_path, value, seed):
    check_numbers(tmp_path, value, seed)


@pytest.mark.slow
@LARGE
@given(FIELD, st.one_of(ANY_TEXT, YAML_LOOKALIKES), YAML_LOOKALIKES, NUMBER, SEED)
def test_config_round_trips_many_cases(tmp_path, field, text, lookalike, value, seed):
    check_override_text(field, text)
    check_yaml_plain_text(tmp_path, field, lookalike)
    check_yaml_dumped_text(tmp_path, field, text)
    check_numbers(tmp_path, value, seed)
