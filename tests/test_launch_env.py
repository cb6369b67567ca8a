"""The .deepspeed_env a multi-node run needs, in the format the deepspeed launcher parses."""

import pytest

from capo_fast.config import load_config
from capo_fast.launch_env import deepspeed_env_lines, required_env


def test_required_env_and_lines_parse_like_the_launcher():
    config = load_config(None, ["--critic.backend=remote", "--critic.url=http://judge:8000/v1",
                                "--logging.wandb_project=capo"])  # fmt: skip
    env = {"OPENAI_API_KEY": "sk-1=2", "WANDB_API_KEY": "w", "HF_HOME": "/shared/hf", "HOME": "/root"}
    names = required_env(config, env)
    assert names == ["OPENAI_API_KEY", "WANDB_API_KEY", "HF_HOME"]
    lines = deepspeed_env_lines(names, env)
    # deepspeed/launcher/runner.py:609 reads each line with split('=', maxsplit=1)
    assert dict(line.split("=", 1) for line in lines) == {n: env[n] for n in names}
    with pytest.raises(KeyError, match="OPENAI_API_KEY"):
        deepspeed_env_lines(names, {"WANDB_API_KEY": "w", "HF_HOME": "x"})
