"""Keep freed host memory for reuse on CPU ranks, as a caching allocator does on the GPU.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB as blocks are
freed) with a fresh mmap and returns it to the kernel on free, and trims the heap's top once more than its trim
threshold is free. A training step allocates the same activations, logits and gradient temporaries every time, so
on the CPU each step page-faults them in again (the kernel zero-fills every 4 KiB page): measured 42,000 minor
faults, and a fifth to a third of a gpt2-tiny step's time (bench/bench_est_step.py, docs/benchmarks.md). How
many depends on the process's allocation history, which made the same benchmark read differently in every fresh
process. Raising both thresholds (mallopt, the same as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the
environment) keeps freed blocks in the heap: after the first few steps a step faults nothing. The process's
resident size then stays at its peak instead of falling between steps. CUDA tensors do not use malloc (torch's
caching allocator keeps them), so GPU ranks are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_LARGEST = 2**31 - 1  # mallopt takes an int


def preloaded_allocator() -> Optional[str]:
    """jemalloc or tcmalloc when one is preloaded (LD_PRELOAD) in place of glibc's malloc, else None."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:  # not Linux
        return None
    return next((name for name in ("jemalloc", "tcmalloc") if f"lib{name}" in maps), None)


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory(enabled: bool, device_type: str) -> str:
    """Raise glibc's thresholds in this process when enabled on a CPU rank; what the host allocator does now, for
    the run's header line."""
    other = preloaded_allocator()
    if other is not None:
        return f"{other} (preloaded)"
    libc = _glibc()
    if libc is None:
        return "the platform's malloc"
    if device_type != "cpu":
        return "glibc defaults (GPU rank)"
    if not enabled:
        return "glibc defaults (--no-keep-host-memory)"
    ok = all(libc.mallopt(ctypes.c_int(opt), ctypes.c_int(_LARGEST)) == 1
             for opt in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD))
    return "freed blocks kept for reuse (glibc)" if ok else "glibc defaults (mallopt refused)"
