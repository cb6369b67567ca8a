"""The GPU check: everything a CPU machine cannot prove about capo-fast, in one command on one CUDA machine.

    python3 bench/gpu_check.py OUT_DIR        # from the repository root; under 8 minutes on one H100/H200

Made for a machine that has torch and triton but maybe no network, vLLM or DeepSpeed (any torch >= 2.8):
1. builds `capo_fast._C` against that torch (an editable install without dependencies; wheels found in
   .whl/, e.g. liger-kernel for the comparison, are installed first, offline);
2. runs the `gpu`-marked tests (CUDA ops against the float64 reference in fp32/bf16, strided inputs, in-place
   backward, torch.compile) and the kernel test files whole, whose CPU-tensor cases then run on CUDA;
3. runs the kernel benchmarks against eager torch, torch.compile and Liger (compile last, under its own limit);
4. with vLLM installed, one sleep / wake / weight-sync / generate cycle that must see the new weights.
Every stage has its own time limit and the check goes on after a failure. OUT_DIR receives summary.json
(the machine, versions, each stage's exit code, seconds and test counts), gpu_check.log (all output), the
tests' JUnit XML and the benchmarks' JSON; results worth keeping go under bench/results/ like the CPU ones.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 7.5 * 60
# Test files of the ops alone (torch + triton): their CPU-tensor cases move to CUDA when it is there.
KERNEL_TESTS = ["tests/test_gpu_kernels.py", "tests/test_policy_loss.py", "tests/test_linear_policy_loss.py",
                "tests/test_op_registration.py", "tests/test_liger_agreement.py", "tests/test_memory.py",
                "tests/test_triton_launchers.py", "tests/test_ops_*.py"]  # fmt: skip
BENCH = ["bench/test_bench_policy_loss.py", "bench/test_bench_linear_policy_loss.py"]
QUICK_BENCH = ["--benchmark-only", "--benchmark-max-time=0.5", "--benchmark-min-rounds=3"]


def environment(env: dict | None = None) -> dict:
    """The machine and versions, read in a child so a broken torch cannot stop the check."""
    code = (
        "import json, torch, platform\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda}\n"
        "try:\n import triton; info['triton'] = triton.__version__\nexcept Exception as e: info['triton'] = repr(e)\n"
        "for name in ('vllm', 'deepspeed', 'liger_kernel', 'flash_attn'):\n"
        " try:\n  __import__(name); info[name] = 'installed'\n except Exception: info[name] = 'absent'\n"
        "if torch.cuda.is_available():\n"
        " p = torch.cuda.get_device_properties(0)\n"
        " info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f'{p.major}{p.minor}',"
        " gpus=torch.cuda.device_count())\n"
        "print(json.dumps(info))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr[-2000:]}


class Check:
    def __init__(self, out: Path):
        self.out = out
        self.log = (out / "gpu_check.log").open("w")
        self.start = time.monotonic()
        self.stages: dict[str, dict] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.start)

    def stage(self, name: str, argv: list[str], limit_s: float, junit: str | None = None) -> int:
        """Runs one stage under min(limit_s, what is left of the budget); its output goes to the log."""
        limit = min(limit_s, self.left())
        if limit < 10:
            self.stages[name] = {"rc": None, "skipped": "out of time"}
            return -1
        if junit:
            argv = [*argv, f"--junitxml={self.out / junit}"]
        self.log.write(f"\n===== {name}: {' '.join(argv)} (limit {limit:.0f} s)\n")
        self.log.flush()
        began = time.monotonic()
        try:
            rc = subprocess.run(argv, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                timeout=limit).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
        record = {"rc": rc, "seconds": round(time.monotonic() - began, 1)}
        if junit and (self.out / junit).exists():
            record["tests"] = junit_counts(self.out / junit)
        self.stages[name] = record
        print(f"{name}: rc {rc} in {record['seconds']} s {record.get('tests', '')}", flush=True)
        return rc


def junit_counts(path: Path) -> dict[str, int]:
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for summary.json, the log, JUnit XML and benchmark JSON")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out)
    py = sys.executable
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if wheels:  # no network: carried wheels, installed beside the image's packages
        site = "/tmp/capo-gpu-check-site"
        check.stage("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site, *wheels],
                    120)  # fmt: skip
        check.env["PYTHONPATH"] = os.pathsep.join(p for p in (site, check.env.get("PYTHONPATH")) if p)
    pip_install = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    check.stage("build", pip_install, 240)
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    check.stage("gpu_tests", [*pytest, "-m", "gpu", "--continue-on-collection-errors", "tests"], 150,
                junit="tests-gpu.xml")  # fmt: skip
    kernel_files = sorted({f for pattern in KERNEL_TESTS for f in glob.glob(str(ROOT / pattern))})
    check.stage("kernel_tests", [*pytest, *kernel_files], 150, junit="tests-kernels.xml")
    check.stage("bench", [*pytest, *BENCH, *QUICK_BENCH, "-k", "not compile",
                          f"--benchmark-json={args.out / 'bench-gpu.json'}"], 150)  # fmt: skip
    if environment(check.env).get("vllm") == "installed":
        check.stage("vllm_cycle", [*pytest, "tests/test_engines.py", "-k", "cycle or weight_sync_tiny"], 150,
                    junit="tests-vllm.xml")  # fmt: skip
    else:
        check.stages["vllm_cycle"] = {"rc": None, "skipped": "vLLM is not installed"}
    check.stage("bench_compile", [*pytest, *BENCH, *QUICK_BENCH, "-k", "compile",
                                  f"--benchmark-json={args.out / 'bench-gpu-compile.json'}"], 120)  # fmt: skip
    summary = {"environment": environment(check.env), "stages": check.stages,
               "seconds": round(time.monotonic() - check.start, 1)}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    failed = [name for name, s in check.stages.items() if s.get("rc") not in (0, None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
