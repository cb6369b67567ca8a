"""Renders bench/results/*.json (pytest-benchmark output) as a Markdown table and puts it in README.md.

python bench/report.py [--write]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def rows():
    for path in sorted(RESULTS.glob("*.json")):
        for b in json.loads(path.read_text())["benchmarks"]:
            if "provider" in b["params"]:  # the policy-loss suites; rollout results have their own files
                yield path.name, b  # the file name names the machine


def table() -> str:
    groups: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for name, b in rows():
        groups[(name, b["group"])][b["params"]["provider"]] = b
    lines = [
        "| results file | case | provider | median ms | GB/s | peak extra / logits | speed-up vs torch |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (name, group), by_provider in groups.items():
        base = by_provider.get("torch", {}).get("stats", {}).get("median")
        for provider, b in sorted(by_provider.items()):
            med, info = b["stats"]["median"], b["extra_info"]
            speedup = f"{base / med:.2f}x" if base else "-"
            lines.append(
                f"| {name} | {group} | {provider} | {med * 1e3:.1f} | {info['gb_per_s']:.2f} | "
                f"{info['peak_extra_over_logits']:.2f} | {speedup} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    text = table()
    if args.write:
        readme = ROOT / "README.md"
        body = re.sub(
            r"(<!-- bench-table -->\n).*?(\n<!-- /bench-table -->)",
            lambda m: m[1] + text + m[2],
            readme.read_text(),
            flags=re.S,
        )
        readme.write_text(body)
    print(text)


if __name__ == "__main__":
    main()
