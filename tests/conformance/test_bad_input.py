"""The one validator: every class of bad input raises the same exception class, with the
same message naming the same argument, on every public entry point: the reference
(forward and backward), the kernels' front door (forward and backward), the torch op on
each CPU backend, its torch twin and the dense-kernel adapter. None of them returns."""
import re

import numpy as np
import pytest
import torch

from alignscan import bridges
from alignscan import cuda_kernels as K
from alignscan import reference as R
from tests.strategies import GRAD_NAMES, make_problem


def _problem():
    return make_problem(np.random.default_rng(0), batch=2, dim=4, dstate=3, length=5, groups=2,
                        positions=np.array([[0, 2, 3, 6, 8], [1, 2, 3, 4, 5]]), seqlen=9)


def _torch_call(fn):
    def call(**kw):
        ts = [torch.tensor(kw.pop(n)) if isinstance(kw.get(n), np.ndarray) else kw.pop(n) for n in GRAD_NAMES]
        if isinstance(kw.get("positions"), np.ndarray):
            kw["positions"] = torch.tensor(kw["positions"])
        return fn(*ts, **kw)
    return call


def _dout(kw):
    u = np.asarray(kw["u"])
    return np.zeros(u.shape if u.ndim == 3 else (2, 4, 5))


ENTRY_POINTS = {
    "reference.selective_scan": lambda **kw: R.selective_scan(**kw),
    "reference.selective_scan_backward": lambda **kw: R.selective_scan_backward(_dout(kw), **kw),
    "cuda_kernels.selective_scan_fwd": lambda **kw: K.selective_scan_fwd(**kw, backend="numba-cpu"),
    "cuda_kernels.selective_scan_bwd": lambda **kw: K.selective_scan_bwd(_dout(kw), **kw, backend="numba-cpu"),
    "selective_scan_fn (numba-cpu)": _torch_call(lambda *a, **k: bridges.selective_scan_fn(*a, backend="numba-cpu", **k)),
    "selective_scan_fn (torch)": _torch_call(lambda *a, **k: bridges.selective_scan_fn(*a, backend="torch", **k)),
    "selective_scan_ref": _torch_call(bridges.selective_scan_ref),
    "dense_kernel_adapter": _torch_call(bridges.dense_kernel_adapter(bridges.selective_scan_ref)),
}
if K.available_backends()["cuda-emu"] is None:          # scan.cu compiled for the CPU: the GPU kernel's checks
    ENTRY_POINTS["cuda_kernels.selective_scan_fwd (cuda-emu)"] = \
        lambda **kw: K.selective_scan_fwd(**kw, backend="cuda-emu")
    ENTRY_POINTS["cuda_kernels.selective_scan_bwd (cuda-emu)"] = \
        lambda **kw: K.selective_scan_bwd(_dout(kw), **kw, backend="cuda-emu")
    ENTRY_POINTS["selective_scan_fn (cuda-emu)"] = \
        _torch_call(lambda *a, **k: bridges.selective_scan_fn(*a, backend="cuda-emu", **k))
ENTRY_POINTS["selective_scan_fn (default backend)"] = _torch_call(bridges.selective_scan_fn)

