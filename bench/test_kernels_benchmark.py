"""pytest-benchmark: forward and forward+backward of numba-cpu and the reference at the ViM-S
layer shape (batch 8, dim 768, N 16, L 197), keep 1.0 / 0.7 / 0.5, every alignment.

    pytest bench --benchmark-only                       # all
    pytest bench --benchmark-only -k numba              # only the kernel
Not part of the test command (testpaths = tests): it takes minutes, mostly the reference.
"""
import numba
import numpy as np
import pytest

from bench.kernels import backend_fns
from bench.problems import vim_layer_problem

KEEP = (1.0, 0.7, 0.5)
ALIGN = ("prev", "self", "none")


@pytest.fixture(autouse=True)
def one_thread():
    """Ratios against the single-threaded NumPy reference: one numba thread."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def _problem(keep, alignment):
    p = vim_layer_problem(batch=8, keep_ratio=keep, alignment=alignment, dtype=np.float32)
    return p.kwargs(return_last_state=False), p.dout()


@pytest.mark.parametrize("alignment", ALIGN)
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("backend", ["numba-cpu", "reference"])
def test_forward(benchmark, backend, keep, alignment):
    kw, _ = _problem(keep, alignment)
    fwd, _ = backend_fns(backend)
    fwd(**kw)
    rounds = 3 if backend == "reference" else 20
    benchmark.group = f"forward {alignment}"
    benchmark.pedantic(lambda: fwd(**kw), rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("alignment", ALIGN)
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("backend", ["numba-cpu", "reference"])
def test_forward_backward(benchmark, backend, keep, alignment):
    kw, dout = _problem(keep, alignment)
    fwd, bwd = backend_fns(backend)
    rounds = 2 if backend == "reference" else 10
    benchmark.group = f"forward+backward {alignment}"
    benchmark.pedantic(lambda: (fwd(**kw), bwd(dout, **kw)), rounds=rounds, warmup_rounds=1)
