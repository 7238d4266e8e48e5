"""The one argument check of the position-map selective scan (SPEC §1).

Every public entry point (the reference, the kernels' front door, the torch op, its torch
twin and the dense-kernel adapter) calls ``validate_scan_args`` once and hands on the clean
contract it returns: B and C grouped (batch, G, N, M) and the position map as a validated
``PositionMap`` (or None: no pruning, no trailing steps). Arrays are only inspected through
``shape``/``dtype``/``reshape``, so NumPy, CuPy, numba device arrays and torch tensors pass
through unchanged; a map is read on the host once, when it is made, never per call.

The compute dtype rule lives here too (``compute_dtype_name``): float64 computes in float64,
everything else (float16, bfloat16, float32) in float32 (SPEC §1, Precision).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .positions import ALIGNMENTS, PositionMap, check_seqlen

__all__ = ["ALIGNMENTS", "ScanArgs", "validate_scan_args", "host_array", "FLOAT_NAMES", "is_position_map",
           "dtype_name", "compute_dtype_name", "compute_dtype", "check_flag", "check_alignment"]

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def is_position_map(x):
    """True for the validated maps a scan accepts as ``positions``: ``reference.PositionMap``
    and its torch twin ``bridges.TorchPositionMap``. Both have ``batch``, ``length``,
    ``fit(batch, length)`` and ``coefficients(alignment, dtype)``."""
    return getattr(type(x), "is_position_map", False)


def dtype_name(dtype):
    """"float32", "bfloat16", "int64", ... for a NumPy, CuPy or torch dtype."""
    return str(dtype).rsplit(".", 1)[-1]


def compute_dtype_name(dtype):
    """The dtype a kernel computes and accumulates in for inputs of ``dtype`` (SPEC §1):
    "float64" for float64, "float32" for float16, bfloat16 and float32."""
    return "float64" if dtype_name(dtype) == "float64" else "float32"


def compute_dtype(dtype):
    """``compute_dtype_name`` as a NumPy dtype."""
    return np.dtype(compute_dtype_name(dtype))


def check_flag(name, value):
    """A bool argument: True/False (NumPy bools too), nothing else."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_alignment(alignment):
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    return alignment


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
    map: Any          # a validated position map fitted to (b, M), or None: no pruning
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

    @property
    def position_map(self):
        """The map, or the no-pruning map when none was given (NumPy maps only)."""
        return self.map if self.map is not None else PositionMap(None, batch=self.batch, length=self.length)

    @property
    def positions(self):
        """(b, M) int64 positions on the host."""
        return self.position_map.positions

    @property
    def seqlen_rows(self):
        return self.position_map.seqlen_rows

    def coefficients(self, dtype):
        """The map's ``GapCoefficients`` for this alignment in ``dtype``, or None (no map)."""
        return None if self.map is None else self.map.coefficients(self.alignment, dtype)

    @classmethod
    def unchecked(cls, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, position_map,
                  alignment):
        """Arguments that were validated already (by the public entry point that hands them
        on): only B and C are put in the grouped layout."""
        batch, _, length = u.shape
        dstate = A.shape[1]
        group = lambda x: x if x.ndim == 4 else x.reshape(batch, 1, dstate, length)
        return cls(u, delta, A, group(B), group(C), D, z, delta_bias, delta_softplus, return_last_state,
                   position_map, alignment, B.ndim == 4, C.ndim == 4)