BAD = [
    ("u ndim", dict(u=np.zeros((4, 5))), ValueError, "u must have shape"),
    ("delta shape", dict(delta=np.zeros((2, 4, 6))), ValueError, "delta"),
    ("A shape", dict(A=np.zeros((3, 3))), ValueError, "A"),
    ("A too many states", dict(A=np.zeros((4, 257))), ValueError, "A"),
    ("B ndim", dict(B=np.zeros((2, 3))), ValueError, "B"),
    ("C shape", dict(C=np.zeros((2, 2, 3, 4))), ValueError, "C"),
    ("dim not divisible by G", dict(B=np.zeros((2, 3, 3, 5))), ValueError, "divisible"),
    ("C with fewer groups than B", dict(C=np.zeros((2, 3, 5))), ValueError, "C must have the same number of groups"),
    ("C with more groups than B", dict(B=np.zeros((2, 1, 3, 5)), C=np.zeros((2, 2, 3, 5))), ValueError,
     "C must have the same number of groups as B \\(G=1\\)"),
    ("D shape", dict(D=np.zeros(5)), ValueError, "D"),
    ("z shape", dict(z=np.zeros((2, 4, 4))), ValueError, "z"),
    ("delta_bias shape", dict(delta_bias=np.zeros((4, 1))), ValueError, "delta_bias"),
    ("integer u", dict(u=np.zeros((2, 4, 5), dtype=np.int64)), TypeError, "u must be a float"),
    ("positions float", dict(positions=np.zeros((2, 5))), TypeError, "positions"),
    ("positions bool", dict(positions=np.ones((2, 5), bool)), TypeError, "positions"),
    ("positions unsorted", dict(positions=np.array([0, 5, 3, 6, 7])), ValueError, "increasing"),
    ("positions duplicate", dict(positions=np.array([0, 2, 2, 3, 4])), ValueError, "increasing"),
    ("positions negative", dict(positions=np.array([-1, 2, 3, 4, 5])), ValueError, ">= 0"),
    ("positions beyond seqlen", dict(positions=np.array([0, 2, 3, 4, 9])), ValueError, "seqlen=9"),
    ("seqlen below the last position", dict(seqlen=6), ValueError, "seqlen=6"),
    ("positions wrong length", dict(positions=np.array([0, 1, 2])), ValueError, "M=5"),
    ("positions wrong batch", dict(positions=np.zeros((3, 5), np.int64) + np.arange(5)), ValueError, "batch"),
    ("positions ndim", dict(positions=np.zeros((1, 2, 5), np.int64)), ValueError, "positions"),
    ("seqlen float", dict(seqlen=9.0), TypeError, "seqlen"),
    ("seqlen bool", dict(seqlen=True), TypeError, "seqlen"),
    ("seqlen negative", dict(seqlen=-1), ValueError, "seqlen"),
    ("seqlen too large", dict(seqlen=2**70), ValueError, "seqlen must be < 2\\*\\*62"),
    ("unknown alignment", dict(alignment="next"), ValueError, "alignment"),
    ("delta_softplus not a bool", dict(delta_softplus="yes"), TypeError, "delta_softplus must be a bool"),
    ("return_last_state not a bool", dict(return_last_state="no"), TypeError, "return_last_state must be a bool"),
]


