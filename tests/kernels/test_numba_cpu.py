"""numba-cpu beyond the conformance suite (tests/conformance): the benchmark shape in float32,
huge gaps, sequences longer than a tile, empty input, determinism across thread counts,
read-only caches."""
import os
import shutil
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.testing import make_problem, vim_layer_problem
from tests.kernels.equivalence import check_backward, check_forward


def fwd(**kw):
    return K.selective_scan_fwd(**kw, backend="numba-cpu")


def bwd(dout, **kw):
    return K.selective_scan_bwd(dout, **kw, backend="numba-cpu")


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_vim_layer_shape_float32_matches_reference(alignment):
    """The benchmark shape (one ViM-S layer, 197 tokens, keep 0.7), float32 vs float64."""
    p = vim_layer_problem(batch=2, keep_ratio=0.7, alignment=alignment, dtype=np.float32)
    p.return_last_state = True
    check_forward(p, fwd)
    check_backward(p, bwd)


def test_huge_gaps_cost_nothing():
    """The gap is fused: positions a billion apart finish as fast as contiguous ones."""
    rng = np.random.default_rng(3)
    p = make_problem(rng, batch=2, dim=4, dstate=3, length=5, positions=np.arange(5) * 10**9 + 7,
                     seqlen=5 * 10**9 + 11, delta_softplus=False)
    p.delta = np.full_like(p.delta, 1e-10)    # keep exp(E·A) away from zero over such gaps
    check_forward(p, fwd)
    check_backward(p, bwd)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hold_gaps_on_both_sides_of_the_direct_sum(dtype):
    """"hold" sums a gap of up to HOLD_DIRECT_STEPS steps term by term and a longer one in
    closed form: gaps of 1, 7, 8, 9 and 30 steps, a leading gap and trailing steps, forward,
    last state and gradients against the reference."""
    from alignscan.cuda_kernels._numba_support import HOLD_DIRECT_STEPS
    gaps = [3, 1, HOLD_DIRECT_STEPS - 1, HOLD_DIRECT_STEPS, HOLD_DIRECT_STEPS + 1, 30, 1]
    positions = np.cumsum(gaps) - 1
    p = make_problem(np.random.default_rng(11), batch=2, dim=40, dstate=5, length=positions.size, dtype=dtype,
                     positions=positions, seqlen=int(positions[-1]) + 12, alignment="hold", delta_softplus=False)
    p.delta = (p.delta * 0.1).astype(dtype)      # slow decay: the held inputs still count after 30 steps
    check_forward(p, fwd)
    check_backward(p, bwd)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_sequences_longer_than_a_tile(alignment):
    """More tokens than one tile (the forward's) and chunk (the backward's) of CHUNK tokens,
    with a gap of 1-3 steps right before every tile's first token (where the kernels read the
    previous tile's last token) and gaps of every length up to 12 elsewhere; 36 channels (a
    full block and a partial one); float32 forward, last state and gradients."""
    from alignscan.cuda_kernels.cpu import CHUNK
    rng = np.random.default_rng(5)
    length = 2 * CHUNK + 9
    gaps = rng.integers(1, 13, length)
    gaps[np.arange(length) % CHUNK == 0] = rng.integers(2, 5, 3)
    positions = np.cumsum(gaps) - 1
    p = make_problem(rng, batch=2, dim=36, dstate=3, length=length, dtype=np.float32, positions=positions,
                     seqlen=int(positions[-1]) + 4, alignment=alignment)
    p.return_last_state = True
    check_forward(p, fwd)
    check_backward(p, bwd)


def test_empty_sequence():
    p = make_problem(np.random.default_rng(0), batch=2, dim=4, dstate=3, length=0,
                     positions=np.zeros((2, 0), np.int64), seqlen=5)
    out, last = fwd(**p.kwargs())
    assert out.shape == (2, 4, 0) and last.shape == (2, 4, 3) and not last.any()
    grads = bwd(p.dout(), **p.kwargs())
    assert grads[0].shape == (2, 4, 0) and not grads[2].any() and grads[3].shape == p.B.shape


def test_backward_is_deterministic_across_thread_counts():
    p = vim_layer_problem(batch=4, dim=96, keep_ratio=0.7, dtype=np.float32)
    dout = p.dout()
    results = []
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        try:
            for _ in range(2):
                results.append(bwd(dout, **p.kwargs()))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            if a is not None:
                np.testing.assert_array_equal(a, b)


