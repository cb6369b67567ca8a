"""Benchmark set-up, before torch allocates anything.

THP_MEM_ALLOC_ENABLE=1 makes PyTorch's CPU allocator back large tensors with transparent huge pages
(c10/core/impl/alloc_cpu.cpp). Without it, every fresh [N, V] buffer is first touched 4 KiB page by
page: about 110 ms per 0.5 GB on the 2-core machine of bench/results, for eager torch as much as for
the fused ops, which would measure the kernel's page faults rather than the kernel.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