@pytest.mark.parametrize("case,override,error,match", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_alike_by_every_entry_point(case, override, error, match):
    p = _problem()
    messages = {}
    for name, call in ENTRY_POINTS.items():
        with pytest.raises(error, match=match) as info:
            call(**p.kwargs(**override))
        messages[name] = str(info.value)
    positions_rule = case.startswith(("positions", "seqlen"))
    if positions_rule or case in ("unknown alignment", "delta_softplus not a bool", "return_last_state not a bool"):
        assert len(set(messages.values())) == 1, messages


def test_a_map_and_a_seqlen_together_are_rejected():
    p = _problem()
    with pytest.raises(ValueError, match="seqlen must be None when positions is a position map"):
        R.selective_scan(**p.kwargs(positions=R.PositionMap(p.positions, 9), seqlen=9))
    with pytest.raises(ValueError, match="seqlen must be None when positions is a position map"):
        ENTRY_POINTS["selective_scan_fn (numba-cpu)"](**p.kwargs(positions=bridges.TorchPositionMap(p.positions, 9),
                                                                 seqlen=9))


def test_tensors_on_another_device_are_rejected():
    p = _problem()
    with pytest.raises(ValueError, match="A is on meta"):
        ENTRY_POINTS["selective_scan_fn (numba-cpu)"](**p.kwargs(A=torch.zeros(4, 3, device="meta")))
    with pytest.raises(TypeError, match="B must be a torch.Tensor like u"):
        bridges.selective_scan_fn(*(torch.tensor(getattr(p, n)) if n != "B" else [[1.0]] for n in GRAD_NAMES))


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_batch_zero_with_explicit_positions_works(name):
    p = make_problem(np.random.default_rng(0), batch=0, dim=4, dstate=3, length=5,
                     positions=np.zeros((0, 5), np.int64), seqlen=9)
    ENTRY_POINTS[name](**p.kwargs())


# --- output arguments: one writability rule, at the front door, for every kernel backend ----

KERNEL_BACKENDS = K.backends.names(kernels_only=True)


def _read_only(kind, shape, tmp_path):
    """A read-only float64 array of ``shape``: a view of immutable bytes, a read-only
    memmap, or an array marked read-only. Returns (array, a check that nothing was written)."""
    size = int(np.prod(shape))
    if kind == "bytes":
        buffer = bytes(8 * size)
        return np.frombuffer(buffer, dtype=np.float64).reshape(shape), lambda: not any(buffer)
    if kind == "memmap":
        path = tmp_path / "out.bin"
        np.zeros(shape).tofile(path)
        return np.memmap(path, dtype=np.float64, mode="r", shape=shape), lambda: not np.fromfile(path).any()
    arr = np.zeros(shape)
    arr.flags.writeable = False
    return arr, lambda: not arr.any()


def _float64_problem():
    p = _problem()
    return p, {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
               for k, v in p.kwargs().items()}


@pytest.mark.parametrize("kind", ["bytes", "memmap", "flag"])
@pytest.mark.parametrize("argument", ["out", "last_state_out", "du", "ddelta", "dz"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_read_only_output_is_refused_by_name_on_every_backend(backend, argument, kind, tmp_path):
    reason = K.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"cannot run here: {reason}")
    p, kw = _float64_problem()
    shape = (2, 4, 3) if argument == "last_state_out" else (2, 4, 5)
    arr, untouched = _read_only(kind, shape, tmp_path)
    name = argument if argument in ("out", "last_state_out") else f"grads_out['{argument}']"
    with pytest.raises(ValueError, match=f"{re.escape(name)} must be a writeable array"):
        if argument in ("out", "last_state_out"):
            K.selective_scan_fwd(**kw, backend=backend, **{argument: arr})
        else:
            K.selective_scan_bwd(np.ones(shape), **kw, backend=backend, grads_out={argument: arr})
    assert untouched()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grads_out_takes_only_the_gradients_it_can_fill(backend):
    reason = K.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"cannot run here: {reason}")
    p, kw = _float64_problem()
    dout = np.ones((2, 4, 5))
    with pytest.raises(ValueError, match="grads_out may fill .* got the key 'dA'"):
        K.selective_scan_bwd(dout, **kw, backend=backend, grads_out={"dA": np.zeros((4, 3))})
    with pytest.raises(ValueError, match=r"grads_out\['dz'\] was given but z is None"):
        K.selective_scan_bwd(dout, **{**kw, "z": None}, backend=backend, grads_out={"dz": np.zeros((2, 4, 5))})
    with pytest.raises(TypeError, match="out must be an array"):
        K.selective_scan_fwd(**kw, backend=backend, out=[[0.0]])
    filled = {"du": np.zeros((2, 4, 5)), "ddelta": np.zeros((2, 4, 5)), "dz": np.zeros((2, 4, 5))}
    grads = K.selective_scan_bwd(dout, **kw, backend=backend, grads_out=filled)
    for i, key in ((0, "du"), (1, "ddelta"), (6, "dz")):
        assert grads[i] is filled[key] and filled[key].any(), key


class _DeviceArrayStub:
    """Stands for a CUDA array (CuPy, numba.cuda) where none can be made: the front door
    judges where an output lives by ``__cuda_array_interface__``."""
    shape, dtype = (2, 4, 5), np.dtype(np.float64)
    __cuda_array_interface__ = {}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_an_output_on_another_device_is_refused_by_name(backend):
    """A GPU backend would fill a copy of a host ``out`` and leave it as it was; a CPU
    backend cannot write a device array."""
    reason = K.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"cannot run here: {reason}")
    _, kw = _float64_problem()
    if K.backends.get(backend).device == "cuda":
        other, where = np.zeros((2, 4, 5)), "a CUDA device array"
    else:
        other, where = _DeviceArrayStub(), "a NumPy array"
    with pytest.raises(ValueError, match=f"out must be {where} for backend '{backend}'"):
        K.selective_scan_fwd(**kw, backend=backend, out=other)
    with pytest.raises(ValueError, match=re.escape(f"grads_out['du'] must be {where}")):
        K.selective_scan_bwd(np.ones((2, 4, 5)), **kw, backend=backend, grads_out={"du": other})


# --- TorchPositionMap judges what it is given as reference.PositionMap does ------------------

