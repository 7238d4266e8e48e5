"""float16 and bfloat16 through the torch op: out in u's dtype, each gradient in its input's
dtype, against the float64 reference on the same half values at the tolerance table's rows,
every alignment; on the CUDA backends' kernel (scan.cu, run by cuda-emu) no input-sized
copy at all, counted with torch.profiler; the fake implementations agree with the real
ones (torch.library.opcheck)."""
import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.bridges import TorchPositionMap, selective_scan_fn
from alignscan.testing import make_problem
from tests.bridges.helpers import GRAD_NAMES

STREAMED = ("u", "delta", "B", "C", "z")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
EMU_REASON = K.available_backends()["cuda-emu"]
emu = pytest.mark.skipif(EMU_REASON is not None, reason=f"cuda-emu cannot run here: {EMU_REASON}")


def _problem(alignment="hold", length=70, seed=0):
    """Gaps before the first token, inside, and after the last; groups; every option on."""
    rng = np.random.default_rng(seed)
    positions = np.stack([np.sort(rng.choice(length + 25, length, replace=False)) + 1 for _ in range(2)])
    return make_problem(rng, batch=2, dim=4, dstate=3, length=length, groups=2, positions=positions,
                        seqlen=length + 30, alignment=alignment, dtype=np.float32)


def _leaves(p, half):
    """The problem as leaf tensors: u, delta, B, C, z in ``half``; A, D, delta_bias float32
    parameters, as mamba_ssm keeps them."""
    ts = {}
    for name in GRAD_NAMES:
        t = torch.tensor(getattr(p, name))
        ts[name] = (t.to(half) if name in STREAMED else t).requires_grad_()
    return ts


def _tolerance(dtype):
    return {torch.float16: np.float16, torch.bfloat16: "bfloat16", torch.float32: np.float32}[dtype]


def _as64(t):
    return t.detach().double().cpu().numpy()


CUDA = torch.cuda.is_available()
GPU_BACKENDS = [b for b in ("cupy", "numba-cuda") if CUDA and K.available_backends()[b] is None]
gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA GPU with cupy or numba-cuda")]
BACKENDS = [pytest.param("cuda-emu", marks=emu), "numba-cpu"] + [pytest.param(b, marks=gpu) for b in
                                                                 ("cupy", "numba-cuda")]


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", list(HALF))
def test_half_inputs_match_the_reference_in_their_own_dtypes(half, backend, alignment):
    if backend in ("cupy", "numba-cuda") and backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} cannot run here")
    p = _problem(alignment)
    device = "cuda" if backend in ("cupy", "numba-cuda") else "cpu"
    ts = {n: t.detach().to(device).requires_grad_() for n, t in _leaves(p, HALF[half]).items()}
    position_map = TorchPositionMap(torch.tensor(p.positions, device=device), p.seqlen)
    out, last = selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, True, positions=position_map,
                                  alignment=alignment, backend=backend)
    dout = torch.tensor(p.dout()).to(HALF[half]).to(device)
    out.backward(dout)
    assert out.dtype == HALF[half] and last.dtype == torch.float32
    values = {n: _as64(t) for n, t in ts.items()}         # the half values the op was given
    kw = p.kwargs(**values)
    ref_out, ref_last = R.selective_scan(**kw)
    R.assert_within_tolerance(_as64(out), ref_out, _tolerance(out.dtype), f"out ({backend})")
    R.assert_within_tolerance(_as64(last), ref_last, np.float32, f"last_state ({backend})")
    expected = dict(zip(GRAD_NAMES, R.selective_scan_backward(_as64(dout), **kw)))
    for name, t in ts.items():
        assert t.grad.dtype == t.dtype, f"d{name} must be {t.dtype}, got {t.grad.dtype}"
        R.assert_within_tolerance(_as64(t.grad), expected[name], _tolerance(t.dtype), f"d{name} ({backend})")


