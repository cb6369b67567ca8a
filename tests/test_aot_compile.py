"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, in every variant its launcher uses.

The CPU tests run the kernels in Triton's interpreter, which accepts code the GPU compiler rejects
(a plain Python global read inside @triton.jit is the classic case). This test runs the real
compiler and ptxas in a subprocess with TRITON_INTERPRET unset (see capo_fast.kernels.aot).
"""

import json
import os
import subprocess
import sys

from capo_fast.kernels import aot


def test_variants_cover_every_kernel_and_option():
    names = {v.kernel.__name__ for v in aot.variants()}
    assert names == aot.launched_kernels()
    fwd = [v for v in aot.variants() if v.kernel.__name__ == "_policy_loss_fwd_kernel"]
    assert len({tuple(sorted(v.constexprs.items())) + (v.signature["logits_ptr"],) for v in fwd}) == 16 * 3


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "capo_fast.kernels.aot", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    compiled = [r for r in report["variants"] if r["ok"]]
    assert len(compiled) == len(aot.variants()) * len(aot.TARGETS)
    spilling = [f"{r['variant']} {r['target']}" for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"register spills: {spilling}"
    assert all(r["registers"] > 0 for r in compiled)
