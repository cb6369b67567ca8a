"""Run config: defaults, YAML with line numbers in errors, command-line overrides, shipped configs."""

import re
from pathlib import Path

import pytest

from capo_fast.config import Config, ConfigError, load_config
from capo_fast.credit import CreditConfig, VotingConfig
from capo_fast.kernels import PolicyLossOptions

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    config = load_config()
    assert config == Config().validate()
    assert config.algorithm.correct_reward == 2.0 and config.algorithm.penalty == 1.0


def _written_values(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a YAML mapping, as PyYAML reads it."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _written_values(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every value the file writes is the loaded one (PyYAML's own reading of the file as the statement of it),
    and every other key keeps its default."""
    import dataclasses

    import yaml

    config, default = load_config(path), Config()
    written = dict(_written_values(yaml.safe_load(path.read_text())))
    assert written, f"{path.name} sets nothing"
    for key, value in written.items():
        loaded = config
        for part in key.split("."):
            loaded = getattr(loaded, part)
        assert loaded == (float(value) if isinstance(loaded, float) else value), key
    for section in dataclasses.fields(Config):
        for key, value in dict(_written_values(dataclasses.asdict(getattr(default, section.name)))).items():
            if f"{section.name}.{key}" not in written:
                got = dataclasses.asdict(getattr(config, section.name))
                for part in key.split("."):
                    got = got[part]
                assert got == value, f"{section.name}.{key} changed without being written"
    assert path.read_text().startswith("#"), "a config names the command that runs it in its header"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: tiny\nrollout:\n  n: 8\n  sampling: {temperature: 1.0, stop: ['</s>']}\n")
    config = load_config(path, ["--rollout.n=4", "--trainer.lr=3e-6", "--critic.backend=remote",
                                "--critic.url=http://127.0.0.1:8000/v1"])  # fmt: skip
    assert config.model.path == "tiny" and config.rollout.n == 4 and config.trainer.lr == 3e-6
    assert config.rollout.sampling.temperature == 1.0 and config.rollout.sampling.stop == ["</s>"]
    assert config.critic.backend == "remote"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("trainer:\n  steps: 3\n  lr: fast\n", "run.yaml:3: trainer.lr: expected float, got 'fast'"),
        ("algorithm:\n  voting: most\n", "run.yaml:2: algorithm.voting: 'most' is not one of"),
        ("rollout:\n  sampling:\n    top_p: 1.5\n", "run.yaml:3: rollout.sampling.top_p: must be in (0, 1]"),
        ("rollout:\n  n: 1\n", "run.yaml:2: rollout.n: group normalisation needs at least 2"),
        ("trainer:\n  stepz: 3\n", "run.yaml:2: trainer.stepz: unknown key 'stepz'"),
        ("trainer: 3\n", "run.yaml:1: trainer: expected a mapping"),
        ("trainer:\n  steps: 2.5\n", "run.yaml:2: trainer.steps: expected int, got 2.5"),
        ("critic:\n  num_critiques: 2\nalgorithm:\n  voting: greedy\n", "run.yaml:4: algorithm.voting: greedy needs"),
        ("logging:\n  rollout_samples: -1\n", "run.yaml:2: logging.rollout_samples: must be >= 0"),
        ("algorithm:\n  aggregation: mean\n", "run.yaml:2: algorithm.aggregation: 'mean' is not one of"),
        ("critic:\n  backend: vlm\n", "run.yaml:2: critic.backend: 'vlm' is not one of"),
        ("model: [\n", "not valid YAML"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)


def test_override_errors_name_the_argument():
    with pytest.raises(ConfigError, match=r"'--trainer\.zero_stage=5'.*trainer\.zero_stage: must be"):
        load_config(None, ["--trainer.zero_stage=5"])
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--trainer.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def launch_world_size(path: Path) -> tuple[int, list[str]]:
    """Ranks the header's launch command starts, and the overrides it passes."""
    import shlex

    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("# deepspeed"))
    argv = shlex.split(line[2:])
    gpus = int(argv[argv.index("--num_gpus") + 1]) if "--num_gpus" in argv else 1
    nodes = int(argv[argv.index("--num_nodes") + 1]) if "--num_nodes" in argv else 1
    return gpus * nodes, [a for a in argv if a.startswith("--") and "=" in a]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_fit_the_world_size_of_their_launch_command(path, monkeypatch):
    monkeypatch.chdir(path.parent.parent)  # deepspeed_config paths are relative to the repository
    world, overrides = launch_world_size(path)
    load_config(path, overrides).check_world_size(world)


