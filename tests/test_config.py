"""Run config: defaults, YAML with line numbers in errors, command-line overrides, shipped configs."""

from pathlib import Path

import pytest

from capo_fast.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    config = load_config()
    assert config == Config().validate()
    assert config.algorithm.correct_reward == 2.0 and config.algorithm.penalty == 1.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)
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
