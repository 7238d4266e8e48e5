"""One scan's contract for a kernel, derived once (as mamba_ssm's ``SSMParamsBase`` is).

The front doors (``cuda_kernels.selective_scan_fwd``/``bwd``, the torch op) validate the
arguments once (``reference.validate_scan_args``: ``ScanArgs``), take the position map's
``GapCoefficients`` for the alignment on the backend's device, and build one ``ScanParams``
from the two. Every backend reads its shapes, its flags and its inputs from it; no backend
re-derives a flag (``has_hold`` is "there is a map and the alignment is hold", here and
nowhere else).

The kernels take their inputs in one order, ``INPUTS``, with ``FLAGS`` after them: the
numba CPU kernels, numba.cuda's and scan.cu's (where the list is the ``SCAN_INPUTS`` macro
shared by the forward and the backward kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignscan.reference.arguments import compute_dtype, dtype_name

__all__ = ["ScanParams", "INPUTS", "FLAGS", "STREAMED", "HALF_DTYPES", "storage_dtype_name", "storage_numpy_dtype"]

# The kernels' inputs, in their order; absent optional ones reach a kernel as a dummy or null.
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coef_self", "coef_prev", "hold", "trailing")
# Its compile- or run-time switches, in their order.
FLAGS = ("use_softplus", "has_D", "has_z", "has_bias", "has_map", "has_hold")
# The inputs read token by token (with the backward's dout): stored in ``ScanParams.storage``.
# A, D, delta_bias and the map's coefficients are parameters in the compute dtype (mamba_ssm's
# weight_t), as are last_state and dA, dD, ddelta_bias.
STREAMED = ("u", "delta", "B", "C", "z")
# Input dtypes a kernel may read in place although it computes in float32 (SPEC §1, Precision).
HALF_DTYPES = ("float16", "bfloat16")


def storage_dtype_name(u, delta, B, C, z=None):
    """The dtype the streamed inputs are read in and out, du, ddelta, dz, dB, dC written in:
    u's when it is float16 or bfloat16 and delta, B, C (and z) share it, as mamba_ssm's kernel
    asks of them; else the compute dtype, to which a kernel then converts every input (an
    exact conversion: a mixed call is computed on the values it was given)."""
    name = dtype_name(u.dtype)
    if name in HALF_DTYPES and all(dtype_name(x.dtype) == name for x in (delta, B, C, z) if x is not None):
        return name
    return compute_dtype(u.dtype).name


def storage_numpy_dtype(name):
    """The NumPy dtype of arrays in storage dtype ``name``: bfloat16 travels as its bits,
    uint16 (NumPy and CuPy have no bfloat16; ``bridges.dlpack`` hands a bfloat16 tensor over
    as a uint16 view of the same memory)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


@dataclass(frozen=True)
class ScanParams:
    """The shapes, flags and inputs of one validated scan.

    Attributes:
        args: the validated ``ScanArgs`` (arrays as given, not yet converted).
        coefficients: the map's ``GapCoefficients`` (coef_self, coef_prev, hold, trailing) in
            the compute dtype on the backend's device, or None (no map).
        dtype: the compute dtype (float32 for float16/bfloat16/float32, float64 for float64).
        storage: the name of the dtype u, delta, B, C, z and dout are read in and out, du,
            ddelta, dz, dB, dC written in ("float16", "bfloat16", "float32" or "float64";
            ``storage_dtype_name``). A kernel that cannot read it converts to ``dtype``.
        batch, dim, length, dstate, groups: b, D, M, N, G.
        use_softplus, has_D, has_z, has_bias, has_map, has_hold, want_last: the flags.
    """

    args: object
    coefficients: object
    dtype: np.dtype
    storage: str
    batch: int
    dim: int
    length: int
    dstate: int
    groups: int
    use_softplus: bool
    has_D: bool
    has_z: bool
    has_bias: bool
    has_map: bool
    has_hold: bool
    want_last: bool

    @classmethod
    def build(cls, args, coefficients, storage=None):
        """The one place a scan's flags are derived from its arguments and its map.
        ``storage``: the storage dtype's name when the arrays do not show it (bfloat16 bits in
        uint16 arrays); None derives it from their dtypes (``storage_dtype_name``)."""
        batch, dim, length = (int(s) for s in args.u.shape)
        if storage is None:
            storage = storage_dtype_name(args.u, args.delta, args.B, args.C, args.z)
        return cls(args=args, coefficients=coefficients, dtype=np.dtype(compute_dtype(storage)), storage=storage,
                   batch=batch, dim=dim, length=length, dstate=int(args.dstate), groups=int(args.groups),
                   use_softplus=bool(args.delta_softplus), has_D=args.D is not None, has_z=args.z is not None,
                   has_bias=args.delta_bias is not None, has_map=coefficients is not None,
                   has_hold=coefficients is not None and args.alignment == "hold",
                   want_last=bool(args.return_last_state))

    @property
    def alignment(self):
        return self.args.alignment

    @property
    def per_group(self):
        """Channels per group of B and C (channel d uses group d // per_group)."""
        return self.dim // self.groups

    @property
    def storage_dtype(self):
        """The NumPy dtype of the streamed inputs and outputs as a kernel sees them
        (``storage_numpy_dtype``: uint16 bits for bfloat16)."""
        return storage_numpy_dtype(self.storage)

    def flags(self):
        """The flags in the kernels' order (``FLAGS``)."""
        return tuple(getattr(self, name) for name in FLAGS)

    def inputs(self, convert, absent):
        """The kernels' inputs in their order (``INPUTS``): ``convert(array, name)`` for each
        given one (to the backend's layout and device), ``absent(name)`` for each that is not
        (None for a null pointer, or a dummy array)."""
        a = self.args
        given = dict(u=a.u, delta=a.delta, A=a.A, B=a.B, C=a.C, D=a.D, z=a.z, delta_bias=a.delta_bias)
        coefs = self.coefficients
        for name, value in zip(INPUTS[8:], (None,) * 4 if coefs is None else tuple(coefs)):
            given[name] = value
        return tuple(absent(name) if given[name] is None else convert(given[name], name) for name in INPUTS)

    def grouped(self, dB, dC):
        """dB, dC (batch, G, N, M) in the layout B and C were given in ((batch, N, M) when
        ungrouped; G is then 1)."""
        ungroup = lambda x: x.reshape(x.shape[0], x.shape[2], x.shape[3])
        return (dB if self.args.B_grouped else ungroup(dB)), (dC if self.args.C_grouped else ungroup(dC))
