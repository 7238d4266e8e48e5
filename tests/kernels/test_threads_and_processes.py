"""The package as installed is thread-safe and fork-safe: numba's TBB threading layer is
chosen; eight Python threads calling the kernels at once get bit-identical results; a torch
DataLoader forking two workers after the parent used the op completes, as does a spawn pool.
Each case runs in a fresh interpreter with a timeout (a fork under OpenMP hangs or kills
its workers)."""
import subprocess
import sys
import textwrap

import pytest

from tests import REPO

PROBLEM = """
import numpy as np, torch, numba
from alignscan import cuda_kernels as K
from alignscan.testing import make_problem
from alignscan.bridges import selective_scan_fn
p = make_problem(np.random.default_rng(0), batch=2, dim=64, dstate=8, length=40, dtype=np.float32,
                 positions=np.sort(np.random.default_rng(1).choice(60, 40, replace=False)), seqlen=60,
                 return_last_state=False)
tensors = [torch.from_numpy(getattr(p, n)) for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
op = lambda: selective_scan_fn(*tensors, True, positions=torch.from_numpy(p.positions), seqlen=60).sum().item()
"""


def _run(body, timeout=240):
    script = textwrap.dedent(PROBLEM) + textwrap.dedent(body)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout


def test_the_threading_layer_is_tbb_after_a_parallel_call():
    out = _run("""
        numba.set_num_threads(2)
        op()
        print(numba.threading_layer())
    """)
    assert out.strip().splitlines()[-1] == "tbb"


def test_eight_threads_calling_at_once_get_bit_identical_results():
    out = _run("""
        from concurrent.futures import ThreadPoolExecutor
        numba.set_num_threads(2)
        kw = p.kwargs()
        dout = p.dout()
        def work(_):
            return [(K.selective_scan_fwd(**kw), K.selective_scan_bwd(dout, **kw)) for _ in range(25)]
        with ThreadPoolExecutor(8) as pool:
            results = [r for chunk in pool.map(work, range(8)) for r in chunk]
        out0, grads0 = results[0]
        for out, grads in results[1:]:
            assert np.array_equal(out, out0)
            for g, g0 in zip(grads, grads0):
                assert g is None or np.array_equal(g, g0)
        print("identical", len(results))
    """)
    assert "identical 200" in out


def test_a_fork_dataloader_after_the_parent_used_the_op_completes():
    out = _run("""
        numba.set_num_threads(2)
        expected = op()                      # the parent uses the op (and its thread pool) first
        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                return torch.tensor(op())
        loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="fork")
        values = torch.cat(list(loader))
        assert torch.equal(values, torch.full((8,), expected)), values
        print("fork ok")
    """, timeout=180)
    assert "fork ok" in out


def test_a_spawn_pool_completes():
    out = _run("""
        import multiprocessing as mp
        from tests.kernels.test_threads_and_processes import spawn_work
        numba.set_num_threads(2)
        expected = op()
        with mp.get_context("spawn").Pool(2) as pool:
            values = pool.map(spawn_work, range(4))
        assert all(abs(v - expected) <= 1e-3 * abs(expected) for v in values), (values, expected)
        print("spawn ok")
    """, timeout=240)
    assert "spawn ok" in out


def spawn_work(_):
    """Runs in a spawned worker: a fresh interpreter imports the package and calls the op."""
    import numpy as np
    import torch

    from alignscan.bridges import selective_scan_fn
    from alignscan.testing import make_problem
    p = make_problem(np.random.default_rng(0), batch=2, dim=64, dstate=8, length=40, dtype=np.float32,
                     positions=np.sort(np.random.default_rng(1).choice(60, 40, replace=False)), seqlen=60,
                     return_last_state=False)
    tensors = [torch.from_numpy(getattr(p, n)) for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    return selective_scan_fn(*tensors, True, positions=torch.from_numpy(p.positions), seqlen=60).sum().item()


@pytest.mark.parametrize("layer", ["omp"])
def test_the_layer_the_package_avoids_does_break_forked_workers(layer):
    """Why TBB: with numba's OpenMP layer the same fork kills the workers (documented here
    so that the tests above can fail: they would under this layer)."""
    script = textwrap.dedent(PROBLEM) + textwrap.dedent("""
        numba.set_num_threads(2)
        op()
        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.tensor(op())
        loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="fork",
                                             timeout=60)
        list(loader)
        print("completed")
    """)
    try:
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "NUMBA_THREADING_LAYER": layer})
    except subprocess.TimeoutExpired:
        return                                 # hung: broken, as expected
    if "no OpenMP" in run.stderr or "threading layer" in run.stderr and "not available" in run.stderr:
        pytest.skip(f"numba's {layer} layer is not available here")
    assert run.returncode != 0 and "completed" not in run.stdout
