"""The torch op's cost: against its autograd twin (what users have today) and against
calling the numba kernel directly (what the bridge adds), at the ViM-S layer shape."""
from __future__ import annotations

import numpy as np

from alignscan.bench.timing import interleaved_medians, median_time
from alignscan.testing import vim_layer_problem

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def bridge_rows(batch=8, dim=768, keep_ratio=0.7, alignment="prev", repeats=25, twin_repeats=1):
    import torch

    from alignscan import cuda_kernels as K
    from alignscan.bridges import selective_scan_fn, selective_scan_ref
    p = vim_layer_problem(batch=batch, dim=dim, keep_ratio=keep_ratio, alignment=alignment, dtype=np.float32)
    kw = p.kwargs(return_last_state=False)
    dout_np = p.dout()
    leaves = {n: torch.from_numpy(getattr(p, n)).requires_grad_() for n in NAMES}
    dout = torch.from_numpy(dout_np)
    positions = torch.from_numpy(p.positions)

    def op(fn):
        return fn(*(leaves[n] for n in NAMES), True, positions=positions, seqlen=p.seqlen, alignment=alignment)

    def op_fb(fn):
        torch.autograd.grad(op(fn), list(leaves.values()), dout)

    def direct_fb():
        K.selective_scan_fwd(**kw)
        K.selective_scan_bwd(dout_np, **kw)

    # The op and the bare kernel are timed in interleaved rounds: their ratio is the bridge's cost.
    with torch.no_grad():
        rows = interleaved_medians({"op_fwd": lambda: op(selective_scan_fn),
                                    "direct_fwd": lambda: K.selective_scan_fwd(**kw)}, repeats)
        rows["twin_fwd"] = median_time(lambda: op(selective_scan_ref), max(1, twin_repeats), warmup=0)
    rows.update(interleaved_medians({"op_fwd_bwd": lambda: op_fb(selective_scan_fn),
                                     "direct_fwd_bwd": direct_fb}, repeats))
    rows["twin_fwd_bwd"] = median_time(lambda: op_fb(selective_scan_ref), twin_repeats, warmup=0)
    return {"shape": f"batch {batch}, dim {dim}, N 16, L 197, keep {keep_ratio}, {alignment}", "seconds": rows}


def bridge_checks(result, batch=8, dim=768):
    """The op's timing targets, each with ``remeasure`` (the bridge's timings again)."""
    from alignscan.bench.checks import timing_check
    s = result["seconds"]

    def again(a, b):
        def remeasure():
            seconds = bridge_rows(batch=batch, dim=dim, repeats=9)["seconds"]
            return seconds[a] / seconds[b]
        return remeasure
    checks = [("op forward speed-up over the torch twin", "twin_fwd", "op_fwd", ">= 5", lambda v: v >= 5),
              ("op forward+backward speed-up over the torch twin", "twin_fwd_bwd", "op_fwd_bwd", ">= 50",
               lambda v: v >= 50),
              ("op forward / direct kernel call", "op_fwd", "direct_fwd", "<= 1.10", lambda v: v <= 1.10),
              ("op forward+backward / direct kernel calls", "op_fwd_bwd", "direct_fwd_bwd", "<= 1.10",
               lambda v: v <= 1.10)]
    return [timing_check(f"torch op: {name}", s[a] / s[b], goal, ok, again(a, b)) for name, a, b, goal, ok in checks]
