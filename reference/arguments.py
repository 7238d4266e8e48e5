"""The one argument check of the position-map selective scan (SPEC §1).

Every public entry point (the reference, the kernels' front door, the torch op) calls
``validate_scan_args`` once and hands the kernels the clean contract it returns: B and C
grouped (batch, G, N, M), positions (batch, M) int64, seqlen per row. Arrays are only
inspected through ``shape``/``dtype``/``reshape``, so NumPy, CuPy and numba device arrays
pass through unchanged (positions alone are read on the host to check them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .positions import validate_positions

__all__ = ["ALIGNMENTS", "ScanArgs", "validate_scan_args", "host_array", "FLOAT_DTYPES"]

ALIGNMENTS = ("prev", "self", "none")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class ScanArgs:
    """Validated scan arguments; shapes: b batch, d dim, N state, G groups, M tokens."""

    u: Any            # (b, d, M)
    delta: Any        # (b, d, M)
    A: Any            # (d, N)
    B: Any            # (b, G, N, M)
    C: Any            # (b, G, N, M)
    D: Any            # (d,) or None
    z: Any            # (b, d, M) or None
    delta_bias: Any   # (d,) or None
    delta_softplus: bool
    return_last_state: bool
    positions: np.ndarray    # (b, M) int64, on the host
    seqlen_rows: np.ndarray  # (b,) int64: path length of each row
    alignment: str
    B_grouped: bool   # B came in as (b, G, N, M): its gradient goes back in that shape
    C_grouped: bool

    @property
    def batch(self):
        return self.u.shape[0]

    @property
    def dim(self):
        return self.u.shape[1]

    @property
    def length(self):
        return self.u.shape[2]

    @property
    def dstate(self):
        return self.A.shape[1]

    @property
    def groups(self):
        return self.B.shape[1]


def host_array(x):
    """A NumPy view or copy of an array that may live on a GPU (CuPy, numba.cuda)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "copy_to_host"):   # numba.cuda device array
        return x.copy_to_host()
    if hasattr(x, "get") and hasattr(x, "__cuda_array_interface__"):  # cupy
        return x.get()
    return np.asarray(x)


def _as_array(x, name):
    if x is None:
        return None
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        kind = "integer" if np.issubdtype(np.dtype(x.dtype), np.integer) else str(x.dtype)
        raise TypeError(f"{name} must be a float16/float32/float64 array, got {kind} ({x.dtype})")
    return x


def _check_shape(x, name, expected, what):
    if x is None:
        return
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def _grouped(x, name, batch, dim, dstate, length):
    if x.ndim == 3:
        _check_shape(x, name, (batch, dstate, length), "(batch, N, M)")
        return x.reshape(batch, 1, dstate, length), False
    if x.ndim == 4:
        groups = x.shape[1]
        if groups < 1 or dim % groups:
            raise ValueError(f"{name} has G={groups} groups but dim={dim} is not divisible by G")
        _check_shape(x, name, (batch, groups, dstate, length), "(batch, G, N, M)")
        return x, True
    raise ValueError(f"{name} must have shape (batch, N, M) or (batch, G, N, M), got ndim {x.ndim}")


def validate_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
    """Check every argument of the scan once; see SPEC §1 for the table of shapes.

    Raises:
        TypeError: an argument has the wrong type (non-float array, non-integer positions).
        ValueError: wrong ndim or shape, dim not divisible by G, N > 256, a bad position
            map, or an unknown alignment.
    """
    u, delta, A = _as_array(u, "u"), _as_array(delta, "delta"), _as_array(A, "A")
    B, C = _as_array(B, "B"), _as_array(C, "C")
    D, z, delta_bias = _as_array(D, "D"), _as_array(z, "z"), _as_array(delta_bias, "delta_bias")
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, M), got ndim {u.ndim}")
    batch, dim, length = u.shape
    _check_shape(delta, "delta", u.shape, "(batch, dim, M) like u")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) with dim={dim}, got {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= 256:
        raise ValueError(f"A must have 1 <= N <= 256 state columns, got N={dstate}")
    B, B_grouped = _grouped(B, "B", batch, dim, dstate, length)
    C, C_grouped = _grouped(C, "C", batch, dim, dstate, length)
    _check_shape(D, "D", (dim,), "(dim,)")
    _check_shape(z, "z", u.shape, "(batch, dim, M) like u")
    _check_shape(delta_bias, "delta_bias", (dim,), "(dim,)")
    for name, flag in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if positions is not None and not isinstance(positions, np.ndarray):
        positions = host_array(positions)
    positions, seqlen_rows = validate_positions(positions, batch=batch, length=length, seqlen=seqlen)
    return ScanArgs(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state),
                    positions, seqlen_rows, alignment, B_grouped, C_grouped)
