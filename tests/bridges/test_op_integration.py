"""Zero-copy, torch.compile, dtypes, layouts, empty input, bad input, and the GPU paths."""
import numpy as np
import pytest
import torch

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.bridges import TorchPositionMap, selective_scan_fn
from alignscan.testing import make_problem
from tests.bridges.helpers import GRAD_NAMES, run, tensors


def _problem(**kw):
    base = dict(batch=2, dim=4, dstate=3, length=6, groups=2, positions=np.array([[0, 2, 3, 7, 8, 12],
                                                                                  [1, 2, 3, 4, 5, 9]]), seqlen=14)
    base.update(kw)
    return make_problem(np.random.default_rng(0), **base)


def test_kernel_writes_into_torch_storage_and_reads_inputs_without_copies(monkeypatch):
    from alignscan.cuda_kernels import cpu
    p = _problem(dtype=np.float32)
    ts = tensors(p, requires_grad=False)
    seen = {}
    real = cpu.forward

    def spy(params, out=None, **kw):
        seen["u"], seen["out"], seen["coef_self"] = params.args.u, out, params.coefficients.coef_self
        return real(params, out=out, **kw)
    monkeypatch.setattr(cpu, "forward", spy)
    position_map = TorchPositionMap(torch.tensor(p.positions), 14)
    out = selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, positions=position_map)
    assert seen["u"].__array_interface__["data"][0] == ts["u"].data_ptr(), "contiguous u must reach the kernel uncopied"
    assert seen["out"].__array_interface__["data"][0] == out.data_ptr(), "the kernel must fill torch's own output"
    assert seen["coef_self"].__array_interface__["data"][0] == \
        position_map.coefficients("prev", torch.float32).coef_self.data_ptr(), "the map's tensors reach the kernel"


def test_torch_compile_fullgraph_forward_and_backward_equal_eager():
    torch.manual_seed(0)

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.A_log = torch.nn.Parameter(torch.rand(8, 4))
            self.D = torch.nn.Parameter(torch.randn(8))

        def forward(self, x, B, C, positions):
            u = self.proj(x.transpose(1, 2)).transpose(1, 2)
            return selective_scan_fn(u, x, -torch.exp(self.A_log), B, C, self.D, u, None, True,
                                     positions=positions, seqlen=20, alignment="prev")

    model = Mixer()
    x, B, C = torch.randn(2, 8, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    positions = torch.tensor([[0, 3, 4, 9, 10, 15], [1, 2, 5, 6, 11, 19]])
    eager = model(x, B, C, positions)
    eager.square().sum().backward()
    eager_grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x, B, C, positions)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager)
    for q, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(q.grad, g)


def test_non_contiguous_inputs():
    p = _problem()
    ts = tensors(p)
    # The same values, stored transposed: non-contiguous views.
    ts_nc = {n: (None if t is None else t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_())
             for n, t in ts.items()}
    assert not ts_nc["u"].is_contiguous()
    out, last, grads = run(selective_scan_fn, p, ts)
    out_nc, last_nc, grads_nc = run(selective_scan_fn, p, ts_nc)
    np.testing.assert_array_equal(out, out_nc)
    for name in grads:
        np.testing.assert_array_equal(grads[name].numpy(), grads_nc[name].numpy())


def test_inputs_without_grad_get_none_and_others_match():
    p = _problem()
    ts = tensors(p)
    for name in ("A", "B", "D"):
        ts[name].requires_grad_(False)
    out, _, grads = run(selective_scan_fn, p, ts)
    assert set(grads) == {"u", "delta", "C", "z", "delta_bias"}
    ref = dict(zip(GRAD_NAMES, R.selective_scan_backward(p.dout(), **p.kwargs())))
    for name, g in grads.items():
        R.assert_within_tolerance(g.numpy(), ref[name], np.float64, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32_and_return_out_in_their_dtype_last_state_in_float32(dtype):
    p = _problem(dtype=np.float32)
    ts = {n: (None if t is None else t.detach().to(dtype).requires_grad_()) for n, t in tensors(p).items()}
    out, last = selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, True, positions=torch.tensor(p.positions),
                                  seqlen=14)
    assert out.dtype == dtype
    assert last.dtype == torch.float32, "mamba_ssm returns last_state in float32 for half inputs"
    out.float().sum().backward()
    assert all(t.grad.dtype == dtype for t in ts.values() if t is not None)
    # Against the reference on the same (rounded) inputs, at the half-precision tolerance.
    rounded = {n: (None if t is None else t.detach().double().numpy()) for n, t in ts.items()}
    ref = R.selective_scan(**p.kwargs(**rounded, return_last_state=False))
    R.assert_within_tolerance(out.double().detach().numpy(), ref, "bfloat16" if dtype == torch.bfloat16
                              else np.float16, "out")