def test_world_size_errors_name_the_key():
    remote = ["--critic.backend=remote", "--critic.url=http://judge:8000/v1"]
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel_size: 2 needs"):
        load_config(None, ["--rollout.tensor_parallel_size=2", *remote]).check_world_size(1)


def test_a_local_critic_beside_a_tensor_parallel_policy_is_refused():
    with pytest.raises(ConfigError, match=r"critic\.backend: a local vLLM critic .* use critic\.backend=remote"):
        load_config(None, ["--rollout.tensor_parallel_size=2", "--critic.backend=vllm"])
    load_config(None, ["--rollout.tensor_parallel_size=2", "--critic.backend=vllm", "--algorithm.reward_mode=outcome"])


def test_zero0_and_failure_rates_are_refused():
    with pytest.raises(ConfigError, match=r"trainer\.zero_stage: must be 1, 2 or 3 \(ZeRO-0 applies non-finite"):
        load_config(None, ["--trainer.zero_stage=0"])
    with pytest.raises(ConfigError, match=r"critic\.max_failure_rate"):
        load_config(None, ["--critic.warn_failure_rate=0.6", "--critic.max_failure_rate=0.5"])


# DESIGN.md section 1, "Paper setups" (the paper's Table 5 and section 4.1).
PAPER_SETUPS = {
    "gpu-llama3.2-1b.yaml": ("Llama-3.2-1B-Instruct", "math", "Llama-3-70B-Instruct", 5e-8, "intersection"),
    "gpu-llama3.2-3b.yaml": ("Llama-3.2-3B-Instruct", "dapo-math", "Llama-3-70B-Instruct", 2e-8, "majority"),
    "gpu-qwen2.5-1.5b.yaml": ("Qwen2.5-1.5B-SFT-NuminaMath", "math", "Qwen2.5-72B-Instruct", 1e-7, "intersection"),
    "gpu-qwen2.5-7b.yaml": ("Qwen2.5-7B-SFT-NuminaMath", "dapo-math", "Qwen2.5-72B-Instruct", 2e-8, "majority"),
}


@pytest.mark.parametrize("name", sorted(PAPER_SETUPS))
def test_paper_configs_match_the_papers_setups(name, monkeypatch):
    monkeypatch.chdir(CONFIGS[0].parent.parent)
    path = CONFIGS[0].parent / name
    world, overrides = launch_world_size(path)
    c = load_config(path, overrides)
    model, data, judge, lr, voting = PAPER_SETUPS[name]
    assert c.model.path.endswith(model) and f"/{data}/" in c.data.train
    assert c.critic.model == judge and c.trainer.lr == lr and c.algorithm.voting == voting
    # common to every setup
    assert c.rollout.n == 16 and c.trainer.prompts_per_step * c.rollout.n == 192
    assert c.algorithm.mini_epochs == 4 and c.algorithm.kl_coef == 0.01 and c.algorithm.format_weight == 0.2
    assert (c.rollout.sampling.temperature, c.rollout.sampling.top_p) == (0.7, 0.9)
    assert (c.critic.sampling.temperature, c.critic.sampling.top_p) == (0.7, 0.9)
    assert c.critic.num_critiques == 4 and c.critic.include_reference
    assert c.algorithm.reward_mode == "capo" and (c.algorithm.correct_reward, c.algorithm.penalty) == (2.0, 1.0)
    assert c.data.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."


def test_print_config_lists_every_key_with_its_value_and_meaning():
    from capo_fast.config import describe_config

    text = describe_config(load_config(None, ["--trainer.lr=3e-7"]))
    lines = text.splitlines()
    assert "--trainer.lr=3e-07  # peak learning rate (cosine decay after warmup)" in lines
    assert len(lines) == sum(1 for _ in _leaves(Config()))
    assert all("  # " in line for line in lines), [line for line in lines if "  # " not in line]


