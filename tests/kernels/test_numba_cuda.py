"""numba-cuda: the simulator run (subprocess), a real type check for sm_80/sm_90 with
compile_ptx, and the same equivalence on a real GPU where there is one."""
import os
import subprocess
import sys

import numpy as np
import pytest

SIM_BUDGET_S = 300


def test_numba_cuda_kernels_match_reference_under_the_simulator(repo_root):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(repo_root / "tests" / "kernels" / "sim_cases.py")],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=SIM_BUDGET_S)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], tail


def _ptx_reason():
    try:
        from numba import cuda, types
        cuda.compile_ptx(lambda x: None, (types.float32[:],), cc=(8, 0))
    except Exception as exc:  # no NVVM/NVRTC here
        return f"numba cannot compile PTX on this machine ({type(exc).__name__}: {str(exc)[:200]})"
    return None


PTX_REASON = _ptx_reason()


@pytest.mark.skipif(PTX_REASON is not None, reason=PTX_REASON or "")
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
@pytest.mark.parametrize("dstate,per_group,dtype,storage", [(16, 768, "float32", None), (16, 768, "float64", None),
                                                            (256, 768, "float32", None), (4, 3, "float32", None),
                                                            (16, 768, "float32", "float16")])
def test_every_cuda_kernel_compiles_to_ptx(cc, dstate, per_group, dtype, storage):
    """A real type check (the simulator does none) of the specialisations launches use;
    float16 inputs are widened where they are read and results rounded to nearest even where
    they are written (cvt.f32.f16, cvt.rn.f16.f32), with no float16 arithmetic between."""
    from numba import cuda

    from alignscan.cuda_kernels import numba_cuda
    ch, tile = numba_cuda.launch_config(dstate, per_group)
    signatures = numba_cuda.kernel_signatures(dtype, storage)
    for name, fn in numba_cuda.kernel_functions(dstate, ch, tile, dtype).items():
        ptx, _ = cuda.compile_ptx(fn, signatures[name], cc=cc)
        assert ".entry" in ptx, name
        if dtype == "float32" and name in ("forward", "backward"):
            assert ".f64" not in ptx, f"{name} computes in float64 for float32 inputs"
        if storage == "float16" and name != "reduce_batch":
            if name != "reduce_blocks":
                assert "cvt.f32.f16" in ptx, f"{name} must read float16 inputs"
            assert "cvt.rn.f16.f32" in ptx, f"{name} must write float16 results, rounded to nearest even"
            assert not any(op in ptx for op in ("add.f16", "mul.f16", "fma.rn.f16")), f"{name} computes in float16"


def _gpu_reason():
    try:
        from numba import cuda
        return None if cuda.is_available() else "no CUDA GPU on this machine"
    except Exception as exc:
        return f"numba.cuda unavailable: {exc}"


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
@pytest.mark.parametrize("alignment", ["prev", "self", "none"])
def test_real_gpu_matches_reference(alignment):
    from alignscan import cuda_kernels as K
    from alignscan.testing import vim_layer_problem
    from tests.kernels.equivalence import check_backward, check_forward
    p = vim_layer_problem(batch=2, keep_ratio=0.7, alignment=alignment, dtype=np.float32)
    p.return_last_state = True
    check_forward(p, lambda **kw: K.selective_scan_fwd(**kw, backend="numba-cuda"))
    check_backward(p, lambda dout, **kw: K.selective_scan_bwd(dout, **kw, backend="numba-cuda"))
