"""The measuring tools every benchmark script shares: a device sync, peak-memory growth of a block, and the
round-robin stage timer. Import with ``sys.path`` holding this folder (the scripts run as ``python benchmarks/x.py``).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so wall-clock timings cover the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak growth of memory (bytes, ``.peak``) during a block: the CUDA allocator's peak above the allocated bytes
    at entry, or on CPU the resident set size sampled every ``interval`` seconds above its level at entry, after
    glibc has returned freed heap memory to the system (``malloc_trim``), so the growth counts this block's
    allocations."""

    def __init__(self, device: torch.device = torch.device("cpu"), interval: float = 0.005) -> None:
        self.device, self.interval, self.peak, self._stop = device, interval, 0, threading.Event()

    def _watch(self, start: int) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes() - start)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:  # not glibc
                pass
            self._start = rss_bytes()
            self._thread = threading.Thread(target=self._watch, args=(self._start,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes() - self._start)


def time_stages(stages: dict[str, Callable[[], object]], repeats: int, device: torch.device, *,
                memory: bool = False) -> dict[str, float] | tuple[dict[str, float], dict[str, int]]:
    """Median seconds per stage: one warm-up call each, then ``repeats`` round-robin passes (so a load change on a
    shared machine hits every stage alike). With ``memory=True`` also each stage's peak memory growth during its
    warm-up call, as ``(times, memory)``."""
    times: dict[str, list[float]] = {name: [] for name in stages}
    peaks: dict[str, int] = {}
    for name, fn in stages.items():
        if not memory:
            fn()
            continue
        with PeakMemory(device) as peak:
            fn()
        peaks[name] = peak.peak
    for _ in range(repeats):
        for name, fn in stages.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return (medians, peaks) if memory else medians
