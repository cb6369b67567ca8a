"""Measurement helpers shared by the benchmark suites: device sync, memory peaks, machine bandwidth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the starting point while the block runs (CUDA allocator, or sampled RSS on CPU)."""

    def __enter__(self):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = rss_bytes()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if CUDA:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.extra_bytes = self.peak - self.base


def peak_in_own_process(script: str, *args: str) -> int:
    """Runs `python script --peak ARGS` and returns the peak extra bytes it prints as JSON.

    A fresh process per provider, so one provider's allocator pools and compiled caches do not
    count against another.
    """
    out = subprocess.run(
        [sys.executable, script, "--peak", *args], check=True, capture_output=True, text=True, env=os.environ.copy()
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"])