def test_front_door_validates_once_with_the_reference_validator():
    p = make_problem(np.random.default_rng(0), batch=1, dim=2, dstate=2, length=3)
    with pytest.raises(ValueError, match="increasing"):
        fwd(**p.kwargs(positions=np.array([0, 2, 1])))
    with pytest.raises(ValueError, match="backend"):
        K.selective_scan_fwd(**p.kwargs(), backend="numba-gpu")
    with pytest.raises(ValueError, match="dout"):
        bwd(np.zeros((1, 2, 4)), **p.kwargs())


def test_available_backends_explains_what_cannot_run():
    status = K.available_backends()
    assert set(status) == set(K.BACKENDS) and status["numba-cpu"] is None
    for name, reason in status.items():
        assert reason is None or len(reason) > 10, name


def _copy_package(repo_root, root, packages):
    """A copy of the checkout's alignscan package with only ``packages`` below it, at
    ``root``/alignscan (real files, no links), to import with PYTHONPATH=root."""
    (root / "alignscan").mkdir()
    for module in ("__init__.py", "testing.py"):
        shutil.copy(repo_root / "alignscan" / module, root / "alignscan" / module)
    for pkg in packages:
        shutil.copytree(repo_root / pkg, root / "alignscan" / pkg, ignore=shutil.ignore_patterns("__pycache__"))


def test_read_only_cache_directory_still_works(tmp_path, repo_root):
    """No writable cache where numba looks (in-tree __pycache__, NUMBA_CACHE_DIR and the home
    cache all blocked): the kernels cache in the per-user fallback directory instead, saying
    so in one line; the first run says, in one line, that it compiles; the second run loads
    them from the fallback (no compile notice); the answers equal the reference."""
    _copy_package(repo_root, tmp_path, ("reference", "cuda_kernels"))
    (tmp_path / "alignscan" / "cuda_kernels" / "__pycache__").write_text("not a directory")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file, so nothing can be created below it")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    script = textwrap.dedent("""
        import numpy as np
        from alignscan import reference as R, cuda_kernels as K
        from alignscan.testing import make_problem
        p = make_problem(np.random.default_rng(0), batch=1, dim=2, dstate=2, length=4, dtype=np.float32)
        out = K.selective_scan_fwd(**p.kwargs(return_last_state=False))
        assert R.within_tolerance(out, R.selective_scan(**p.kwargs(return_last_state=False)), np.float32)
        print("ok")
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(blocker / "cache"), "PYTHONPATH": str(tmp_path),
           "HOME": str(blocker / "home"), "XDG_CACHE_HOME": str(blocker / "xdg"), "TMPDIR": str(temporary)}

    def run(**over):
        done = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", script], cwd=tmp_path,
                              env={**env, **over}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
        warnings = [line for line in done.stderr.splitlines() if "RuntimeWarning: alignscan:" in line]
        assert len(warnings) == 1, done.stderr[-3000:]
        return warnings[0], "compiling the CPU forward kernel once" in done.stderr

    warning, compiled = run()
    assert "cached in" in warning and str(temporary) in warning and compiled
    warning, compiled = run()
    assert "cached in" in warning and not compiled                    # loaded from the fallback cache
    assert any(temporary.glob("alignscan-numba-cache-*/**/*.nbi"))


def test_a_changed_helper_file_invalidates_the_cached_kernels(tmp_path, repo_root):
    """numba alone keeps a cached kernel until its own file changes; ours also recompile when
    a file they inline from (``_numba_support.py``) changes, so no stale kernel survives."""
    _copy_package(repo_root, tmp_path, ("reference", "cuda_kernels"))
    script = textwrap.dedent("""
        import numpy as np
        from alignscan.cuda_kernels import cpu
        cpu._ordered_sum(np.ones(3), 0.0)
        print("hits", sum(cpu._ordered_sum.stats.cache_hits.values()))
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache"), "PYTHONPATH": str(tmp_path)}

    def hits():
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout.split()[-1]

    assert hits() == "0"                      # compiled and cached
    assert hits() == "1"                      # loaded from the cache
    helper = tmp_path / "alignscan" / "cuda_kernels" / "_numba_support.py"
    helper.write_text(helper.read_text() + "\n# a change in a helper file\n")
    assert hits() == "0"                      # recompiled, not the stale kernel
