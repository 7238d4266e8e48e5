"""The one validator: every class of bad input raises the same exception class, with the
same message naming the same argument, on every public entry point: the reference
(forward and backward), the kernels' front door (forward and backward), the torch op on
each CPU backend, its torch twin and the dense-kernel adapter. None of them returns."""
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