def host_array(x):
    """A NumPy view or copy of an array that may live on a GPU (CuPy, numba.cuda, torch)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):   # torch
        return x.detach().cpu().numpy()
    if hasattr(x, "copy_to_host"):   # numba.cuda device array
        return x.copy_to_host()
    if hasattr(x, "get") and hasattr(x, "__cuda_array_interface__"):  # cupy
        return x.get()
    return np.asarray(x)


def _is_torch(x):
    """A torch tensor (duck-typed: the reference does not import torch, and torch.compile
    can trace this)."""
    return hasattr(x, "requires_grad") and hasattr(x, "device")


def _as_array(x, name, like=None):
    if x is None:
        return None
    if like is not None and _is_torch(like):
        if not _is_torch(x):
            raise TypeError(f"{name} must be a torch.Tensor like u, got {type(x).__name__}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but u is on {like.device}: every tensor must be on one device")
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    if dtype_name(x.dtype) not in FLOAT_NAMES:
        kind = "integer" if "int" in dtype_name(x.dtype) else dtype_name(x.dtype)
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 array, got {kind} ({x.dtype})")
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


def _position_map(positions, seqlen, batch, length, like):
    """The validated map of (positions, seqlen) for a (batch, M) scan, or None (no pruning)."""
    if is_position_map(positions):
        if _is_torch(like) and getattr(positions, "device", like.device) != like.device:
            raise ValueError(f"positions is on {positions.device} but u is on {like.device}: every tensor must be "
                             f"on one device")
        if seqlen is not None:
            raise ValueError("seqlen must be None when positions is a position map (the map holds it)")
        return positions.fit(batch, length)
    if positions is None and seqlen is None:
        return None
    if positions is not None and not isinstance(positions, np.ndarray):
        positions = host_array(positions)
    if seqlen is not None:
        seqlen = check_seqlen(seqlen)
    return PositionMap(positions, seqlen, batch=batch, length=length)


def validate_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
    """Check every argument of the scan once; see SPEC §1 for the table of shapes.

    ``positions`` may be raw integers ((batch, M) or (M,)) with ``seqlen``, or a validated
    position map (``reference.PositionMap`` or ``bridges.TorchPositionMap``), which is only
    fitted to the batch here.

    Raises:
        TypeError: an argument has the wrong type (non-float array, non-integer positions,
            a non-bool flag, a non-int or bool seqlen).
        ValueError: wrong ndim or shape, dim not divisible by G, B and C with different
            group counts, N > 256, a bad position map, tensors on several devices, or an
            unknown alignment.
    """
    u = _as_array(u, "u")
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, M), got ndim {u.ndim} (shape {tuple(u.shape)})")
    delta, A = _as_array(delta, "delta", u), _as_array(A, "A", u)
    B, C = _as_array(B, "B", u), _as_array(C, "C", u)
    D, z, delta_bias = _as_array(D, "D", u), _as_array(z, "z", u), _as_array(delta_bias, "delta_bias", u)
    batch, dim, length = u.shape
    _check_shape(delta, "delta", u.shape, "(batch, dim, M) like u")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) with dim={dim}, got {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= 256:
        raise ValueError(f"A must have 1 <= N <= 256 state columns, got N={dstate}")
    B, B_grouped = _grouped(B, "B", batch, dim, dstate, length)
    C, C_grouped = _grouped(C, "C", batch, dim, dstate, length)
    if C.shape[1] != B.shape[1]:
        # As mamba_ssm's kernels: one group count for B and C (channel d reads group
        # d // (dim / G) of both). Broadcasting one group over the other is not done silently.
        raise ValueError(f"C must have the same number of groups as B (G={B.shape[1]}), got G={C.shape[1]} "
                         f"(shape {tuple(C.shape) if C_grouped else tuple(C.shape[:1]) + tuple(C.shape[2:])})")
    _check_shape(D, "D", (dim,), "(dim,)")
    _check_shape(z, "z", u.shape, "(batch, dim, M) like u")
    _check_shape(delta_bias, "delta_bias", (dim,), "(dim,)")
    delta_softplus = check_flag("delta_softplus", delta_softplus)
    return_last_state = check_flag("return_last_state", return_last_state)
    alignment = check_alignment(alignment)
    position_map = _position_map(positions, seqlen, batch, length, u)
    return ScanArgs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                    position_map, alignment, B_grouped, C_grouped)
