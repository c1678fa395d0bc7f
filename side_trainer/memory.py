"""Peak memory of a stretch of work, measured the same way for every method.

CPU: the peak resident set size, sampled by a thread every few milliseconds from /proc
(ru_maxrss cannot be reset, so it would also count earlier work such as loading a backbone).
GPU: `torch.cuda.max_memory_allocated` after a reset. `peak_mb` / `total_mb` are the device's
(the GPU's where the work runs on one): the peak above the start of the stretch, and the peak
itself (weights and everything loaded before included). `rss_peak_mb` / `rss_total_mb` are the
process's RSS figures on any device."""

from __future__ import annotations

import os
import sys
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def allocator(pid: int | str = "self") -> str:
    """`jemalloc` when this process (or process `pid`) runs on jemalloc (see api/allocator.py),
    else `system`: peak memory on CPU depends on it, so results record it."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "jemalloc" if "libjemalloc" in maps.read() else "system"
    except OSError:  # no /proc (not Linux)
        return "system"


class PeakMemory:
    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.cuda = str(device).startswith("cuda")
        self.interval_s = interval_s
        self.peak_mb = self.total_mb = self.rss_peak_mb = self.rss_total_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._rss_peak = max(self._rss_peak, rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._rss_base = self._rss_peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss_peak = max(self._rss_peak, rss_bytes())
        self.rss_peak_mb = (rss_peak - self._rss_base) / 2**20
        self.rss_total_mb = rss_peak / 2**20
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.peak_mb = (peak - self._cuda_base) / 2**20
            self.total_mb = peak / 2**20
        else:
            self.peak_mb, self.total_mb = self.rss_peak_mb, self.rss_total_mb


def module_bytes(module: torch.nn.Module) -> int:
    """What holding `module` costs in memory: its parameters' and buffers' bytes, and its Python
    objects (each submodule, its attribute dict and the containers in it, by sys.getsizeof).
    The Python part is not small: 166 KB for a MiniLM side network of 1.3 MB of weights
    (tracemalloc counted 169 KB), so a cache that counted weights alone would hold ~13% more
    than its budget."""
    tensors = python = 0
    for m in module.modules():
        python += sys.getsizeof(m) + sys.getsizeof(m.__dict__)
        for value in m.__dict__.values():
            if isinstance(value, dict):
                python += sys.getsizeof(value) + sum(sys.getsizeof(k) for k in value)
            elif isinstance(value, (list, set, tuple, torch.Tensor)):
                python += sys.getsizeof(value)
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                tensors += t.numel() * t.element_size()
                python += sys.getsizeof(t)
    return tensors + python
