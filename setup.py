"""Builds the CPU op library `capo_fast._C` from csrc/ (C++ and OpenMP only: never needs nvcc).

Package metadata lives in pyproject.toml. Set CAPO_CPU_ARCH (default "native") to choose the
-march the ops are compiled for, e.g. CAPO_CPU_ARCH=x86-64-v2 for a wheel that moves between machines.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

arch = os.environ.get("CAPO_CPU_ARCH", "native")
compile_args = ["-O3", "-fopenmp", f"-march={arch}"]

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
