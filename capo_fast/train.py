"""Entry point: `deepspeed capo_fast/train.py [--config configs/X.yaml]`.

The pieces of a CAPO step that exist today are the fused loss ops (capo_fast.kernels), the outcome
verifier (capo_fast.reward), critique parsing and voting (capo_fast.critique) and token credit
(capo_fast.credit). The rollout engines and the DeepSpeed training loop that join them are not
written yet, so this command says so instead of pretending to train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MISSING = (
    "capo_fast.rollout (vLLM rollout and critic engines, weight sync)",
    "capo_fast.trainer (DeepSpeed engine, packing, PPO mini-epochs)",
    "capo_fast.config and capo_fast.data (YAML configs, prompt datasets)",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CAPO training (launch with the deepspeed launcher)")
    parser.add_argument("--config", type=Path, default=None, help="YAML run config (default: the embedded one)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_known_args(argv)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config is not None and not args.config.exists():
        print(f"capo-fast: config file not found: {args.config}", file=sys.stderr)
        return 2
    lines = "\n".join(f"  - {m}" for m in MISSING)
    print(f"capo-fast: the training loop cannot run yet; these parts are still missing:\n{lines}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