MAP_POSITIONS = np.array([[0, 2, 3, 6, 8], [1, 2, 4, 5, 7]])
MAP_CASES = [
    ("compose", [0, 2]), ("compose", [[0, 2]]), ("compose", [[0, 2], [1, 4]]), ("compose", np.zeros((2, 0), int)),
    ("compose", [0, 2, 1]), ("compose", [0, 2, 2]), ("compose", [0, 5]), ("compose", [-1, 2]),
    ("compose", [0.0, 1.0]), ("compose", [True, False]), ("compose", [[0, 1], [1, 2], [2, 3]]),
    ("compose", [[[0]]]), ("compose", 3),
    ("path", list(range(9))[::-1]), ("path", [0] * 9), ("path", list(range(8))), ("path", list(range(10))),
    ("path", [0, 1, 2, 3, 4, 5, 6, 8, 8]), ("path", [list(range(9))]), ("path", np.arange(9.0)), ("path", 5),
    ("new", [[0, 2, 3, 6, 8]]), ("new", [[0, 5, 3, 6, 8], [1, 2, 4, 5, 7]]), ("new", [[0, 2, 2, 6, 8]] * 2),
    ("new", [[-1, 2, 3, 6, 8]] * 2), ("new", [[0, 2, 3, 6, 9]] * 2), ("new", [[0.0, 1, 2, 3, 4]] * 2),
    ("new", [[0, 1, 2, 3, 4]] * 3), ("new", [0, 1, 2]),
]


def _numpy_map_call(kind, arg):
    if kind == "new":
        m = R.PositionMap(np.array(arg), 9, batch=2, length=5)
        return m.positions, m.seqlen_rows
    m = R.PositionMap(MAP_POSITIONS, 9)
    if kind == "compose":
        m = m.compose(np.array(arg))
        return m.positions, m.seqlen_rows
    index, m = m.path(np.array(arg))
    return index, m.positions, m.seqlen_rows


def _torch_map_call(kind, arg, as_tensor):
    arg = torch.tensor(np.array(arg)) if as_tensor else arg
    if kind == "new":
        m = bridges.TorchPositionMap(arg, 9, batch=2, length=5)
        return m.positions, m.seqlen_rows
    m = bridges.TorchPositionMap(torch.tensor(MAP_POSITIONS), 9)
    if kind == "compose":
        m = m.compose(arg)
        return m.positions, m.seqlen_rows
    index, m = m.path(arg)
    return index, m.positions, m.seqlen_rows


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "list"])
@pytest.mark.parametrize("kind,arg", MAP_CASES, ids=[f"{k}-{np.array(a).tolist()}" for k, a in MAP_CASES])
def test_torch_position_map_refuses_what_the_numpy_map_refuses(kind, arg, as_tensor):
    """The same cases, the same exception types and messages; where the NumPy map accepts,
    the same map (compose and path check a user's kept and order; a model's stay trusted)."""
    try:
        expected, error = _numpy_map_call(kind, arg), None
    except (ValueError, TypeError) as exc:
        expected, error = None, exc
    if error is not None:
        with pytest.raises(type(error)) as info:
            _torch_map_call(kind, arg, as_tensor)
        assert str(info.value) == str(error)
        return
    for got, want in zip(_torch_map_call(kind, arg, as_tensor), expected):
        np.testing.assert_array_equal(got.numpy(), want)


TORCH_ENTRY_POINTS = [name for name in ENTRY_POINTS if name.startswith(("selective_scan_fn", "selective_scan_ref",
                                                                           "dense_kernel_adapter"))]


@pytest.mark.parametrize("name", TORCH_ENTRY_POINTS)
def test_positions_on_another_device_are_refused_by_every_torch_entry_point(name):
    p = _problem()
    with pytest.raises(ValueError, match="positions is on meta but u is on cpu: every tensor must be on one device"):
        ENTRY_POINTS[name](**p.kwargs(positions=torch.tensor(p.positions, device="meta")))


@pytest.mark.parametrize("name", [n for n in ENTRY_POINTS if "backward" not in n and "_bwd" not in n])
def test_one_row_positions_cover_every_row_on_every_entry_point(name):
    """(1, M) positions broadcast over the batch, as (M,) positions and a one-row map do."""
    p = _problem()
    result = lambda r: np.asarray(r[0] if isinstance(r, tuple) else r.detach() if isinstance(r, torch.Tensor) else r)
    one_row = ENTRY_POINTS[name](**p.kwargs(positions=p.positions[:1]))
    shared = ENTRY_POINTS[name](**p.kwargs(positions=p.positions[0]))
    np.testing.assert_array_equal(result(one_row), result(shared))
