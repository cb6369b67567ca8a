"""Ahead-of-time compilation of every Triton kernel for NVIDIA GPUs, on a machine without one.

Triton's compiler and ptxas run on the CPU, and they reject code that the interpreter (which the
CPU tests use) accepts. This module compiles every variant the launchers can launch (every
constexpr combination, fp32/bf16/fp16 logits, the launchers' own block size and warp count) for
sm_80 and sm_90, and reads registers, spills and shared memory from `ptxas -v`:

    python -m capo_fast.kernels.aot --json bench/results/triton-aot-ptxas.json

Run it with TRITON_INTERPRET unset (it refuses otherwise). Exit status 1 if any variant fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

from capo_fast.kernels import policy_loss as pl

TARGETS = {"sm_80": 80, "sm_90": 90}
LOGIT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        types = ",".join(f"{k}={v}" for k, v in self.signature.items() if k in ("logits_ptr", "x_ptr", "numel"))
        return f"{self.kernel.__name__}[{types};{flags}]"


def _signature(kernel: triton.JITFunction, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Types of every argument: fp32 pointers unless named, ints i32, floats fp32, flags constexpr."""
    ints = {"stride_logits", "stride_grad", "V", "numel"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        else:
            sig[name] = pointers.get(name, "i32" if name in ints else "fp32")
    return sig


def variants() -> list[Variant]:
    """Every (kernel, types, constexprs, num_warps) the launchers of capo_fast.kernels can launch."""
    out = []
    for dtype in LOGIT_DTYPES:
        logits = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64"}
        for flags in itertools.product((False, True), repeat=4):
            constexprs = dict(zip(("HAS_CREDIT", "HAS_REF", "USE_DUAL_CLIP", "IN_PLACE"), flags, strict=True))
            constexprs["BLOCK_V"] = pl.BLOCK_V
            ptrs = {**logits, "clip_ptr": "*i8"}
            out.append(Variant(pl._policy_loss_fwd_kernel, _signature(pl._policy_loss_fwd_kernel, ptrs, constexprs),
                               constexprs, pl.NUM_WARPS))  # fmt: skip
        for kernel, ptrs in (
            (pl._logprobs_fwd_kernel, logits),
            (pl._logits_grad_kernel, {**logits, "grad_ptr": f"*{dtype}"}),
        ):
            constexprs = {"BLOCK_V": pl.BLOCK_V}
            out.append(Variant(kernel, _signature(kernel, ptrs, constexprs), constexprs, pl.NUM_WARPS))
        for numel in ("i32", "i64"):  # numel above 2**31 arrives as i64
            constexprs = {"BLOCK": pl.SCALE_BLOCK}
            ptrs = {"x_ptr": f"*{dtype}", "numel": numel}
            out.append(Variant(pl._scale_kernel, _signature(pl._scale_kernel, ptrs, constexprs), constexprs,
                               pl.SCALE_NUM_WARPS))  # fmt: skip
    return out


def launched_kernels() -> set[str]:
    """Names of the module's @triton.jit kernels (helpers called from kernels are compiled inside them)."""
    # Duck-typed: under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction instead.
    return {name for name, obj in vars(pl).items() if hasattr(obj, "arg_names") and name.endswith("_kernel")}


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and stack of a PTX module, from triton's bundled `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            check=True,
            capture_output=True,
            text=True,
        ).stderr

    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def occupancy(registers: int, num_warps: int) -> float:
    """Fraction of an SM's thread slots filled when registers are the only limit (sm_80/sm_90)."""
    threads = 32 * num_warps
    regs_per_block = -(-max(registers, 1) // 8) * 8 * threads  # allocated in units of 8 per thread
    blocks = min(REGISTERS_PER_SM // regs_per_block, MAX_THREADS_PER_SM // threads)
    return blocks * threads / MAX_THREADS_PER_SM


def compile_all(with_usage: bool = True) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for variant in variants():
        for target, arch in TARGETS.items():
            row = {"kernel": variant.kernel.__name__, "variant": variant.name, "target": target,
                   "num_warps": variant.num_warps}  # fmt: skip
            try:
                compiled = triton.compile(
                    ASTSource(variant.kernel, variant.signature, constexprs=variant.constexprs),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": variant.num_warps},
                )
                row["ok"] = True
                if with_usage:
                    row.update(ptxas_usage(compiled.asm["ptx"], arch))
                    row["smem_bytes"] = compiled.metadata.shared  # dynamic (reductions); ptxas sees static only
                    row["occupancy"] = occupancy(row["registers"], variant.num_warps)
            except Exception as exc:  # reported per variant; the caller decides
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            results.append(row)
    return results


def summary(results: list[dict]) -> list[dict]:
    """Per kernel and target: worst registers, spills, shared memory and occupancy over its variants."""
    rows = {}
    for r in results:
        if not r["ok"]:
            continue
        key = (r["kernel"], r["target"])
        first = {"kernel": r["kernel"], "target": r["target"], "variants": 0, "num_warps": r["num_warps"]}
        first.update(max_registers=0, spill_bytes=0, max_smem_bytes=0, min_occupancy=1.0)
        s = rows.setdefault(key, first)
        s["variants"] += 1
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["spill_bytes"] = max(s["spill_bytes"], r["spill_stores"] + r["spill_loads"])
        s["max_smem_bytes"] = max(s["max_smem_bytes"], r["smem_bytes"])
        s["min_occupancy"] = min(s["min_occupancy"], r["occupancy"])
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every variant's result and the per-kernel summary here")
    parser.add_argument("--no-usage", action="store_true", help="compile only; skip ptxas -v")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")
    results = compile_all(with_usage=not args.no_usage)
    failed = [r for r in results if not r["ok"]]
    report = {
        "triton": triton.__version__,
        "targets": list(TARGETS),
        "summary": summary(results),
        "variants": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    for s in report["summary"]:
        print(
            f"{s['kernel']:28s} {s['target']}: {s['variants']} variants, <= {s['max_registers']} registers, "
            f"{s['spill_bytes']} B spills, {s['max_smem_bytes']} B smem, occupancy >= {s['min_occupancy']:.0%}"
        )
    for r in failed:
        print(f"FAILED {r['variant']} {r['target']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
