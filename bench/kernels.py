"""The kernel table: backend x alignment x keep ratio at the ViM-S layer shape, and the
performance checks of the numba-cpu kernel.

Every row times forward and forward+backward of one backend on one pruned problem and states
how far its output lies from the float64 reference (for the reference itself: from the
oracle of SPEC §2 that shares no code path with it: expansion for "prev"/"self", relabel
for "none").
"""
from __future__ import annotations

import numpy as np
from bench.progress import progress_bar

import reference as R
from bench.problems import vim_layer_problem
from bench.timing import median_time

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
    import cuda_kernels as K
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
            "fwd_s": median_time(lambda: fwd(**kw), repeats=reps),
            "max_abs_dev": max_abs, "max_rel_dev": max_rel,
            "within_tolerance": R.within_tolerance(out, expected, compute_dtype),
            "judged_against": "oracle (SPEC §2)" if backend == "reference" else "reference",
        }
        if backward:
            row["fwd_bwd_s"] = median_time(lambda: (fwd(**kw), bwd(dout, **kw)), repeats=reps)
        rows.append(row)
    for row in rows:
        base = [r for r in rows if r["backend"] == row["backend"] and r["alignment"] == row["alignment"]
                and r["keep_ratio"] == 1.0]
        row["time_vs_keep1"] = row["fwd_s"] / base[0]["fwd_s"] if base else float("nan")
    return rows


def exp_floor_seconds(batch=8, dim=768, dstate=16, tokens=197, repeats=7):
    """Median time of np.exp over batch·dim·M·N float32 values: one exp per state element is
    the floor of the scan."""
    x = np.random.default_rng(0).standard_normal(batch * dim * tokens * dstate).astype(np.float32)
    out = np.empty_like(x)
    return median_time(lambda: np.exp(x, out=out), repeats=repeats)


def performance_checks(rows, exp_seconds, backend="numba-cpu"):
    """The numba issue's targets, each {check, value, goal, passed}, from one table run."""
    get = {(r["backend"], r["alignment"], r["keep_ratio"]): r for r in rows}
    if (backend, "prev", 1.0) not in get or ("reference", "prev", 1.0) not in get:
        return []
    k, ref = get[(backend, "prev", 1.0)], get[("reference", "prev", 1.0)]
    checks = [
        ("forward speed-up over the reference", ref["fwd_s"] / k["fwd_s"], ">= 5", lambda v: v >= 5),
        ("forward+backward speed-up over the reference", ref["fwd_bwd_s"] / k["fwd_bwd_s"], ">= 4",
         lambda v: v >= 4),
        ("forward+backward / forward", k["fwd_bwd_s"] / k["fwd_s"], "<= 3.5", lambda v: v <= 3.5),
        ("forward / np.exp over every state element", k["fwd_s"] / exp_seconds, "<= 3", lambda v: v <= 3),
    ]
    if (backend, "none", 0.7) in get and (backend, "prev", 0.7) in get:
        ratio = get[(backend, "prev", 0.7)]["fwd_s"] / get[(backend, "none", 0.7)]["fwd_s"]
        checks.append(("aligned / relabel at keep 0.7", ratio, "<= 1.05", lambda v: v <= 1.05))
    for r in (0.7, 0.5):
        if (backend, "prev", r) in get:
            checks.append((f"time at keep {r} / time at keep 1.0", get[(backend, "prev", r)]["time_vs_keep1"],
                           f"<= {r + 0.05:.2f}", lambda v, r=r: v <= r + 0.05))
    return [{"check": f"{backend}: {name}", "value": value, "goal": goal, "passed": bool(ok(value))}
            for name, value, goal, ok in checks]


def format_table(rows):
    head = (f"{'backend':<11} {'align':<5} {'keep':>4} {'M':>4} {'fwd ms':>8} {'fwd+bwd ms':>10} "
            f"{'t/t(1.0)':>8} {'max rel dev':>11}  within tol")
    lines = [head, "-" * len(head)]
    for r in rows:
        fb = f"{1e3 * r['fwd_bwd_s']:>10.2f}" if "fwd_bwd_s" in r else f"{'-':>10}"
        lines.append(f"{r['backend']:<11} {r['alignment']:<5} {r['keep_ratio']:>4.2f} {r['tokens']:>4} "
                     f"{1e3 * r['fwd_s']:>8.2f} {fb} {r['time_vs_keep1']:>8.2f} {r['max_rel_dev']:>11.2e}  "
                     f"{'yes' if r['within_tolerance'] else 'NO'}")
    return "\n".join(lines)


def plot_times(rows, path):
    """Time vs keep ratio, one line per backend and alignment (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    backends = sorted({r["backend"] for r in rows})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for alignment, style in zip(ALIGNMENTS, ("-o", "--s", ":^")):
            pts = sorted((r["keep_ratio"], 1e3 * r["fwd_s"]) for r in rows
                         if r["backend"] == backend and r["alignment"] == alignment)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{alignment}")
        ax.set_title(f"{backend}: forward, {rows[0]['shape']}")
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("time (ms)")
        ax.grid(alpha=0.3)
        ax.legend(title="alignment")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
