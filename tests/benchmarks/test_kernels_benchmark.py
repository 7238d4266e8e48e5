"""pytest-benchmark: forward and forward+backward of numba-cpu and the reference at the ViM-S
layer shape (batch 8, dim 768, N 16, L 197), keep 1.0 / 0.7 / 0.5, every alignment; and how
numba-cpu scales with threads (1 to all cores, batch 1 at L 4096 and batch 8 at L 197) and
with sequence length (197 to 65,536 tokens, every other token kept).

    pytest tests/benchmarks --benchmark-only                 # all
    pytest tests/benchmarks --benchmark-only -k numba        # only the kernel
    pytest tests/benchmarks --benchmark-only -k scaling      # threads and lengths
Skipped by the test command (tests/benchmarks/conftest.py) unless --benchmark-only is given:
it takes minutes, mostly the reference.
Peak memory per length is in ``alignscan kernels`` (each length in a fresh process).
"""
import numba
import numpy as np
import pytest

from alignscan import cuda_kernels as K
from alignscan.bench.kernels import backend_fns
from alignscan.bench.scaling import LENGTHS, THREAD_SHAPES
from alignscan.testing import make_problem, vim_layer_problem

KEEP = (1.0, 0.7, 0.5)
ALIGN = ("prev", "self", "none", "hold")
THREADS = tuple(range(1, numba.config.NUMBA_NUM_THREADS + 1))
PARTS = ("forward", "forward+backward")


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


# Rounds per part and backend: the reference is slow, a few rounds give its median.
ROUNDS = {("forward", "reference"): 3, ("forward", "numba-cpu"): 20, ("forward+backward", "reference"): 2,
          ("forward+backward", "numba-cpu"): 10}


@pytest.mark.parametrize("alignment", ALIGN)
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("backend", ["numba-cpu", "reference"])
@pytest.mark.parametrize("part", PARTS)
def test_kernel(benchmark, part, backend, keep, alignment):
    kw, dout = _problem(keep, alignment)
    fwd, bwd = backend_fns(backend)
    call = (lambda: fwd(**kw)) if part == "forward" else (lambda: (fwd(**kw), bwd(dout, **kw)))
    benchmark.group = f"{part} {alignment}"
    benchmark.pedantic(call, rounds=ROUNDS[(part, backend)], warmup_rounds=1)


def _scaling_call(part, batch, dim, length, positions=None, seqlen=None):
    p = make_problem(np.random.default_rng(0), batch=batch, dim=dim, dstate=16, length=length, dtype=np.float32,
                     positions=positions, seqlen=seqlen, return_last_state=False)
    kw, dout = p.kwargs(), p.dout()
    if part == "forward":
        return lambda: K.selective_scan_fwd(**kw)
    return lambda: (K.selective_scan_fwd(**kw), K.selective_scan_bwd(dout, **kw))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=lambda s: f"batch{s['batch']}-L{s['length']}")
@pytest.mark.parametrize("part", PARTS)
def test_scaling_threads(benchmark, part, shape, threads):
    call = _scaling_call(part, shape["batch"], shape["dim"], shape["length"])
    numba.set_num_threads(threads)            # the autouse fixture restores the count
    call()
    benchmark.group = f"scaling: {part}, batch {shape['batch']}, L {shape['length']}, by threads"
    benchmark.extra_info.update(threads=threads, **shape)
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("part", PARTS)
def test_scaling_length(benchmark, part, length):
    call = _scaling_call(part, 1, 64, length, positions=np.arange(length) * 2, seqlen=2 * length)
    call()
    benchmark.group = f"scaling: {part}, batch 1, dim 64, by tokens (divide by tokens for time per token)"
    benchmark.extra_info.update(tokens=length, threads=numba.get_num_threads())
    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
