"""The one backend registry: every way to run the scan, what device it takes, why it cannot
run here (probed once, cached), how it views an array, and which one a call gets.

    get(name)                  the entry (ValueError naming the known ones)
    resolve(requested, device) the backend a call runs on: ``requested``, else the
                               environment variable ALIGNSCAN_BACKEND (validated, named in
                               its errors), else the first default entry for the device
    available_backends()       {name: None if it can run here, else why not}

Entries are registered in order of preference, every backend declared in this one table,
"torch" (the op's autograd twin in ``bridges``) included: its probe looks for torch without
importing it, so the entry exists without ``bridges`` and nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from alignscan.reference.positions import GapCoefficients

__all__ = ["Backend", "BackendUnavailable", "ENV_BACKEND", "register", "get", "names", "resolve",
           "available_backends", "device_coefficients"]

ENV_BACKEND = "ALIGNSCAN_BACKEND"


class BackendUnavailable(RuntimeError):
    """The asked backend cannot run on this machine; the message says why."""


@dataclass
class Backend:
    """One way to run the scan.

    name: what ``backend=`` takes. device: "cpu", "cuda" or "any" (the arrays it takes).
    purpose: one line for people choosing. module: the module with ``forward(args, coefs,
    ...)`` / ``backward(dout, args, coefs, ...)``, or None (torch runs its own code).
    probe: () -> None if it can run here, else the reason. view: a zero-copy view of an
    array (DLPack or CUDA array interface) as this backend's array type. to_device: a host
    NumPy array copied to the backend's device. default: chosen by device when nothing asks.
    timed: worth timing at real shapes (False: a correctness backend, slow by design).
    """

    name: str
    device: str
    purpose: str
    module: Optional[str]
    probe: Callable[[], Optional[str]]
    view: Callable[[Any], Any]
    to_device: Callable[[np.ndarray], Any] = staticmethod(lambda a: a)
    default: bool = True
    timed: bool = True
    _reason: Any = field(default=..., repr=False)

    def reason(self):
        """None when this backend can run here, else why not (probed once)."""
        if self._reason is ...:
            self._reason = self.probe()
        return self._reason

    def takes(self, device_type):
        return self.device == "any" or self.device == device_type

    def kernels(self):
        """The kernel module; BackendUnavailable with the reason when it cannot run here."""
        reason = self.reason()
        if reason is not None:
            raise BackendUnavailable(f"backend {self.name!r} cannot run here: {reason}")
        if self.module is None:
            raise ValueError(f"backend {self.name!r} runs torch tensors through bridges.selective_scan_fn; "
                             f"cuda_kernels takes the kernel backends {names(kernels_only=True)}")
        return importlib.import_module(self.module)


_REGISTRY: dict[str, Backend] = {}


def register(backend):
    """Add (or replace) an entry; entries keep their order of preference."""
    _REGISTRY[backend.name] = backend
    return backend


def names(kernels_only=False):
    return tuple(n for n, b in _REGISTRY.items() if b.module is not None or not kernels_only)


def get(name, kernels_only=False, what="backend"):
    """The entry called ``name``; ValueError naming ``what`` and the known names otherwise."""
    known = names(kernels_only)
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"{what} must be one of {known}, got {name!r}")
    return _REGISTRY[name]


def resolve(requested, device_type, kernels_only=False, host_copies=False):
    """The backend name a call on ``device_type`` ("cpu" or "cuda") runs on.

    ``requested`` (an argument) wins; else $ALIGNSCAN_BACKEND; else the first entry marked
    default that takes the device and can run here. ``host_copies``: a GPU backend asked
    for by name may take host (NumPy) arrays and copy them (the NumPy front door).

    Raises:
        ValueError: an unknown name (naming the argument or the variable), or a backend
            that does not take this device's arrays.
        BackendUnavailable: the backend cannot run here (with the reason).
    """
    if requested is not None:
        entry = get(requested, kernels_only)
        prefix = ""
    elif os.environ.get(ENV_BACKEND):
        value = os.environ[ENV_BACKEND]
        entry = get(value, kernels_only, what=f"the environment variable {ENV_BACKEND} (set to {value!r})")
        prefix = f"{ENV_BACKEND}={value}: "
    else:
        for entry in _REGISTRY.values():
            if entry.default and entry.takes(device_type) and (kernels_only is False or entry.module) \
                    and entry.reason() is None:
                return entry.name
        raise BackendUnavailable(f"no backend can run {device_type} arrays here: "
                                 + "; ".join(f"{n}: {b.reason()}" for n, b in _REGISTRY.items() if b.takes(device_type)))
    if not (entry.takes(device_type) or (host_copies and device_type == "cpu")):
        raise ValueError(f"{prefix}backend {entry.name!r} cannot take {device_type} arrays: it needs "
                         f"{'CPU (NumPy)' if entry.device == 'cpu' else 'CUDA'} arrays")
    reason = entry.reason()
    if reason is not None:
        raise BackendUnavailable(f"{prefix}backend {entry.name!r} cannot run here: {reason}")
    return entry.name


def available_backends(kernels_only=True):
    """{backend name: None if it can run here, else the reason it cannot}."""
    return {n: _REGISTRY[n].reason() for n in names(kernels_only)}


def device_coefficients(entry, args, dtype):
    """The position map's ``GapCoefficients`` for ``args.alignment`` in ``dtype`` on the
    backend's device, or None (no map). A NumPy map is copied to a GPU once and the copy is
    kept on the map, so a map reused over many scans costs one transfer."""
    coefficients = args.coefficients(dtype)
    if coefficients is None or entry.device == "cpu":
        return coefficients
    key = (entry.name, args.alignment, np.dtype(dtype).name)
    cache = getattr(args.map, "device_cache", None)
    if cache is None:
        return GapCoefficients(*(entry.to_device(a) for a in coefficients))
    if key not in cache:
        cache[key] = GapCoefficients(*(entry.to_device(a) for a in coefficients))
    return cache[key]


# --- The kernel backends, in order of preference ------------------------------------------

def _numpy_view(x):
    return x if isinstance(x, np.ndarray) else np.from_dlpack(x)


def _cuda_reason():
    """None when numba.cuda sees a GPU (or its simulator is on), else why not."""
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - numba is a dependency
        return f"numba.cuda cannot be imported ({exc}); install the 'cuda' extra (numba-cuda)"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as exc:
        return f"no CUDA GPU found ({type(exc).__name__}: {str(exc)[:120]})"
    return "no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 for numba's slow simulator)"


def _cupy_reason():
    try:
        from . import cupy_raw
    except ImportError as exc:
        return f"the CuPy backend is not installed ({exc})"
    return cupy_raw.unavailable_reason()


def _cupy_view(x):
    import cupy
    return cupy.from_dlpack(x) if hasattr(x, "__dlpack__") else cupy.asarray(x)


def _cupy_to_device(a):
    import cupy
    return cupy.asarray(a)


def _numba_cuda_view(x):
    from numba import cuda
    return x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)


def _numba_cuda_to_device(a):
    from numba import cuda
    return cuda.to_device(a)


register(Backend("numba-cpu", "cpu", "the fast CPU kernels (numba, parallel over cores); default on the CPU",
                 "alignscan.cuda_kernels.cpu", lambda: None, _numpy_view))
register(Backend("cupy", "cuda", "scan.cu (CUDA C++, chunked block scan) through CuPy; default on a GPU",
                 "alignscan.cuda_kernels.cupy_raw", _cupy_reason, _cupy_view, _cupy_to_device))
register(Backend("numba-cuda", "cuda", "numba.cuda kernels (a thread per channel); runs under numba's simulator too",
                 "alignscan.cuda_kernels.numba_cuda", _cuda_reason, _numba_cuda_view, _numba_cuda_to_device))


def _emu_reason():
    from . import cuda_emu
    return cuda_emu.unavailable_reason()


register(Backend("cuda-emu", "cpu", "scan.cu, the kernel of 'cupy', run unmodified on the CPU (CUDA's execution model "
                 "emulated: threads, barriers, shared memory): tests and debugs the GPU kernel without a GPU; slow",
                 "alignscan.cuda_kernels.cuda_emu", _emu_reason, _numpy_view, default=False, timed=False))


def _torch_reason():
    """None when torch is installed, else why not. Found, never imported: cuda_kernels does
    not import torch (bridges imports this package, never the other way), and the entry is
    only ever used through bridges, which imports torch itself."""
    import importlib.util
    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):         # sys.modules["torch"] is None: blocked, as if absent
        found = False
    return None if found else "torch is not installed; install the 'torch' extra"


def _torch_view(t):
    return t


# Last: on a GPU it is the fallback after cupy and numba-cuda. It takes tensors on any device
# and has no kernel module: bridges.selective_scan_fn runs it as plain torch ops
# (bridges.selective_scan_ref), differentiated by autograd.
register(Backend("torch", "any", "plain torch ops differentiated by autograd (bridges.selective_scan_ref): the "
                 "op's twin that every kernel is tested beside, and the fallback on a GPU without cupy or "
                 "numba-cuda", None, _torch_reason, _torch_view))
