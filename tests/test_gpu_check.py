"""The prepared GPU check (bench/gpu_check.py) runs on a machine with torch and triton alone: what it runs
must need nothing else, and a stage that fails or hangs must not stop the ones after it."""

import ast
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).parent.parent
# What a bare CUDA machine has (torch, triton, pytest, hypothesis, numpy) or gets carried (liger-kernel).
AVAILABLE = {"torch", "triton", "pytest", "hypothesis", "numpy", "liger_kernel", "capo_fast.kernels", "measure"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_kernel_tests_and_benchmarks_need_only_torch_and_triton():
    files = sorted({f for pattern in gpu_check.KERNEL_TESTS for f in ROOT.glob(pattern)})
    assert ROOT / "tests" / "test_gpu_kernels.py" in files and len(files) >= 5
    for path in [*files, *(ROOT / b for b in gpu_check.BENCH)]:
        for name in _imports(path):
            top = name.split(".")[0]
            local = (path.parent / f"{top}.py").exists()  # a sibling test module
            ok = local or top in sys.stdlib_module_names or name in AVAILABLE or top in AVAILABLE
            ok = ok or name.startswith("capo_fast.kernels") or name == "capo_fast" or top == "__future__"
            assert ok, f"{path.name} imports {name}, which a machine with torch and triton alone lacks"


def test_a_failing_or_hanging_stage_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
    check = gpu_check.Check(tmp_path)
    assert check.stage("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30) == 3
    assert check.stage("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], 1.0) == -1  # under 10 s left
    assert check.stages["hangs"] == {"rc": None, "skipped": "out of time"}
    monkeypatch.setattr(gpu_check, "BUDGET_S", check.left() + 11.5)
    assert check.stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 11.0) == 124
    assert check.stages["fails"]["rc"] == 3 and check.stages["slow"]["rc"] == 124
    assert "===== fails" in (tmp_path / "gpu_check.log").read_text()


def test_junit_counts_read_pytests_report(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text('<testsuites><testsuite tests="7" failures="1" errors="0" skipped="2"/></testsuites>')
    assert gpu_check.junit_counts(report) == {"tests": 7, "failures": 1, "errors": 0, "skipped": 2}
