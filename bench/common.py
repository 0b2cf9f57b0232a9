"""Shared benchmark helpers: interleaved timing so that machine noise hits every variant alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_times(variants: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, list]:
    """Run each variant once per round, `reps` rounds (after `warmup` rounds); wall seconds per call."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list) -> float:
    return statistics.median(xs)
