"""Every way to run the scan, as (forward, backward) callables on NumPy problems.

One entry per backend of the registry (``cuda_kernels.backends``) through each front door
that takes it: the NumPy front door (``cuda_kernels.selective_scan_fwd/bwd``) for kernel
backends, the torch op (``bridges.selective_scan_fn``) for every backend that takes CPU
tensors (gradients through autograd, i.e. the op's registered backward), and the
dense-kernel adapter. A backend that cannot run here is skipped with its reason.
"""
from __future__ import annotations

import numpy as np
import torch

from alignscan import bridges
from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.cuda_kernels import backends
from tests.strategies import GRAD_NAMES


def _kernel_runner(name):
    fwd = lambda **kw: K.selective_scan_fwd(**kw, backend=name)
    bwd = lambda dout, **kw: K.selective_scan_bwd(dout, **kw, backend=name)
    return fwd, bwd


def _torch_runner(fn):
    """(forward, backward) of a torch scan function on NumPy problems: inputs become CPU
    tensors, results NumPy; the backward is autograd's (the op's registered backward)."""

    def call(kw, requires_grad):
        kw = dict(kw)
        ts = {n: None if kw[n] is None else torch.tensor(kw.pop(n)).requires_grad_(requires_grad)
              for n in GRAD_NAMES}
        for n in GRAD_NAMES:
            kw.pop(n, None)
        if kw.get("positions") is not None:
            kw["positions"] = torch.tensor(kw["positions"])
        return ts, fn(*(ts[n] for n in GRAD_NAMES), **kw)

    def fwd(**kw):
        _, result = call(kw, False)
        if isinstance(result, tuple):
            return tuple(r.detach().numpy() for r in result)
        return result.detach().numpy()

    def bwd(dout, **kw):
        kw["return_last_state"] = False
        ts, out = call(kw, True)
        leaves = [n for n in GRAD_NAMES if ts[n] is not None]
        grads = torch.autograd.grad(out, [ts[n] for n in leaves], torch.tensor(dout), allow_unused=True)
        got = dict(zip(leaves, grads))
        return tuple(None if ts[n] is None else (np.zeros(ts[n].shape) if got[n] is None else got[n].numpy())
                     for n in GRAD_NAMES)

    return fwd, bwd


def runners():
    """[(id, reason it cannot run here or None, (forward, backward), alignments it supports,
    device it runs on)]. The dense-kernel adapter cannot express "hold" (SPEC §2 oracle 5)
    and says so."""
    out = []
    every = R.ALIGNMENTS
    for name in backends.names(kernels_only=True):
        entry = backends.get(name)
        out.append((f"{name} (front door)", entry.reason(), _kernel_runner(name), every, entry.device))
    for name in backends.names():
        entry = backends.get(name)
        if entry.takes("cpu"):
            op = lambda *a, name=name, **k: bridges.selective_scan_fn(*a, backend=name, **k)
            out.append((f"{name} (torch op)", entry.reason(), _torch_runner(op), every, "cpu"))
    out.append(("dense_kernel_adapter(selective_scan_ref)", None,
                _torch_runner(bridges.dense_kernel_adapter(bridges.selective_scan_ref)), ("prev", "self", "none"),
                "cpu"))
    return out