def _leaves(obj):
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield from (_leaves(value) if dataclasses.is_dataclass(value) else [f.name])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_shipped_config_lets_one_surviving_critique_decide_a_vote(path, monkeypatch):
    monkeypatch.chdir(CONFIGS[0].parent.parent)
    c = load_config(path, launch_world_size(path)[1])
    if c.algorithm.voting in ("intersection", "majority") and c.critic.num_critiques > 1:
        assert c.algorithm.min_valid_critiques >= 2


# ---- what the fuzzing of issue 22 found: each input and what the user must see -----------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--logging.output_dir=007", ("logging", "output_dir", "007")),  # YAML: 7
        ("--critic.model=3.10", ("critic", "model", "3.10")),  # YAML: 3.1
        ("--data.eval=no", ("data", "eval", "no")),  # YAML: False
        ("--data.system_prompt=0x10", ("data", "system_prompt", "0x10")),  # YAML: 16
        ("--data.system_prompt=1:30", ("data", "system_prompt", "1:30")),  # YAML 1.1 sexagesimal: 90
        ("--data.system_prompt=@x", ("data", "system_prompt", "@x")),  # YAML: a scanner error
        ("--data.system_prompt=*x", ("data", "system_prompt", "*x")),  # YAML: an undefined alias
        ("--data.system_prompt=!x", ("data", "system_prompt", "!x")),  # YAML: a tag
        ("--data.system_prompt=Answer: in \\boxed{}", ("data", "system_prompt", "Answer: in \\boxed{}")),  # a mapping
        ("--rollout.sampling.stop=</s>", ("rollout", "sampling", ["</s>"])),
        ("--rollout.sampling.stop=['</s>', '007']", ("rollout", "sampling", ["</s>", "007"])),
    ],
)
def test_text_fields_keep_the_text_typed_on_the_command_line(override, expected):
    config = load_config(None, [override])
    section, key, value = expected
    got = getattr(getattr(config, section), key)
    got = got.stop if key == "sampling" else got
    assert got == value


def test_text_fields_keep_the_text_typed_in_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("logging:\n  output_dir: 007\ncritic:\n  model: 3.10\ndata:\n  eval: no\n  system_prompt: 1:30\n"
                    "rollout:\n  sampling:\n    stop: [0x10, '</s>']\n")  # fmt: skip
    c = load_config(path)
    assert (c.logging.output_dir, c.critic.model, c.data.eval, c.data.system_prompt) == ("007", "3.10", "no", "1:30")
    assert c.rollout.sampling.stop == ["0x10", "</s>"]
    assert (c.trainer.lr, c.model.gradient_checkpointing) == (Config().trainer.lr, False)  # non-text fields: defaults
    path.write_text("trainer:\n  lr: 1.0e-6\n  steps: 0x10\nmodel:\n  gradient_checkpointing: yes\n")
    c = load_config(path)
    assert (c.trainer.lr, c.trainer.steps, c.model.gradient_checkpointing) == (1e-6, 16, True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--trainer.lr=[", r"'--trainer\.lr=\[': not valid YAML"),
        ("--trainer.lr=@x", r"'--trainer\.lr=@x': not valid YAML"),
        ("--trainer.lr=*x", r"'--trainer\.lr=\*x': not valid YAML: found undefined alias"),
        ("--trainer.lr=!x 3", r"YAML tags \(!x\) are not supported"),
        ("--rollout.n=.inf", r"rollout\.n: expected int, got inf"),
        ("--rollout.n=" + "1" * 4400, r"rollout\.n: '1111.*\(4402 characters\) cannot be read"),
        ("--rollout.sampling.stop=[a, b", r"not valid YAML"),
        ("--trainer.lrr=[", r"trainer\.lrr: unknown key 'lrr'"),
        ("--algorithm.correct_reward=.nan", r"algorithm\.correct_reward: must be a finite float, got nan"),
        ("--algorithm.format_weight=nan", r"algorithm\.format_weight: must be a finite float"),
        ("--algorithm.kl_coef=.inf", r"algorithm\.kl_coef: must be a finite float, got inf"),
        ("--rollout.sampling.temperature=.inf", r"rollout\.sampling\.temperature: must be a finite float"),
        ("--eval.every=-1", r"eval\.every: must be >= 0"),
        ("--checkpoint.every=-2", r"checkpoint\.every: must be >= 0"),
        ("--algorithm.verifier_timeout_s=.nan", r"algorithm\.verifier_timeout_s: must be a finite float"),
        ("--algorithm.verifier_timeout_s=0", r"algorithm\.verifier_timeout_s: must be > 0"),
        ("--critic.max_concurrency=0", r"critic\.max_concurrency: must be >= 1"),
        ("--data.num_train=0", r"data\.num_train: must be >= 1"),
        ("--algorithm.genorm_alpha=-1000", r"algorithm\.genorm_alpha: must be in \[0, 92\.0\]"),
        ("--algorithm.genorm_alpha=1000", r"algorithm\.genorm_alpha: must be in \[0, 92\.0\]"),
        ("--trainer.weight_decay=-0.1", r"trainer\.weight_decay: must be >= 0"),
        ("--trainer.grad_clip=-1", r"trainer\.grad_clip: must be >= 0"),
    ],
)
def test_bad_command_line_values_name_the_argument_and_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert str(err.value).startswith("command line '--"), err.value
    assert len(str(err.value)) < 1000  # a 4,400-digit argument is not echoed whole


