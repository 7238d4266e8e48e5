"""Wall-clock timing with a warm-up and the median of repeats."""
from __future__ import annotations

import statistics
import time


def median_time(fn, repeats=5, warmup=1, min_seconds=0.0):
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    With ``min_seconds``, keeps repeating (up to 10x repeats) until that much time is spent,
    so very short calls still get a stable median.
    """
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < repeats or (spent < min_seconds and len(times) < 10 * repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)
