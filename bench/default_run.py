"""Times `make train` (the embedded default) or another CPU run end to end and keeps what it showed.

    python bench/default_run.py                     # the default run, from a cold cache (warm-up included)
    python bench/default_run.py --warm              # again, with the warmed-up policy cached
    python bench/default_run.py --name smollm2-judge-run -- --config configs/cpu-smollm2-judge.yaml

Writes bench/results/<name>-<machine>.json, the run's own summary.json (held-out accuracy before and after
with standard errors, the held-out curve, seconds per phase) plus the wall-clock time of the whole command
and whether the policy's one-time warm-up was part of it. The README's opening paragraph is rendered from
it by bench/report.py; the run's curves.png is kept beside it as <name>-<machine>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default-run", help="results file stem")
    parser.add_argument("--machine", default="cpu-2core-x86_64", help="names the results file")
    parser.add_argument("--warm", action="store_true", help="keep the cache (no warm-up) instead of a cold one")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "timed", help="the run's output_dir")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("train_args", nargs="*", help="after --: arguments for capo_fast/train.py")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    cold = None
    if not args.warm:  # a cache of its own: the run builds (warms up) its policy as on a fresh machine
        cold = Path(tempfile.mkdtemp(prefix="capo-cold-cache-"))
        smollm2 = Path(env.get("CAPO_CACHE", Path.home() / ".cache" / "capo-fast")) / "SmolLM2-135M-Instruct"
        if smollm2.exists():  # converting SmolLM2 belongs to the set-up, not to the run
            (cold / smollm2.name).symlink_to(smollm2)
        env["CAPO_CACHE"] = str(cold)
    shutil.rmtree(args.out, ignore_errors=True)
    command = ["deepspeed", str(ROOT / "capo_fast" / "train.py"), *args.train_args, f"--logging.output_dir={args.out}"]
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env)
    seconds = time.monotonic() - start
    warmups = [json.loads(p.read_text()) for p in sorted(Path(env["CAPO_CACHE"] if cold else "/nonexistent").glob(
        "*/warmup.json"))]  # fmt: skip
    if cold is not None:
        shutil.rmtree(cold, ignore_errors=True)
    if result.returncode != 0:
        print(f"the run failed (exit {result.returncode})", file=sys.stderr)
        return result.returncode
    summary = json.loads((args.out / "summary.json").read_text())
    path = args.results / f"{args.name}-{args.machine}.json"
    record = {
        "name": args.name,
        "machine": args.machine,
        "results_file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "command": " ".join(["make train", *(["ARGS=" + repr(" ".join(args.train_args))] if args.train_args else [])]),
        "cold_cache": not args.warm,
        "wall_clock_s": round(seconds, 1),
        "warmup_s": round(sum(w["seconds"] for w in warmups), 1),  # the policy's one-time warm-up, in a cold run
        **summary,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy(args.out / "curves.png", path.with_suffix(".png"))  # the run's curves, shown in the README
    print(f"{path}: held-out {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
          f"({summary['change'] / summary['change_se']:+.1f} SE) in {seconds / 60:.1f} min")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