def _float_keys(obj=None, prefix=""):
    import dataclasses
    import typing

    obj = obj or Config()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{prefix}{f.name}.")
        elif typing.get_type_hints(type(obj))[f.name] is float:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("key", list(_float_keys()))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_no_float_field_takes_nan_or_infinity(key, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be a finite float"):
        load_config(None, [f"--{key}={value}"])


def test_genorm_alpha_at_its_bound_scores_without_overflow():
    import torch

    from capo_fast.credit import CreditConfig, RolloutSignals, factored_advantages

    bound = load_config(None, ["--algorithm.genorm_alpha=92", "--algorithm.reward_mode=genorm"]).algorithm
    cfg = CreditConfig(reward_mode="genorm", genorm_alpha=bound.genorm_alpha, genorm_beta=1.0)
    group = [RolloutSignals(1.0, 0.0, torch.zeros(2), judge_verdict=v) for v in (1.0, 0.0)]
    adv = factored_advantages(group, cfg).rollout_advantages
    # sigmoid(92) = 1 - 1e-40 and sigmoid(0) = 1/2: scores 1 and 0.5 (+ beta*r_v - 1 = 0), normalised to +1 and -1
    assert adv.tolist() == pytest.approx([1.0, -1.0], abs=1e-5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1: x\n", r"run\.yaml:1: 1: unknown key '1'"),
        ("trainer:\n  [a]: x\n", r"run\.yaml:2: trainer: a key must be a plain name"),
        ("trainer:\n  steps: " + "9" * 4400 + "\n", r"run\.yaml:2: trainer\.steps: '9999.* cannot be read"),
        ("a: &a [*a]\n", r"run\.yaml:1: a: an alias refers to a value that contains it"),
        ("trainer: &t {lr: *t}\n", r"run\.yaml:1: trainer\.lr: an alias refers to a value that contains it"),
        ("trainer:\n  lr: 1\n  lr: 2\n", r"run\.yaml:3: trainer\.lr: set twice \(also on line 2\)"),
        ("trainer: !x {lr: 1}\n", r"run\.yaml:1: trainer: YAML tags \(!x\) are not supported"),
        ("trainer:\n  lr: !!python/name:os.system\n", r"run\.yaml:2: trainer\.lr: YAML tags"),
        ("[" * 5000, r"run\.yaml: values nested too deeply"),
        ("trainer:\n  steps: .inf\n", r"run\.yaml:2: trainer\.steps: expected int, got inf"),
        ("checkpoint:\n  every: -2\n", r"run\.yaml:2: checkpoint\.every: must be >= 0"),
        ("algorithm:\n  verifier_timeout_s: .nan\n", r"run\.yaml:2: algorithm\.verifier_timeout_s: must be a finite"),
    ],
)
def test_bad_yaml_files_name_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_alias_fan_out_is_refused_before_it_expands(tmp_path):
    # "billion laughs": 10 values, each level ten aliases of the one before: 10^9 values once expanded
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=r"more than 10000 values \(aliases expanding\?\)"):
        load_config(path)


