"""Builds the CPU op library `capo_fast._C` from csrc/ (C++ and OpenMP only: never needs nvcc).

Package metadata lives in pyproject.toml. On x86-64 the ops are compiled for x86-64-v3 (AVX2 + FMA,
every x86 server CPU since 2015) with ATen's AVX2 vector types, never for the build machine alone:
a -march=native build from an AVX-512 machine dies with an illegal instruction on an AVX2 one.
CAPO_CPU_ARCH overrides the -march value (x86-64 only).
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

compile_args = ["-O3", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    compile_args += [
        f"-march={os.environ.get('CAPO_CPU_ARCH', 'x86-64-v3')}",
        "-mtune=generic",
        # ATen's at::vec headers pick their AVX2 implementation from these (ATen/cpu/vec/vec.h).
        "-DCPU_CAPABILITY=AVX2",
        "-DCPU_CAPABILITY_AVX2",
    ]

setup(
    ext_modules=[
        CppExtension(
            name="capo_fast._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
