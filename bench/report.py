"""Renders bench/results/*.json as Markdown tables and puts them in README.md.

python bench/report.py [--write]

Four tables: the policy loss over logits (pytest-benchmark files with a `floor` row), the linear
variant (files ending in -linear.json), and the ahead-of-time compilation of the Triton kernels
(triton-aot-ptxas.json, written by `python -m capo_fast.kernels.aot --json ...`), and the per-GPU
memory budget of the 7B config (capo_fast.memory_budget).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 2**20


def benchmarks(suffix: str):
    for path in sorted(RESULTS.glob(f"*{suffix}")):
        data = json.loads(path.read_text())
        for b in data.get("benchmarks", []):
            if "provider" in b["params"]:
                yield path.name, b  # the file name names the machine


def grouped(suffix: str, exclude: str | None = None) -> dict[tuple[str, str], dict[str, dict]]:
    groups: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for name, b in benchmarks(suffix):
        if exclude is None or not name.endswith(exclude):
            groups[(name, b["group"])][b["params"]["provider"]] = b
    return groups


def policy_loss_table() -> str:
    lines = [
        "| results file | case | provider | median ms | vs torch | time / floor | GB/s | peak extra / logits |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, group), by_provider in grouped(".json", exclude="-linear.json").items():
        base = by_provider.get("torch", {}).get("stats", {}).get("median")
        floor = by_provider.get("floor", {}).get("stats", {}).get("median")
        for provider in ("capo", "capo_inplace", "compile", "torch", "liger", "floor"):
            if provider not in by_provider:
                continue
            b = by_provider[provider]
            med, info = b["stats"]["median"], b["extra_info"]
            speedup = f"{base / med:.1f}x" if base and provider != "floor" else "-"
            over_floor = f"{med / floor:.2f}" if floor else "-"
            lines.append(
                f"| {name} | {group} | {provider} | {med * 1e3:.1f} | {speedup} | {over_floor} | "
                f"{info['gb_per_s']:.1f} | {info['peak_extra_over_logits']:.2f} |"
            )
    return "\n".join(lines)


def linear_table() -> str:
    lines = [
        "| results file | case | provider | median s | speed-up vs liger | peak extra MiB (own process) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for (name, group), by_provider in grouped("-linear.json").items():
        liger = by_provider.get("liger", {}).get("stats", {}).get("median")
        for provider in ("capo", "liger", "compile", "torch"):
            if provider not in by_provider:
                continue
            b = by_provider[provider]
            med = b["stats"]["median"]
            speedup = f"{liger / med:.2f}x" if liger and provider != "liger" else "-"
            peak = b["extra_info"]["peak_extra_bytes"] / MIB
            lines.append(f"| {name} | {group} | {provider} | {med:.2f} | {speedup} | {peak:.0f} |")
    return "\n".join(lines)


def aot_table() -> str:
    path = RESULTS / "triton-aot-ptxas.json"
    if not path.exists():
        return "(no triton-aot-ptxas.json yet)"
    data = json.loads(path.read_text())
    lines = [
        f"Triton {data['triton']}; per kernel and target, the worst case over its compiled variants.",
        "",
        "| kernel | target | variants | warps | registers (max) | spill bytes | shared memory | occupancy (min) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in data["summary"]:
        lines.append(
            f"| `{s['kernel']}` | {s['target']} | {s['variants']} | {s['num_warps']} | {s['max_registers']} | "
            f"{s['spill_bytes']} | {s['max_smem_bytes']} B | {s['min_occupancy']:.0%} |"
        )
    return "\n".join(lines)


def memory_budget_table() -> str:
    from capo_fast.config import load_config
    from capo_fast.memory_budget import QWEN25_7B, budget, markdown

    config = load_config(ROOT / "configs" / "gpu-qwen2.5-7b.yaml")
    return markdown(budget(config, QWEN25_7B, world=4))


TABLES = {
    "bench-table": policy_loss_table,
    "bench-linear-table": linear_table,
    "aot-table": aot_table,
    "memory-budget": memory_budget_table,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="replace the tables in README.md")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    body = readme.read_text()
    for marker, render in TABLES.items():
        text = render()
        print(f"<!-- {marker} -->\n{text}\n")
        body = re.sub(
            rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", lambda m, t=text: m[1] + t + "\n" + m[2], body, flags=re.S
        )
    if args.write:
        readme.write_text(body)


if __name__ == "__main__":
    main()