def test_an_alias_that_expands_little_is_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  sampling: &s {temperature: 0.5, top_p: 0.8}\ncritic:\n  sampling: *s\n")
    c = load_config(path)
    assert (c.critic.sampling.temperature, c.critic.sampling.top_p) == (0.5, 0.8)


def test_file_encodings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"trainer:\n  steps: 3\n# caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"run\.yaml:3: not UTF-8 text \(byte 25 is b'\\xe9'\)"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbftrainer:\n  steps: 3\n")  # a UTF-8 byte-order mark is fine
    assert load_config(path).trainer.steps == 3


def test_option_objects_carry_the_algorithm_section():
    written = {
        "algorithm.correct_reward": 3, "algorithm.penalty": 0.5, "algorithm.format_weight": 0.2,
        "algorithm.reward_mode": "genorm", "algorithm.genorm_alpha": 2, "algorithm.genorm_beta": 0.5,
        "algorithm.voting": "union", "algorithm.vote_threshold": 0.75, "critic.num_critiques": 4,
        "algorithm.min_valid_critiques": 3, "algorithm.eps_low": 0.1, "algorithm.eps_high": 0.28,
        "algorithm.dual_clip": 3, "algorithm.kl_coef": 0.01, "algorithm.entropy_coef": 0.001,
    }  # fmt: skip
    config = load_config(None, [f"--{key}={value}" for key, value in written.items()])
    a = config.algorithm
    assert a.credit_options() == CreditConfig(correct_reward=3.0, penalty=0.5, format_weight=0.2, reward_mode="genorm",
                                              genorm_alpha=2.0, genorm_beta=0.5)  # fmt: skip
    assert a.voting_options() == VotingConfig(mode="union", threshold=0.75, min_valid=3)
    assert a.policy_loss_options(0.7) == PolicyLossOptions(0.7, eps_low=0.1, eps_high=0.28, dual_clip=3.0, kl_coef=0.01,
                                                           entropy_coef=0.001)  # fmt: skip
    assert a.policy_loss_options(0.0).temperature == 1.0  # greedy rollouts: the logits as they are


@pytest.mark.parametrize(
    ("overrides", "judged", "local"),
    [
        ([], True, False),  # the default: CAPO, P = 1, the program critic
        (["--critic.backend=vllm"], True, True),
        (["--critic.backend=vllm", "--algorithm.penalty=0"], False, False),  # CAPO without a step penalty
        (["--critic.backend=vllm", "--algorithm.reward_mode=outcome"], False, False),  # GRPO-Rule
        (["--critic.backend=vllm", "--algorithm.reward_mode=genorm", "--algorithm.penalty=0"], True, True),
        (["--critic.backend=remote", "--critic.url=http://judge:8000/v1"], True, False),
    ],
)
def test_the_registries_say_whether_a_run_has_a_judge_and_where(overrides, judged, local):
    config = load_config(None, overrides)
    assert (config.needs_judge(), config.local_judge()) == (judged, local)


def test_each_critic_backend_states_what_it_needs():
    from capo_fast.critics import CRITIC_BACKENDS
    from capo_fast.launch_env import required_env

    assert {name: b.local_model for name, b in CRITIC_BACKENDS.items()} == {
        "vllm": True, "remote": False, "function": False
    }  # fmt: skip
    remote = ["--critic.backend=remote", "--critic.url=http://judge:8000/v1", "--critic.api_key_env=JUDGE_KEY"]
    assert required_env(load_config(None, remote), environ={}) == ["JUDGE_KEY"]
    assert required_env(load_config(None, ["--critic.backend=vllm"]), environ={}) == []
    with pytest.raises(ConfigError, match=r"critic\.url: remote critic needs an http\(s\) URL"):
        load_config(None, ["--critic.backend=remote"])
    with pytest.raises(ConfigError, match=r"critic\.function: the function backend needs module:function"):
        load_config(None, ["--critic.function="])
    with pytest.raises(ConfigError, match=r"critic\.backend: 'vlm' is not one of \['function', 'remote', 'vllm'\]"):
        load_config(None, ["--critic.backend=vlm"])
