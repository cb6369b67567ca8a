"""capo-fast: CAPO (Credit Assignment Policy Optimization) for reasoning LLMs.

The package imports nothing heavy: the kernels live in `capo_fast.kernels`, the trainer pieces in
their own modules.
"""

__version__ = "0.1.0"
