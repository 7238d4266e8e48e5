"""The kernel table: backend x alignment x keep ratio at the ViM-S layer shape, and the
performance checks of the numba-cpu kernel.

Every row times forward and forward+backward of one backend on one pruned problem and states
how far its output lies from the float64 reference (for the reference itself: from the
oracle of SPEC §2 that shares no code path with it: expansion for "prev"/"self", relabel
for "none").
"""
from __future__ import annotations

import statistics

import numpy as np

from alignscan import reference as R
from alignscan.bench.checks import timing_check
from alignscan.bench.timing import interleaved_medians, median_time, timings
from alignscan.outputs import progress_bar
from alignscan.testing import vim_layer_problem

ALIGNMENTS = R.ALIGNMENTS
KEEP_RATIOS = (1.0, 0.7, 0.5)


def _reference_oracle_output(p):
    """The pruned scan computed through an oracle of SPEC §2 instead of the scan itself."""
    kw = p.kwargs()
    kw.pop("return_last_state")
    if p.alignment == "none":
        return R.selective_scan(**kw | {"positions": None, "seqlen": None})
    dense = R.selective_scan(**R.expand_to_dense(**kw))
    pos = np.repeat(p.positions[:, None, :], p.u.shape[1], axis=1)
    return np.take_along_axis(dense, pos, axis=2)


def backend_fns(backend):
    """(forward, backward) callables of "reference" or a cuda_kernels backend."""
    if backend == "reference":
        return R.selective_scan, R.selective_scan_backward
    from alignscan import cuda_kernels as K
    return (lambda *a, **k: K.selective_scan_fwd(*a, backend=backend, **k),
            lambda *a, **k: K.selective_scan_bwd(*a, backend=backend, **k))


