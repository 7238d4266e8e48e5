"""The CuPy backend: scan.cu compiles for sm_80 and sm_90 with nvcc, every instance (float,
double, __half, __nv_bfloat16), without register spills for those that compute in float;
with a GPU, long sequences and the ViM-S layer match the reference (marked
gpu, skipped otherwise). Drawn problems on every backend: tests/conformance; scan.cu on the
CPU: test_cuda_emu.py."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.cuda_kernels import cupy_raw
from alignscan.testing import make_problem, vim_layer_problem
from tests.kernels.equivalence import check_backward, check_forward
from tests.kernels.half import HALVES, check_half_backward, check_half_forward, half_scan

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
        if any(t in name for t in ("IfE", "I6__halfE", "I13__nv_bfloat16E")):   # those computing in float
            assert spills.startswith("0 bytes"), f"{name}: {spills}"


def _toolkit_include():
    """The CUDA toolkit's include folder (cuda_fp16.h, cuda_bf16.h), or None."""
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), NVCC and str(Path(NVCC).resolve().parents[1]),
             "/usr/local/cuda"]
    return next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_bf16.h").is_file()), None)


def _nvrtc_reason():
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError as exc:
        return f"cuda.bindings.nvrtc is not installed ({exc})"
    if _toolkit_include() is None:
        return "no CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h) found ($CUDA_PATH, $CUDA_HOME, nvcc's, /usr/local/cuda)"
    return None


@pytest.mark.skipif(_nvrtc_reason() is not None, reason=str(_nvrtc_reason()))
def test_nvrtc_compiles_every_instance_with_hardware_half_conversions():
    """As cupy.RawModule does: NVRTC, cupy_raw.COMPILE_OPTIONS, the instances by name. The
    half instances narrow with the rounding conversions (cvt.rn.f16.f32, cvt.rn.bf16.f32) and
    widen float16 with cvt.f32.f16 (bfloat16 widens by a shift)."""
    from cuda.bindings import nvrtc
    include = _toolkit_include()
    err, prog = nvrtc.nvrtcCreateProgram(cupy_raw.SOURCE.read_bytes(), b"scan.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    for name in cupy_raw.kernel_names():
        nvrtc.nvrtcAddNameExpression(prog, name.encode())
    options = [o.encode() for o in cupy_raw.COMPILE_OPTIONS] + [b"--gpu-architecture=compute_80", f"-I{include}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    # NVRTC writes into the buffer it is given: a bytearray. Into bytes it would change an
    # immutable object (b" " * 1 is the interpreter's one-byte singleton, which then breaks
    # every later user of b" ", torch.save included).
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, bytes(log).decode()[-4000:]
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = bytearray(size)
    nvrtc.nvrtcGetPTX(prog, ptx)
    ptx = bytes(ptx).decode()
    assert ptx.count(".entry") == len(cupy_raw.kernel_names())
    for conversion in ("cvt.rn.f16.f32", "cvt.rn.bf16.f32", "cvt.f32.f16"):
        assert conversion in ptx, conversion


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
@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("storage", HALVES)
def test_cupy_reads_half_inputs(storage, alignment):
    """float16, bfloat16 (bits) inputs over several chunks: results in their dtype, at the
    table's rows against the reference on the same half values."""
    import cupy
    rng = np.random.default_rng(11)
    positions = np.stack([np.sort(rng.choice(1400, 1000, replace=False)) for _ in range(2)])
    p = make_problem(rng, batch=2, dim=8, dstate=16, length=1000, groups=2, positions=positions, seqlen=1400,
                     alignment=alignment, dtype=np.float32)
    h = half_scan(p, storage)
    host = lambda xs: tuple(None if x is None else cupy.asnumpy(x) for x in xs)
    check_half_forward(h, lambda params: host(cupy_raw.forward(params)))
    check_half_backward(h, lambda dout, params: host(cupy_raw.backward(dout, params)))


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