def _input_sized_copies(backend, half):
    """The aten copies (``_to_copy``, ``copy_``) of input-sized tensors in one profiled forward
    and backward, after a warm-up call: [(op, shapes, dtypes)]."""
    p = _problem(length=37)
    ts = _leaves(p, HALF[half])
    position_map = TorchPositionMap(torch.tensor(p.positions), p.seqlen)    # once per pruning stage, as a model
    call = lambda: selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, positions=position_map, alignment="hold",
                                     backend=backend)
    dout = torch.tensor(p.dout()).to(HALF[half])
    call().backward(dout)
    sizes = {tuple(ts[n].shape) for n in STREAMED}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call().backward(dout)
    return [(e.name, e.input_shapes, e.input_dtypes) for e in prof.events()
            if e.name in ("aten::_to_copy", "aten::copy_") and e.input_shapes and tuple(e.input_shapes[0]) in sizes]


@emu
@pytest.mark.parametrize("half", list(HALF))
def test_scan_cu_reads_half_inputs_without_a_copy(half):
    """scan.cu (cuda-emu, as cupy on a GPU) reads u, delta, B, C, z and dout in place and
    writes out, du, ddelta, dz, dB, dC in their dtype: not one input-sized copy in a forward
    and backward, to float32 or back."""
    copies = _input_sized_copies("cuda-emu", half)
    assert copies == [], f"input-sized copies made for {half} inputs: {copies}"


def test_the_count_sees_the_copies_of_a_backend_that_converts():
    """numba-cpu computes half inputs in float32 copies: the same count finds them (u, delta,
    B, C, z in the forward; those and dout in the backward), so the zero above is measured."""
    copies = _input_sized_copies("numba-cpu", "bfloat16")
    to_float = [c for c in copies if c[0] == "aten::copy_" and c[2][:2] == ["float", "c10::BFloat16"]]
    assert len(to_float) == 11, copies


@emu
@pytest.mark.parametrize("half", list(HALF))
def test_the_fake_implementations_agree_with_the_kernels(half):
    """torch.library.opcheck on both custom ops with half inputs: fake outputs' dtypes and
    shapes are the real ones' (out in u's dtype, each gradient in its input's)."""
    p = _problem(length=9)
    ts = {n: t.detach() for n, t in _leaves(p, HALF[half]).items()}
    coefs = TorchPositionMap(torch.tensor(p.positions), p.seqlen).coefficients("hold", torch.float32)
    inputs = (*(ts[n] for n in GRAD_NAMES), *coefs)
    torch.library.opcheck(torch.ops.alignscan.selective_scan_fwd.default, (*inputs, True, True, "hold", "cuda-emu"),
                          test_utils=("test_schema", "test_faketensor"))
    dout = torch.tensor(p.dout()).to(HALF[half])
    torch.library.opcheck(torch.ops.alignscan.selective_scan_bwd.default, (dout, *inputs, True, "hold", "cuda-emu"),
                          test_utils=("test_schema", "test_faketensor"))


@emu
def test_mixed_dtypes_are_computed_on_the_values_given():
    """u, B, C, z in bfloat16 but delta in float32 (mamba_ssm refuses this; the contract takes
    it): the kernel reads every input as float32, converted exactly, so nothing the caller gave
    is rounded; out comes back in u's dtype and each gradient in its input's."""
    p = _problem("prev", length=20)
    ts = _leaves(p, torch.bfloat16)
    ts["delta"] = torch.tensor(p.delta).requires_grad_()
    out = selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, positions=torch.tensor(p.positions), seqlen=p.seqlen,
                            backend="cuda-emu")
    dout = torch.tensor(p.dout()).to(torch.bfloat16)
    out.backward(dout)
    assert out.dtype == torch.bfloat16
    kw = p.kwargs(**{n: _as64(t) for n, t in ts.items()}, return_last_state=False)
    R.assert_within_tolerance(_as64(out), R.selective_scan(**kw), "bfloat16", "out")
    expected = dict(zip(GRAD_NAMES, R.selective_scan_backward(_as64(dout), **kw)))
    for name, t in ts.items():
        assert t.grad.dtype == t.dtype, name
        R.assert_within_tolerance(_as64(t.grad), expected[name], _tolerance(t.dtype), f"d{name}")
