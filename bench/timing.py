"""Every timing of the project goes through here: wall clock, a warm-up, the median of repeats,
interleaved rounds for ratios. ``sync`` (a GPU's synchronize) is called before the clock
starts and before it stops, so asynchronous device work is inside the measured interval."""
from __future__ import annotations

import statistics
import time

__all__ = ["timings", "median_time", "interleaved_medians", "interleaved_times"]


def _timed(fn, sync):
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def timings(fn, repeats=5, warmup=1, min_seconds=0.0, sync=None):
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` calls.

    With ``min_seconds``, keeps repeating (up to 10x repeats) until that much time is spent,
    so very short calls still get a stable median.
    """
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < repeats or (spent < min_seconds and len(times) < 10 * repeats):
        dt = _timed(fn, sync)
        times.append(dt)
        spent += dt
    return times


def median_time(fn, repeats=5, warmup=1, min_seconds=0.0, sync=None):
    """Median seconds of ``fn()`` (see ``timings``)."""
    return statistics.median(timings(fn, repeats, warmup, min_seconds, sync))


def interleaved_times(fns, repeats=9, warmup=1, sync=None, progress=None):
    """Seconds of every round of each callable in ``fns`` (a dict), timed in interleaved rounds
    (A, B, A, B, ...) so that drift in the machine's speed hits them alike. ``progress`` wraps
    the range of rounds (a progress bar)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    rounds = range(repeats) if progress is None else progress(range(repeats))
    for _ in rounds:
        for name, fn in fns.items():
            times[name].append(_timed(fn, sync))
    return times


def interleaved_medians(fns, repeats=9, warmup=1, sync=None):
    """Median seconds of each callable in ``fns``, timed in interleaved rounds."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, warmup, sync).items()}