def test_empty_sequence():
    p = _problem(length=0, positions=np.zeros((2, 0), np.int64), seqlen=5)
    ts = tensors(p)
    out, last = selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, True, positions=torch.tensor(p.positions),
                                  seqlen=5)
    assert out.shape == (2, 4, 0) and not last.any()
    out.sum().backward()
    assert ts["A"].grad.shape == (4, 3) and not ts["A"].grad.any()


BAD = [
    ("positions not increasing", dict(positions=torch.tensor([0, 2, 2, 3, 4, 5])), ValueError, "increasing"),
    ("positions float", dict(positions=torch.zeros(6)), TypeError, "positions"),
    ("positions beyond seqlen", dict(positions=torch.tensor([0, 1, 2, 3, 4, 14])), ValueError, "seqlen"),
    ("alignment", dict(alignment="next"), ValueError, "alignment"),
    ("backend", dict(backend="triton"), ValueError, "backend"),
    ("cupy on cpu tensors", dict(backend="cupy"), ValueError, "CUDA"),
]


@pytest.mark.parametrize("case,override,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_keyword_input_is_rejected(case, override, error, match):
    p = _problem()
    ts = tensors(p)
    kw = dict(positions=torch.tensor(p.positions), seqlen=14)
    kw.update(override)
    with pytest.raises(error, match=match):
        selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, **kw)


def test_bad_tensor_input_is_rejected():
    p = _problem()
    ts = tensors(p)
    args = lambda **o: [o.get(n, ts[n]) for n in GRAD_NAMES]
    with pytest.raises(ValueError, match="delta"):
        selective_scan_fn(*args(delta=torch.zeros(2, 4, 5)))
    with pytest.raises(TypeError, match="u"):
        selective_scan_fn(*args(u=torch.zeros(2, 4, 6, dtype=torch.int64)))
    with pytest.raises(TypeError, match="B"):
        selective_scan_fn(*args(B=p.B))
    with pytest.raises(ValueError, match="divisible"):
        selective_scan_fn(*args(B=torch.zeros(2, 3, 3, 6)))
    with pytest.raises(ValueError, match="device"):
        selective_scan_fn(*args(A=torch.zeros(4, 3, device="meta")))


CUDA = torch.cuda.is_available()
GPU_BACKENDS = [b for b in ("cupy", "numba-cuda") if CUDA and K.available_backends()[b] is None]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA GPU with cupy or numba-cuda")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_cuda_op_matches_reference_and_respects_the_stream(backend, alignment):
    p = _problem(dtype=np.float32, alignment=alignment)
    ts = {n: (None if t is None else t.detach().cuda().requires_grad_()) for n, t in tensors(p).items()}
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out, last = selective_scan_fn(*(ts[n] for n in GRAD_NAMES), True, True,
                                      positions=torch.tensor(p.positions), seqlen=14, backend=backend)
        out.backward(torch.tensor(p.dout(), device="cuda"))
    stream.synchronize()
    ref_out, ref_last = R.selective_scan(**p.kwargs())
    R.assert_within_tolerance(out.detach().cpu().double().numpy(), ref_out, np.float32, "out")
    R.assert_within_tolerance(last.cpu().double().numpy(), ref_last, np.float32, "last_state")
    ref = dict(zip(GRAD_NAMES, R.selective_scan_backward(p.dout(), **p.kwargs())))
    for name in GRAD_NAMES:
        if ts[name] is not None:
            R.assert_within_tolerance(ts[name].grad.cpu().double().numpy(), ref[name], np.float32, f"d{name}")
