"""Every transform of the op, on every backend that takes CPU tensors, for every alignment:
torch.func's jvp, jacfwd, grad, jacrev, vmap and forward-over-reverse, torch.autograd's
forward mode and a double backward (create_graph=True), each in float64 against fourth-order
central finite differences (the tolerance table's "finite_difference" row) or, for vmap,
against the untransformed op. None of them may come back as zeros or fail with torch's
internal messages. And the scan with every token pruned: its gradients are empty (or zero
for A and delta_bias) on every backend, never a missing graph.
"""
import numpy as np
import pytest
import torch
from torch.autograd import forward_ad

from alignscan import reference as R
from alignscan.bridges import selective_scan_fn
from alignscan.cuda_kernels import backends
from tests.strategies import make_problem

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
BACKENDS = [name for name in backends.names() if backends.get(name).takes("cpu")]
STEP = 1e-3
FD = "finite_difference"


def _backend(name):
    reason = backends.get(name).reason()
    if reason is not None:
        pytest.skip(f"cannot run here: {reason}")
    return name


def _problem(seed=0, groups=None):
    """Two rows with gaps of several sizes and trailing steps, every optional input."""
    p = make_problem(np.random.default_rng(seed), batch=2, dim=2, dstate=2, length=4, groups=groups,
                     positions=np.array([[0, 1, 4, 6], [1, 2, 3, 7]]), seqlen=9)
    return tuple(torch.tensor(getattr(p, n)) for n in NAMES), torch.tensor(p.positions)


def _scan(backend, alignment, positions):
    return lambda *xs: selective_scan_fn(*xs, True, positions=positions, seqlen=9, alignment=alignment,
                                         backend=backend)


def _directional(f, xs, vs):
    """(d/dt) f(xs + t·vs) at t = 0 by fourth-order central differences."""
    at = lambda t: f(*(x + t * v for x, v in zip(xs, vs)))
    return (-at(2 * STEP) + 8 * at(STEP) - 8 * at(-STEP) + at(-2 * STEP)) / (12 * STEP)


def _tangents(xs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g, dtype=x.dtype) for x in xs)


