"""The environment a multi-node run needs on every node, written as the deepspeed launcher reads it.

    python -m capo_fast.launch_env --config configs/X.yaml   # writes ./.deepspeed_env

The launcher forwards only a few variable prefixes to other nodes (deepspeed/launcher/runner.py:36)
and adds every `NAME=value` line of .deepspeed_env in the launch folder or ~ (runner.py:37-38,
604-610: one `split('=', 1)` per line, so no blank or comment lines). The pdsh runner puts those
values on its command line (multinode_runner.py:100-102), visible to `ps` on the launching host:
keep secrets there only on a host you trust, or read them from a file on the shared filesystem.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from capo_fast.config import Config, load_config

FORWARDED_PREFIXES = ("HF_", "TRANSFORMERS_", "VLLM_", "TRITON_", "CAPO_")


def required_env(config: Config, environ: dict[str, str] | None = None) -> list[str]:
    """Names of the variables this run reads that the launcher does not forward by itself."""
    env = os.environ if environ is None else environ
    names = []
    names += config.critic.backend_class().env_vars(config.critic)
    if config.logging.wandb_project:
        names.append("WANDB_API_KEY")
    names += sorted(n for n in env if n.startswith(FORWARDED_PREFIXES))
    return list(dict.fromkeys(names))


def deepspeed_env_lines(names: list[str], environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    missing = [n for n in names if n not in env]
    if missing:
        raise KeyError(f"not set here, so it cannot be forwarded: {', '.join(missing)}")
    for name in names:
        if "\n" in env[name]:
            raise ValueError(f"{name} holds a newline; the launcher reads one NAME=value per line")
    return [f"{n}={env[n]}" for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(".deepspeed_env"))
    args, overrides = parser.parse_known_args(argv)
    names = required_env(load_config(args.config, overrides))
    try:
        lines = deepspeed_env_lines(names)
    except (KeyError, ValueError) as err:
        print(f"capo-fast: {err}", file=sys.stderr)
        return 2
    args.out.write_text("".join(line + "\n" for line in lines))
    args.out.chmod(0o600)
    print(f"wrote {len(lines)} variables to {args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
