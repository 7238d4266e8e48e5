"""The CuPy backend: scan.cu compiles for sm_80 and sm_90 with nvcc, without register
spills for float; with a GPU, long sequences and the ViM-S layer match the reference (marked
gpu, skipped otherwise). Drawn problems on every backend: tests/conformance; scan.cu on the
CPU: test_cuda_emu.py."""
import re
import shutil
import subprocess

import numpy as np
import pytest

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.cuda_kernels import cupy_raw
from alignscan.testing import make_problem, vim_layer_problem
from tests.kernels.equivalence import check_backward, check_forward

NVCC = shutil.which("nvcc")


def _instantiation_unit(tmp_path):
    """A translation unit that includes scan.cu and instantiates exactly cupy_raw.kernel_names()."""
    refs = "\n".join(f"    (void)&{name};" for name in cupy_raw.kernel_names())
    unit = tmp_path / "instantiate.cu"
    unit.write_text(f'#include "{cupy_raw.SOURCE}"\nvoid alignscan_instantiate() {{\n{refs}\n}}\n')
    return unit


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile scan.cu here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_scan_cu_compiles_without_spills(tmp_path, arch):
    unit = _instantiation_unit(tmp_path)
    run = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-Xptxas", "-v", *cupy_raw.COMPILE_OPTIONS,
                          "-o", str(tmp_path / "scan.cubin"), str(unit)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = run.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(entries) == len(cupy_raw.kernel_names()), report
    # ptxas prints, per entry, "Function properties for <name>" then the spill line.
    for name, spills in re.findall(r"Function properties for (\w+)\n\s+\d+ bytes stack frame, (\d+ bytes spill stores)",
                                   report):
        if "IfE" in name:   # the float specialisations
            assert spills.startswith("0 bytes"), f"{name}: {spills}"


GPU_REASON = cupy_raw.unavailable_reason()
gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a CUDA GPU: {GPU_REASON}")


def fwd(**kw):
    return K.selective_scan_fwd(**kw, backend="cupy")


def bwd(dout, **kw):
    return K.selective_scan_bwd(dout, **kw, backend="cupy")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("seqlen", [197, 1000, 4096])
def test_cupy_long_sequences_span_several_chunks(alignment, seqlen):
    rng = np.random.default_rng(seqlen)
    m = int(seqlen * 0.7)
    positions = np.stack([np.sort(rng.choice(seqlen, m, replace=False)) for _ in range(2)])
    p = make_problem(rng, batch=2, dim=8, dstate=16, length=m, groups=2, positions=positions, seqlen=seqlen,
                     alignment=alignment, dtype=np.float32)
    check_forward(p, fwd)
    check_backward(p, bwd)


@pytest.mark.gpu
@gpu
def test_cupy_vim_layer_shape():
    p = vim_layer_problem(batch=2, keep_ratio=0.5, dtype=np.float32)
    check_forward(p, fwd)
    check_backward(p, bwd)


def test_without_a_gpu_the_skip_reason_says_no_gpu_was_found():
    reason = cupy_raw.unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is here: there is no skip reason to read")
    if "not installed" in reason:
        pytest.skip(reason)
    assert reason.startswith("no CUDA GPU found") and "insufficient" not in reason
