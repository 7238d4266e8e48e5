"""alignscan.bridges — torch meets the kernels.

    from bridges import selective_scan_fn          # drop-in for mamba_ssm's, plus positions=
    from bridges import selective_scan_ref         # the same op in plain torch (backend "torch")
    from bridges import dense_kernel_adapter       # any dense scan -> a position-map scan

``bridges.dlpack`` owns every tensor <-> array conversion (zero-copy through DLPack).
"""
from .adapter import dense_kernel_adapter
from .reference import selective_scan_ref
from .scan_op import BACKENDS, ENV_BACKEND, resolve_backend, selective_scan_fn

__all__ = ["selective_scan_fn", "selective_scan_ref", "dense_kernel_adapter", "resolve_backend", "BACKENDS",
           "ENV_BACKEND"]
