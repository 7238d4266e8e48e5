"""alignscan.bridges — torch meets the kernels.

    from alignscan.bridges import selective_scan_fn          # drop-in for mamba_ssm's, plus positions=
    from alignscan.bridges import selective_scan_ref         # the same op in plain torch (backend "torch")
    from alignscan.bridges import dense_kernel_adapter       # any dense scan -> a position-map scan
    from alignscan.bridges import TorchPositionMap           # a position map on the device, made once per stage

``bridges.dlpack`` owns every tensor <-> array conversion (zero-copy through DLPack). The
backend "torch" (``selective_scan_ref``, the op's autograd twin) is an entry of the one
registry, ``cuda_kernels.backends``, declared there like every other backend.
"""
from alignscan.cuda_kernels import backends as _backends

from .adapter import dense_kernel_adapter
from .positions import TorchPositionMap
from .reference import selective_scan_ref
from .scan_op import ENV_BACKEND, resolve_backend, selective_scan_fn

BACKENDS = _backends.names()

__all__ = ["selective_scan_fn", "selective_scan_ref", "dense_kernel_adapter", "TorchPositionMap", "resolve_backend",
           "BACKENDS", "ENV_BACKEND"]
