"""The kernel table: backend x alignment x keep ratio at the ViM-S layer shape.

Every row times the forward pass of one backend on one pruned problem and states how far
its output lies from the float64 reference (for the reference itself: from the oracle of
SPEC §2 that shares no code path with it: expansion for "prev"/"self", relabel for "none").
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

import reference as R
from bench.problems import vim_layer_problem
from bench.timing import median_time

ALIGNMENTS = R.ALIGNMENTS
KEEP_RATIOS = (1.0, 0.7, 0.5)


def _reference_oracle_output(p):
    """The pruned scan computed through an oracle of SPEC §2 instead of the scan itself."""
    kw = p.kwargs(return_last_state=False)
    kw.pop("return_last_state")
    if p.alignment == "none":
        return R.selective_scan(**kw | {"positions": None, "seqlen": None})
    dense = R.selective_scan(**R.expand_to_dense(**kw))
    pos = np.repeat(p.positions[:, None, :], p.u.shape[1], axis=1)
    return np.take_along_axis(dense, pos, axis=2)


def forward_fn(backend):
    """The forward callable of a backend name ("reference" or a cuda_kernels backend)."""
    if backend == "reference":
        return R.selective_scan
    import cuda_kernels
    return lambda *a, **k: cuda_kernels.selective_scan_fwd(*a, backend=backend, **k)


def kernel_table(backends=("reference",), alignments=ALIGNMENTS, keep_ratios=KEEP_RATIOS, batch=1,
                 dim=768, dtype=np.float32, repeats=5, progress=True):
    """Rows of {backend, alignment, keep_ratio, tokens, seconds, speedup_vs_keep1, max_rel_dev, ...}."""
    rows = []
    jobs = [(b, a, r) for b in backends for a in alignments for r in keep_ratios]
    for backend, alignment, ratio in tqdm(jobs, desc="kernels", disable=not progress, leave=False):
        p = vim_layer_problem(batch=batch, dim=dim, keep_ratio=ratio, alignment=alignment, dtype=dtype)
        fn = forward_fn(backend)
        kw = p.kwargs(return_last_state=False)
        out = fn(**kw)
        expected = _reference_oracle_output(p) if backend == "reference" else R.selective_scan(**kw)
        max_abs, max_rel = R.max_deviation(out, expected)
        compute_dtype = np.float64 if backend == "reference" else np.dtype(dtype)
        rows.append({
            "backend": backend, "alignment": alignment, "keep_ratio": ratio, "tokens": int(p.u.shape[2]),
            "shape": f"b{batch} d{dim} N{p.A.shape[1]} L197", "dtype": str(np.dtype(dtype)),
            "seconds": median_time(lambda: fn(**kw), repeats=repeats),
            "max_abs_dev": max_abs, "max_rel_dev": max_rel,
            "within_tolerance": R.within_tolerance(out, expected, compute_dtype),
            "judged_against": "oracle (SPEC §2)" if backend == "reference" else "reference",
        })
    for row in rows:
        base = next(r for r in rows if r["backend"] == row["backend"] and r["alignment"] == row["alignment"]
                    and r["keep_ratio"] == 1.0) if 1.0 in keep_ratios else None
        row["time_vs_keep1"] = row["seconds"] / base["seconds"] if base else float("nan")
    return rows


def format_table(rows):
    head = f"{'backend':<12} {'align':<5} {'keep':>5} {'M':>4} {'time ms':>9} {'t/t(1.0)':>8} {'max rel dev':>11}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<12} {r['alignment']:<5} {r['keep_ratio']:>5.2f} {r['tokens']:>4} "
                     f"{1e3 * r['seconds']:>9.2f} {r['time_vs_keep1']:>8.2f} {r['max_rel_dev']:>11.2e}  "
                     f"{'yes' if r['within_tolerance'] else 'NO'}")
    return "\n".join(lines)
