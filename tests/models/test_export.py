"""An exported pruned model runs on any device: the graph holds the caller's backend request
("" for none), never a backend name that only one device can run; the op resolves it from
its tensors' device when it runs."""
import numpy as np
import pytest
import torch

from alignscan import models
from alignscan.cuda_kernels import backends
from alignscan.reference.tolerances import tolerance


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = models.create("vim_tiny", pruning=models.PruningConfig("align", (1,), 0.5), img_size=32, depth=2,
                          num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    return torch.export.export(model, (x,)), x, expected


def _scan_calls(program):
    return [node for node in program.graph.nodes
            if node.op == "call_function" and "alignscan" in str(node.target)]


def test_the_exported_graph_names_no_device_bound_backend(exported):
    program, _, _ = exported
    calls = _scan_calls(program)
    assert calls, "the scan op is in the graph"
    device_bound = {name for name in backends.names() if backends.get(name).device != "any"}
    constants = {a for node in program.graph.nodes for a in (*node.args, *node.kwargs.values()) if isinstance(a, str)}
    assert not constants & device_bound, constants & device_bound
    assert all(node.args[-1] == "" for node in calls)          # the request: none, resolved per call


def test_the_exported_program_runs_and_matches_the_eager_model(exported):
    program, x, expected = exported
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got, expected, **tolerance(np.float32))


def test_where_only_the_twin_runs_the_exported_program_still_runs_forward(exported, monkeypatch):
    """A device with no kernel backend (a GPU without CuPy or numba-cuda) resolves to the
    "torch" twin inside the op: shown here by making the CPU's choice "torch"."""
    program, x, expected = exported
    monkeypatch.setenv(backends.ENV_BACKEND, "torch")
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got, expected, **tolerance(np.float32))


def test_where_only_the_twin_runs_a_traced_backward_is_refused_by_name(monkeypatch):
    """The twin cannot be differentiated inside the op (autograd does not record there): a
    named NotImplementedError with the way out, never a wrong gradient."""
    import alignscan.bridges  # noqa: F401  (registers the op)
    u = torch.randn(1, 2, 3)
    A, B = -torch.rand(2, 4), torch.randn(1, 4, 3)
    monkeypatch.setenv(backends.ENV_BACKEND, "torch")
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        torch.ops.alignscan.selective_scan_bwd(torch.ones_like(u), u, u.clone(), A, B, B.clone(), None, None, None,
                                               None, None, None, None, False, "none", "")
