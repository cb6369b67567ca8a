#!/usr/bin/env bash
# CAPO against GRPO-Rule (reward_mode=outcome: plain GRPO, no judge) at the same budget, from the embedded default's
# policy (SmolLM2-135M-Instruct) on offline arithmetic and word problems; held-out greedy accuracy
# before and after. Writes runs/learning-{capo,grpo}/ and bench/results/learning-<machine>.json.
#   bash bench/learning_result.sh [machine-name] [extra --section.key=value overrides]
set -euo pipefail
machine=${1:-cpu-2core-x86_64}
shift || true
common=(--trainer.steps=10 --trainer.lr=5e-6 --data.num_eval=64 --checkpoint.every=0 --checkpoint.export=false "$@")
for variant in capo grpo; do
  mode=capo; [ "$variant" = grpo ] && mode=outcome
  rm -rf "runs/learning-$variant"
  deepspeed capo_fast/train.py "${common[@]}" --algorithm.reward_mode=$mode --logging.output_dir="runs/learning-$variant"
done
python - "$machine" "${common[*]}" <<'PY'
import json, sys
from pathlib import Path
result = {"machine": sys.argv[1], "command": "bash bench/learning_result.sh " + sys.argv[1], "overrides": sys.argv[2]}
for variant in ("capo", "grpo"):
    rows = [json.loads(l) for l in Path(f"runs/learning-{variant}/metrics.jsonl").read_text().splitlines()]
    merged = {k: v for r in rows for k, v in r.items()}
    steps = [r for r in rows if "actor/loss" in r]
    result[variant] = {
        "eval_accuracy_before": merged["eval/accuracy_before"],
        "eval_accuracy_after": merged["eval/accuracy_after"],
        "train_accuracy_by_step": [r["reward/accuracy"] for r in steps],
        "flagged_step_rate_by_step": [r["credit/flagged_step_rate"] for r in steps],
        "seconds_by_phase": {k: sum(r.get(k, 0.0) for r in steps) for k in steps[0] if k.startswith("time/")},
    }
out = Path(f"bench/results/learning-{sys.argv[1]}.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print(out.read_text())
PY
