"""Wall-clock timing with a warm-up and the median of repeats."""
from __future__ import annotations

import statistics
import time


def timings(fn, repeats=5, warmup=1, min_seconds=0.0):
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` calls.

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
    return times


def median_time(fn, repeats=5, warmup=1, min_seconds=0.0):
    """Median seconds of ``fn()`` (see ``timings``)."""
    return statistics.median(timings(fn, repeats, warmup, min_seconds))


def interleaved_medians(fns, repeats=9, warmup=1):
    """Median seconds of each callable in ``fns`` (a dict), timed in interleaved rounds
    (A, B, A, B, ...) so that drift in the machine's speed hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
