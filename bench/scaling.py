"""How the numba CPU kernels scale: with threads (batch 1 and batch 8), and with sequence
length (197 to 65,536 tokens), forward and forward+backward, with peak memory; and the
memory of a long sequence (262,144 tokens), each length in a fresh process so that its peak
resident memory is its own.

    scaling_table() -> {"threads": rows, "lengths": rows, "checks": [...]}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import alignscan
from alignscan.outputs import progress_bar

# The folder that holds the alignscan package (a checkout's root, or site-packages): the child imports from it.
ROOT = Path(alignscan.__file__).resolve().parents[1]
THREAD_SHAPES = ({"batch": 1, "dim": 768, "length": 4096}, {"batch": 8, "dim": 768, "length": 197})
LENGTHS = (197, 1024, 4096, 16384, 65536)
LONG = 262_144
MEMORY_GOAL_GB = 1.2

_MEASURE = r"""
import json, resource, sys
import numpy as np, numba
from alignscan import cuda_kernels as K
from alignscan.testing import make_problem
batch, dim, length, threads, repeats = (int(v) for v in sys.argv[1:6])
numba.set_num_threads(threads)
p = make_problem(np.random.default_rng(0), batch=batch, dim=dim, dstate=16, length=length, dtype=np.float32,
                 positions=np.arange(length) * 2, seqlen=2 * length, return_last_state=False)
kw = p.kwargs(); dout = p.dout()
from alignscan.bench.timing import median_time
timed = lambda fn: median_time(fn, repeats=repeats, warmup=1)
fwd = timed(lambda: K.selective_scan_fwd(**kw))
fwd_bwd = timed(lambda: (K.selective_scan_fwd(**kw), K.selective_scan_bwd(dout, **kw)))
def peak_rss_gb():
    # VmHWM: this process image's own peak. Linux carries ru_maxrss across fork and exec, so
    # a child of a big parent would report the parent's peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "peak_rss_gb": peak_rss_gb()}))
