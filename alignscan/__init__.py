"""alignscan — token pruning in vision state space models: the selective scan with a position map.

One import name for the whole project. Its packages, one floor each, imports pointing down:

    alignscan.reference      the truth: the scan in float64 NumPy, position maps, importance (no torch)
    alignscan.cuda_kernels   the fast kernels behind one front door and one registry (no torch)
    alignscan.bridges        torch meets the kernels: the op, its autograd twin, TorchPositionMap
    alignscan.models         ViM and PlainMamba with token pruning, checkpoints, FLOPs
    alignscan.bench          kernel and model measurement (the main job: alignscan bench)
    alignscan.science        the zero-shot experiments that put the alignment on trial
    alignscan.imagenet       evaluate and fine-tune on ImageNet-style folders (torchrun)
    alignscan.cli            the command line: alignscan <command>, python -m alignscan <command>

bench, science and imagenet are siblings: none imports another. Beside the floors, small
modules any of them may use:

    alignscan.registry       one torch-free row of facts per model name
    alignscan.stats          exact paired tests, intervals, Holm's correction
    alignscan.runtime        threads and the machine facts every run record carries
    alignscan.outputs        atomic files and progress bars, for every program above
    alignscan.vision         torchvision and timm, imported so that they work beside a CPU torch
    alignscan.testing        scan problems for tests and benchmarks

The public API is reachable from here; it is imported on first use, so ``import alignscan``
(and ``alignscan.reference``) never imports torch:

    import alignscan
    alignscan.PositionMap(kept, seqlen)          # reference.PositionMap
    alignscan.selective_scan_fn(...)             # bridges.selective_scan_fn (drop-in for mamba_ssm's)
    alignscan.create("vim_small", pruning=...)   # models.create

The contract the code cites ("SPEC §n") is docs/SPEC.md.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "selective_scan": "alignscan.reference", "selective_scan_backward": "alignscan.reference",
    "PositionMap": "alignscan.reference", "ALIGNMENTS": "alignscan.reference", "METRICS": "alignscan.reference",
    "selective_scan_fwd": "alignscan.cuda_kernels", "selective_scan_bwd": "alignscan.cuda_kernels",
    "available_backends": "alignscan.cuda_kernels",
    "selective_scan_fn": "alignscan.bridges", "selective_scan_ref": "alignscan.bridges",
    "TorchPositionMap": "alignscan.bridges", "dense_kernel_adapter": "alignscan.bridges",
    "create": "alignscan.models", "PruningConfig": "alignscan.models", "paper_preset": "alignscan.models",
    "load_checkpoint": "alignscan.models", "flops": "alignscan.models",
}
_PACKAGES = ("reference", "cuda_kernels", "bridges", "models", "bench", "science", "imagenet", "registry",
             "stats", "runtime", "outputs", "testing", "vision", "cli")

__all__ = sorted(_PUBLIC) + list(_PACKAGES)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _PACKAGES:
        value = importlib.import_module(f"alignscan.{name}")
    else:
        raise AttributeError(f"module 'alignscan' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