def kernel_table(backends=("reference",), alignments=ALIGNMENTS, keep_ratios=KEEP_RATIOS, batch=8, dim=768,
                 dtype=np.float32, repeats=5, backward=True, progress=True):
    """Rows of {backend, alignment, keep_ratio, tokens, fwd_s, fwd_bwd_s, max_rel_dev, ...}."""
    rows = []
    jobs = [(b, a, r) for b in backends for a in alignments for r in keep_ratios]
    for backend, alignment, ratio in progress_bar(jobs, desc="kernel table", disable=not progress, leave=False):
        p = vim_layer_problem(batch=batch, dim=dim, keep_ratio=ratio, alignment=alignment, dtype=dtype)
        fwd, bwd = backend_fns(backend)
        kw = p.kwargs(return_last_state=False)
        dout = p.dout()
        out = fwd(**kw)
        expected = _reference_oracle_output(p) if backend == "reference" else R.selective_scan(**kw)
        max_abs, max_rel = R.max_deviation(out, expected)
        compute_dtype = np.float64 if backend == "reference" else np.dtype(dtype)
        reps = max(2, repeats // 2) if backend == "reference" else repeats
        row = {
            "backend": backend, "alignment": alignment, "keep_ratio": ratio, "tokens": int(p.u.shape[2]),
            "shape": f"batch {batch}, dim {dim}, N {p.A.shape[1]}, L 197", "dtype": str(np.dtype(dtype)),
            "max_abs_dev": max_abs, "max_rel_dev": max_rel,
            "within_tolerance": R.within_tolerance(out, expected, compute_dtype),
            "judged_against": "oracle (SPEC §2)" if backend == "reference" else "reference",
        }
        calls = {"fwd": lambda: fwd(**kw)}
        if backward:
            calls["fwd_bwd"] = lambda: (fwd(**kw), bwd(dout, **kw))
        for name, call in calls.items():
            times = timings(call, repeats=reps)
            row[f"{name}_s"], row[f"{name}_min_s"], row[f"{name}_max_s"] = statistics.median(times), min(times), max(times)
        rows.append(row)
    for row in rows:
        base = [r for r in rows if r["backend"] == row["backend"] and r["alignment"] == row["alignment"]
                and r["keep_ratio"] == 1.0]
        row["time_vs_keep1"] = row["fwd_s"] / base[0]["fwd_s"] if base else float("nan")
    return rows


def _exp_call(batch=8, dim=768, dstate=16, tokens=197, library="numpy"):
    """One exp per state element, the floor of the scan: ``np.exp`` (vectorised only where
    NumPy has SIMD exp for the CPU) or ``torch.exp`` (SLEEF, vectorised on AVX2 and AVX-512)
    over batch·dim·M·N float32 values; None when torch is not installed."""
    x = np.random.default_rng(0).standard_normal(batch * dim * tokens * dstate).astype(np.float32)
    out = np.empty_like(x)
    if library == "numpy":
        return lambda: np.exp(x, out=out)
    try:
        import torch
    except ImportError:
        return None
    xt, ot = torch.from_numpy(x), torch.from_numpy(out)
    return lambda: torch.exp(xt, out=ot)


def exp_floor_seconds(batch=8, dim=768, dstate=16, tokens=197, repeats=7):
    """Median times {"numpy": s, "torch": s} of one exp over batch·dim·M·N float32 values."""
    floors = {}
    for library in ("numpy", "torch"):
        call = _exp_call(batch, dim, dstate, tokens, library)
        if call is not None:
            floors[library] = median_time(call, repeats=repeats)
    return floors


def interleaved_ratio(fn_a, fn_b, repeats=5):
    """median(fn_a) / median(fn_b), timed in interleaved rounds."""
    times = interleaved_medians({"a": fn_a, "b": fn_b}, repeats=repeats)
    return times["a"] / times["b"]


def _call(backend, alignment, ratio, backward, batch, dim, dtype=np.float32):
    """One timed call of the table: forward, or forward+backward, of a backend on a problem."""
    p = vim_layer_problem(batch=batch, dim=dim, keep_ratio=ratio, alignment=alignment, dtype=dtype)
    fwd, bwd = backend_fns(backend)
    kw = p.kwargs(return_last_state=False)
    dout = p.dout()
    return (lambda: (fwd(**kw), bwd(dout, **kw))) if backward else (lambda: fwd(**kw))


def performance_checks(rows, exp_seconds, backend="numba-cpu", batch=8, dim=768):
    """The kernel's timing targets from one table run, each {check, value, goal, passed,
    kind: "timing", remeasure}; ``remeasure`` times the two sides again in interleaved rounds."""
    get = {(r["backend"], r["alignment"], r["keep_ratio"]): r for r in rows}
    if (backend, "prev", 1.0) not in get or ("reference", "prev", 1.0) not in get:
        return []
    k, ref = get[(backend, "prev", 1.0)], get[("reference", "prev", 1.0)]
    call = lambda b, a, r, bw: _call(b, a, r, bw, batch, dim)
    exp_floor = _exp_call(batch, dim)
    torch_floor = _exp_call(batch, dim, library="torch")
    checks = [
        ("forward speed-up over the reference", ref["fwd_s"] / k["fwd_s"], ">= 5", lambda v: v >= 5,
         lambda: interleaved_ratio(call("reference", "prev", 1.0, False), call(backend, "prev", 1.0, False), 3)),
        ("forward+backward speed-up over the reference", ref["fwd_bwd_s"] / k["fwd_bwd_s"], ">= 4", lambda v: v >= 4,
         lambda: interleaved_ratio(call("reference", "prev", 1.0, True), call(backend, "prev", 1.0, True), 3)),
        ("forward+backward / forward", k["fwd_bwd_s"] / k["fwd_s"], "<= 3.5", lambda v: v <= 3.5,
         lambda: interleaved_ratio(call(backend, "prev", 1.0, True), call(backend, "prev", 1.0, False), 9)),
        ("forward / np.exp over every state element", k["fwd_s"] / exp_seconds["numpy"], "<= 3", lambda v: v <= 3,
         lambda: interleaved_ratio(call(backend, "prev", 1.0, False), exp_floor, 9)),
    ]
    if torch_floor is not None and "torch" in exp_seconds:
        # The honest floor: a vectorised exp. Goals: forward within 1.3x of it (a scan needs one exp per
        # state element and little else), forward+backward within 4x (the backward's extra exp and reverse pass).
        checks.append(("forward / torch.exp over every state element (vectorised floor)",
                       k["fwd_s"] / exp_seconds["torch"], "<= 1.3", lambda v: v <= 1.3,
                       lambda: interleaved_ratio(call(backend, "prev", 1.0, False), torch_floor, 9)))
        checks.append(("forward+backward / torch.exp over every state element", k["fwd_bwd_s"] / exp_seconds["torch"],
                       "<= 4", lambda v: v <= 4,
                       lambda: interleaved_ratio(call(backend, "prev", 1.0, True), torch_floor, 5)))
    if (backend, "none", 0.7) in get and (backend, "prev", 0.7) in get:
        ratio = get[(backend, "prev", 0.7)]["fwd_s"] / get[(backend, "none", 0.7)]["fwd_s"]
        checks.append(("aligned / relabel at keep 0.7", ratio, "<= 1.05", lambda v: v <= 1.05,
                       lambda: interleaved_ratio(call(backend, "prev", 0.7, False), call(backend, "none", 0.7, False),
                                                 15)))
    if (backend, "hold", 0.7) in get and (backend, "prev", 0.7) in get:
        # "hold" adds the held input (S_q, a second exp) at each token after a gap: at most 1.3x aligned.
        ratio = get[(backend, "hold", 0.7)]["fwd_s"] / get[(backend, "prev", 0.7)]["fwd_s"]
        checks.append(("hold / aligned at keep 0.7", ratio, "<= 1.3", lambda v: v <= 1.3,
                       lambda: interleaved_ratio(call(backend, "hold", 0.7, False), call(backend, "prev", 0.7, False),
                                                 15)))
    for r in (0.7, 0.5):
        if (backend, "prev", r) in get:
            checks.append((f"time at keep {r} / time at keep 1.0", get[(backend, "prev", r)]["time_vs_keep1"],
                           f"<= {r + 0.05:.2f}", lambda v, r=r: v <= r + 0.05,
                           lambda r=r: interleaved_ratio(call(backend, "prev", r, False),
                                                         call(backend, "prev", 1.0, False), 15)))
    return [timing_check(f"{backend}: {name}", value, goal, ok, again) for name, value, goal, ok, again in checks]


def format_table(rows):
    head = (f"{'backend':<11} {'align':<5} {'keep':>4} {'M':>4} {'fwd ms':>8} {'[min, max]':>15} {'fwd+bwd ms':>10} "
            f"{'t/t(1.0)':>8} {'max rel dev':>11}  within tol")
    lines = [head, "-" * len(head)]
    for r in rows:
        fb = f"{1e3 * r['fwd_bwd_s']:>10.2f}" if "fwd_bwd_s" in r else f"{'-':>10}"
        spread = f"[{1e3 * r['fwd_min_s']:.2f}, {1e3 * r['fwd_max_s']:.2f}]"
        lines.append(f"{r['backend']:<11} {r['alignment']:<5} {r['keep_ratio']:>4.2f} {r['tokens']:>4} "
                     f"{1e3 * r['fwd_s']:>8.2f} {spread:>15} {fb} {r['time_vs_keep1']:>8.2f} {r['max_rel_dev']:>11.2e}  "
                     f"{'yes' if r['within_tolerance'] else 'NO'}")
    return "\n".join(lines)


def plot_times(rows, path, quick=False):
    """Forward time vs keep ratio, one line per backend and alignment, the bars spanning the
    fastest and slowest repeat; the time axis starts at 0 (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignscan.outputs import save_figure
    backends = sorted({r["backend"] for r in rows})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for alignment, style in zip(ALIGNMENTS, ("-o", "--s", ":^", "-.d")):
            pts = sorted((r["keep_ratio"], 1e3 * r["fwd_s"], 1e3 * r["fwd_min_s"], 1e3 * r["fwd_max_s"]) for r in rows
                         if r["backend"] == backend and r["alignment"] == alignment)
            if pts:
                k, t, lo, hi = map(np.array, zip(*pts))
                ax.errorbar(k, t, yerr=[t - lo, hi - t], fmt=style, capsize=3, label=alignment)
        ax.set_title(f"{backend}: forward, {rows[0]['shape']}", fontsize=9)
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("time (ms): median, bars min-max over repeats")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(title="alignment")
    if quick:
        fig.suptitle("SMOKE TEST (--quick): tiny sizes; timings mean nothing", color="red")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