"""


def measure(batch, dim, length, threads, repeats=3):
    """Forward and forward+backward medians and the peak RSS of a fresh process (numba-cpu,
    float32, N 16, every other token kept)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(batch), str(dim), str(length), str(threads),
                          str(repeats)], env=env, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:
        raise RuntimeError(f"scaling measurement failed (L={length}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def thread_rows(max_threads=None, repeats=5):
    """Forward and forward+backward at each thread count, in this process; and whether the
    results are bit-identical to one thread's."""
    import numba

    from alignscan import cuda_kernels as K
    from alignscan.bench.timing import median_time
    from alignscan.testing import make_problem
    max_threads = max_threads or numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    rows = []
    try:
        for shape in THREAD_SHAPES:
            p = make_problem(np.random.default_rng(0), batch=shape["batch"], dim=shape["dim"], dstate=16,
                             length=shape["length"], dtype=np.float32, return_last_state=False)
            kw, dout = p.kwargs(), p.dout()
            first = None
            for threads in progress_bar(range(1, max_threads + 1), desc=f"threads, batch {shape['batch']}",
                                        leave=False):
                numba.set_num_threads(threads)
                grads = K.selective_scan_bwd(dout, **kw)
                first = first or grads
                identical = all(a is None or np.array_equal(a, b) for a, b in zip(grads, first))
                rows.append({**shape, "threads": threads,
                             "fwd_s": median_time(lambda: K.selective_scan_fwd(**kw), repeats=repeats),
                             "bwd_s": median_time(lambda: K.selective_scan_bwd(dout, **kw), repeats=repeats),
                             "bit_identical_to_1_thread": bool(identical)})
    finally:
        numba.set_num_threads(before)
    for row in rows:
        one = next(r for r in rows if r["batch"] == row["batch"] and r["threads"] == 1)
        row["fwd_speedup"] = one["fwd_s"] / row["fwd_s"]
        row["bwd_speedup"] = one["bwd_s"] / row["bwd_s"]
    return rows


def length_rows(threads, lengths=LENGTHS, dim=64):
    """Time per token and peak memory against sequence length (batch 1), one process each."""
    rows = []
    for length in progress_bar(lengths, desc="lengths", leave=False):
        m = measure(1, dim, length, threads)
        rows.append({"batch": 1, "dim": dim, "length": length, "threads": threads, **m,
                     "fwd_us_per_token": 1e6 * m["fwd_s"] / length, "fwd_bwd_us_per_token": 1e6 * m["fwd_bwd_s"] / length})
    return rows


def scaling_table(max_threads=None):
    import numba
    threads = max_threads or numba.config.NUMBA_NUM_THREADS
    table = {"threads": thread_rows(threads), "lengths": length_rows(threads)}
    long = measure(1, 64, LONG, threads, repeats=1)
    table["long"] = {"batch": 1, "dim": 64, "length": LONG, "threads": threads, **long}
    table["checks"] = scaling_checks(table)
    return table


def scaling_checks(table):
    from alignscan.bench.checks import timing_check
    checks = []
    rows = {(r["batch"], r["threads"]): r for r in table["threads"]}
    if (1, 2) in rows:
        checks.append(timing_check("numba-cpu: backward on 2 threads / 1 thread, batch 1, dim 768, L 4096 (speed-up)",
                                   rows[(1, 2)]["bwd_speedup"], ">= 1.7", lambda v: v >= 1.7, None))
    identical = all(r["bit_identical_to_1_thread"] for r in table["threads"])
    checks.append({"check": "numba-cpu: gradients bit-identical for every thread count", "value": float(identical),
                   "goal": "1 (yes)", "passed": identical, "kind": "correctness"})
    peak = table["long"]["peak_rss_gb"]
    checks.append({"check": f"numba-cpu: peak memory of forward+backward, batch 1, dim 64, L {LONG:,}, float32 (GB)",
                   "value": peak, "goal": f"<= {MEMORY_GOAL_GB}", "passed": peak <= MEMORY_GOAL_GB,
                   "kind": "correctness"})
    return checks


def format_scaling(table):
    lines = [f"{'batch':>5} {'dim':>4} {'L':>6} {'threads':>7} {'fwd ms':>8} {'bwd ms':>8} {'fwd x':>6} {'bwd x':>6}  "
             "bit-identical"]
    for r in table["threads"]:
        lines.append(f"{r['batch']:>5} {r['dim']:>4} {r['length']:>6} {r['threads']:>7} {1e3 * r['fwd_s']:>8.1f} "
                     f"{1e3 * r['bwd_s']:>8.1f} {r['fwd_speedup']:>6.2f} {r['bwd_speedup']:>6.2f}  "
                     f"{'yes' if r['bit_identical_to_1_thread'] else 'NO'}")
    lines += ["", f"{'L':>7} {'fwd us/token':>12} {'fwd+bwd us/token':>16} {'peak RSS GB':>11}   (batch 1, dim 64, "
              f"{table['lengths'][0]['threads']} threads)"]
    for r in table["lengths"] + [dict(table["long"], fwd_us_per_token=1e6 * table["long"]["fwd_s"] / LONG,
                                      fwd_bwd_us_per_token=1e6 * table["long"]["fwd_bwd_s"] / LONG)]:
        lines.append(f"{r['length']:>7} {r['fwd_us_per_token']:>12.3f} {r['fwd_bwd_us_per_token']:>16.3f} "
                     f"{r['peak_rss_gb']:>11.2f}")
    return "\n".join(lines)


def plot_scaling(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignscan.outputs import save_figure
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = table["lengths"] + [dict(table["long"], fwd_us_per_token=1e6 * table["long"]["fwd_s"] / LONG,
                                       fwd_bwd_us_per_token=1e6 * table["long"]["fwd_bwd_s"] / LONG)]
    L = [r["length"] for r in lengths]
    ax1.plot(L, [r["fwd_us_per_token"] for r in lengths], "-o", label="forward")
    ax1.plot(L, [r["fwd_bwd_us_per_token"] for r in lengths], "-s", label="forward+backward")
    ax1.set(xscale="log", xlabel="tokens L", ylabel="µs per token", ylim=(0, None),
            title=f"numba-cpu, batch 1, dim 64, N 16, {lengths[0]['threads']} threads")
    for shape in {(r["batch"], r["length"]) for r in table["threads"]}:
        rows = sorted((r for r in table["threads"] if (r["batch"], r["length"]) == shape), key=lambda r: r["threads"])
        t = [r["threads"] for r in rows]
        ax2.plot(t, [r["fwd_speedup"] for r in rows], "-o", label=f"forward, batch {shape[0]}, L {shape[1]}")
        ax2.plot(t, [r["bwd_speedup"] for r in rows], "--s", label=f"backward, batch {shape[0]}, L {shape[1]}")
    top = max(r["threads"] for r in table["threads"])
    ax2.plot([1, top], [1, top], "k:", lw=0.8, label="linear")
    ax2.set(xlabel="threads", ylabel="speed-up over 1 thread", title="numba-cpu, dim 768, N 16")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