def _close(actual, expected, what, key=FD):
    R.assert_within_tolerance(actual.detach().numpy(), expected.detach().numpy(), key, what)
    assert expected.abs().max() > 0, f"{what}: the expected derivative is zero, the check proves nothing"


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_equals_finite_differences(backend, alignment):
    f = _scan(_backend(backend), alignment, _problem()[1])
    xs = _problem()[0]
    vs = _tangents(xs)
    expected = _directional(f, xs, vs)
    _close(torch.func.jvp(f, xs, vs)[1], expected, "torch.func.jvp")
    with forward_ad.dual_level():
        out = f(*(forward_ad.make_dual(x, v) for x, v in zip(xs, vs)))
        _close(forward_ad.unpack_dual(out).tangent, expected, "forward_ad")
    for argnum in (1, 2):     # delta (softplus, the gaps' coefficients) and A (the decay)
        jac = torch.func.jacfwd(f, argnums=argnum)(*xs)
        v = vs[argnum]
        along = lambda x, i=argnum: f(*xs[:i], x, *xs[i + 1:])
        _close(torch.tensordot(jac, v, dims=v.dim()), _directional(along, (xs[argnum],), (v,)),
               f"torch.func.jacfwd in {NAMES[argnum]}")


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_mode_transforms_equal_finite_differences(backend, alignment):
    xs, positions = _problem(groups=2)
    f = _scan(_backend(backend), alignment, positions)
    w = _tangents(xs[:1], seed=2)[0]
    loss = lambda *ys: (f(*ys) * w).sum()
    vs = _tangents(xs)
    expected = _directional(loss, xs, vs)
    grads = torch.func.grad(loss, argnums=tuple(range(8)))(*xs)
    _close(sum((g * v).sum() for g, v in zip(grads, vs)), expected, "torch.func.grad")
    jac = torch.func.jacrev(f, argnums=1)(*xs)
    along = lambda x: f(xs[0], x, *xs[2:])
    _close(torch.tensordot(jac, vs[1], dims=3), _directional(along, (xs[1],), (vs[1],)), "torch.func.jacrev")


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_equal_finite_differences_of_the_gradient(backend, alignment):
    """A double backward and torch.func's forward-over-reverse against finite differences of
    the first gradient, which the backend's own backward computes."""
    xs, positions = _problem(seed=3)
    f = _scan(_backend(backend), alignment, positions)
    w, r = _tangents(xs[:2], seed=4)
    loss = lambda *ys: (f(*ys) ** 2 * w).sum()

    def gradient_along_r(*ys):      # the first-order gradient, by the backend's backward
        leaves = [y.detach().requires_grad_() for y in ys]
        return (torch.autograd.grad(loss(*leaves), leaves[0])[0] * r).sum()

    vs = _tangents(xs, seed=5)
    expected = _directional(gradient_along_r, xs, vs)
    leaves = [x.clone().requires_grad_() for x in xs]
    first = torch.autograd.grad(loss(*leaves), leaves[0], create_graph=True)[0]
    second = torch.autograd.grad((first * r).sum(), leaves)
    _close(sum((s * v).sum() for s, v in zip(second, vs)), expected, "double backward")
    grad_u = lambda *ys: torch.func.grad(loss)(*ys)
    _close((torch.func.jvp(grad_u, xs, vs)[1] * r).sum(), expected, "torch.func.jvp of torch.func.grad")


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_equals_the_op_called_per_sample(backend, alignment):
    """Over per-row inputs (one scan of V·batch rows), over A (one scan per sample), and
    vmap of grad (per-sample gradients)."""
    xs, positions = _problem(seed=6)
    f = _scan(_backend(backend), alignment, positions)
    for argnum, scale in ((0, -2.0), (2, 0.5)):
        stacked = torch.stack([xs[argnum], scale * xs[argnum]])
        got = torch.func.vmap(lambda x, i=argnum: f(*xs[:i], x, *xs[i + 1:]))(stacked)
        for k in range(2):
            expected = f(*xs[:argnum], stacked[k], *xs[argnum + 1:])
            _close(got[k], expected, f"vmap over {NAMES[argnum]}", key=np.float64)
    loss = lambda u: (f(u, *xs[1:]) ** 2).sum()
    stacked = torch.stack([xs[0], -xs[0]])
    per_sample = torch.func.vmap(torch.func.grad(loss))(stacked)
    for k in range(2):
        leaf = stacked[k].clone().requires_grad_()
        _close(per_sample[k], torch.autograd.grad(loss(leaf), leaf)[0], "vmap of grad", key=np.float64)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("mapped", [True, False], ids=["map", "no map"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_empty_scan_has_empty_gradients(backend, mapped, alignment):
    """Every token pruned (M = 0), no D or z: out is (batch, dim, 0) with a graph, and the
    gradients are empty (u, delta, B, C) or zero (A, delta_bias) on every backend."""
    p = make_problem(np.random.default_rng(0), batch=2, dim=3, dstate=4, length=0, D=False, z=False,
                     positions=np.zeros((2, 0), np.int64) if mapped else None, seqlen=9 if mapped else None,
                     alignment=alignment)
    leaves = {n: torch.tensor(getattr(p, n)).requires_grad_() for n in ("u", "delta", "A", "B", "C", "delta_bias")}
    out = selective_scan_fn(*(leaves[n] for n in ("u", "delta", "A", "B", "C")), delta_bias=leaves["delta_bias"],
                            delta_softplus=True, positions=None if p.positions is None else
                            torch.tensor(p.positions), seqlen=p.seqlen, alignment=alignment,
                            backend=_backend(backend))
    assert out.shape == (2, 3, 0)
    out.sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, name
        assert not leaf.grad.any(), name
