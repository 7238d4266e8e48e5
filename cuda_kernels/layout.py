"""What every backend computes the same way before its kernel runs (no torch, NumPy only)."""
from __future__ import annotations

import numpy as np

from reference.positions import gaps

__all__ = ["compute_dtype", "gap_coefficients"]


def compute_dtype(args):
    """float64 inputs compute in float64; float16/float32 in float32 (SPEC §1, Precision)."""
    return np.dtype(np.float64) if np.dtype(args.u.dtype) == np.float64 else np.dtype(np.float32)


def gap_coefficients(positions, seqlen_rows, alignment, dtype):
    """Per-token coefficients that make E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} for every
    alignment (SPEC §1), and the pruned steps after the last token that last_state advances:

        "prev": (1, g_i - 1)    "self": (g_i, 0)    "none": (1, 0), no trailing steps
        token 0: (1, 0) always.

    With these the kernels run the same code, at the same cost, for every alignment.
    """
    batch, length = positions.shape
    gap = gaps(positions)
    coef_self = np.ones((batch, length), dtype=dtype)
    coef_prev = np.zeros((batch, length), dtype=dtype)
    if alignment == "prev":
        coef_prev[:] = gap - 1
    elif alignment == "self":
        coef_self[:] = gap
    if alignment == "none" or length == 0:
        trailing = np.zeros(batch, dtype=dtype)
    else:
        trailing = (seqlen_rows - 1 - positions[:, -1]).astype(dtype)
    return coef_self, coef_prev, trailing
