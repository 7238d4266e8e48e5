"""A guard that fails on any device-to-host transfer or host synchronisation a torch program
makes: ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, the truth value or the int/float
of a tensor, a tensor built from host (NumPy) data, and ops whose output shape depends on
the data (``nonzero``, ``masked_select``, ``unique``). On a GPU each of these waits for the
device; under ``torch.compile`` each is a graph break.

    with HostGuard():
        model(images)            # HostSyncError names the first offending call

Custom ops count as one call: what a kernel does inside its own implementation (a CPU
kernel reading its inputs through DLPack) is not a transfer of the model's.
"""
from __future__ import annotations

import numpy as np
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostGuard", "HostSyncError"]

_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__"}
_FROM_HOST = {"as_tensor", "tensor", "from_numpy", "asarray"}
_DATA_DEPENDENT = ("alignscan::validate_positions", "alignscan::compose_positions", "alignscan::check_path_order",
                   "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
                   "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                   "aten::equal", "aten::is_nonzero")


class HostSyncError(AssertionError):
    pass


class _FunctionGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _METHODS:
            raise HostSyncError(f"host synchronisation: Tensor.{name}() in a guarded forward")
        if name in _FROM_HOST and any(isinstance(a, (np.ndarray, list, tuple)) for a in args[:1]):
            raise HostSyncError(f"host-to-device copy: torch.{name}(<host data>) in a guarded forward")
        return func(*args, **kwargs)


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.split(".")[0] in _DATA_DEPENDENT:
            raise HostSyncError(f"host synchronisation: {name} (its result or shape depends on the data)")
        return func(*args, **(kwargs or {}))


class HostGuard:
    """Both guards at once (function level: methods and host data; dispatch level: ops)."""

    def __enter__(self):
        self._modes = [_FunctionGuard(), _DispatchGuard()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
