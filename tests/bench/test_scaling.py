"""The scaling benchmark's fresh-process measurement: its peak memory is the child's own."""
import numpy as np

from alignscan.bench.scaling import measure


def test_peak_memory_is_the_measuring_process_own_not_its_parents():
    """Linux carries ru_maxrss across fork and exec: a child of a process that once held
    1.5 GB reports at least 1.5 GB whatever it measures (so the main job's rows, measured
    after the torch twin's timings, would report the twin's peak). A small scan must read
    well under that."""
    ballast = np.ones(1_500_000_000 // 8)            # 1.5 GB, touched
    try:
        row = measure(batch=1, dim=8, length=197, threads=1, repeats=1)
    finally:
        del ballast
    assert 0.01 < row["peak_rss_gb"] < 1.0, row
    assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > row["fwd_s"] * 0.5
