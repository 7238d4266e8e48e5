"""scan.cu, the default GPU kernel, run unmodified on the CPU (backend "cuda-emu"): the same
equivalence to the reference as every backend, at chunks of 32 x 2 = 64 tokens so that short
sequences span several chunks (and once at the GPU's 128 x 4); mutants of the kernel that must
fail; and ThreadSanitizer on the real kernel, which must find no race."""
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.cuda_kernels import cuda_emu, scan_cu
from alignscan.cuda_kernels.params import ScanParams
from alignscan.testing import make_problem
from tests.kernels.equivalence import check_backward, check_forward

DRIVER = Path(__file__).with_name("emu_race_driver.cpp")
SMALL = dict(threads=32, items=2)               # chunks of 64 tokens
CHUNK = SMALL["threads"] * SMALL["items"]

pytestmark = pytest.mark.skipif(cuda_emu.unavailable_reason() is not None,
                                reason=f"cuda-emu cannot build here: {cuda_emu.unavailable_reason()}")


def emu(geometry):
    """(forward, backward) of scan.cu on the CPU at a chunk geometry, on NumPy problems."""
    def prepared(kw):
        args = R.validate_scan_args(**kw)
        return ScanParams.build(args, args.coefficients(R.compute_dtype(args.u.dtype)))

    def forward(**kw):
        return cuda_emu.forward(prepared(kw), **geometry)

    def backward(dout, **kw):
        return cuda_emu.backward(dout, prepared(kw), **geometry)
    return forward, backward


@st.composite
def chunked_problems(draw):
    """Pruned problems of M = 1 or of three to four chunks: a gap before the first token and
    after the last, gaps of every size, and one across every chunk boundary."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(1, 2))
    length = draw(st.sampled_from([1, 2 * CHUNK + 1, 3 * CHUNK - 1, 3 * CHUNK + 5]))
    rows = []
    for _ in range(batch):
        gap = rng.integers(1, 5, length)
        gap[np.arange(length) % CHUNK == 0] = rng.integers(2, 6)    # across every chunk boundary
        rows.append(int(rng.integers(1, 4)) + np.cumsum(gap) - gap[0])   # a gap before the first token
    positions = np.stack(rows)
    seqlen = int(positions.max()) + 1 + int(rng.integers(1, 6))      # and after the last
    groups = draw(st.sampled_from([None, 1, 2]))
    flags = {name: draw(st.booleans()) for name in ("D", "z", "delta_bias", "delta_softplus", "return_last_state")}
    return make_problem(rng, batch=batch, dim=2 * (groups or 1), dstate=draw(st.integers(1, 3)), length=length,
                        groups=groups, dtype=draw(st.sampled_from([np.float32, np.float64])), positions=positions,
                        seqlen=seqlen, alignment=draw(st.sampled_from(R.ALIGNMENTS)), style="chunked", **flags)


def test_the_backend_is_listed_and_can_run_here():
    assert K.available_backends()["cuda-emu"] is None
    assert "scan.cu" in K.backends.get("cuda-emu").purpose


@settings(max_examples=20)
@given(p=chunked_problems())
def test_forward_and_backward_over_several_chunks_match_the_reference(p):
    forward, backward = emu(SMALL)
    check_forward(p, forward)
    check_backward(p, backward)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_the_gpu_geometry_over_three_chunks(alignment):
    """128 threads x 4 items, as cupy compiles it: 1,529 tokens are three chunks."""
    rng = np.random.default_rng(7)
    m = 3 * scan_cu.THREADS * scan_cu.ITEMS - 7
    positions = np.sort(rng.choice(m + 300, m, replace=False))[None] + 2
    p = make_problem(rng, batch=1, dim=2, dstate=2, length=m, positions=positions, seqlen=m + 310,
                     alignment=alignment, dtype=np.float32)
    check_forward(p, lambda **kw: K.selective_scan_fwd(**kw, backend="cuda-emu"))
    check_backward(p, lambda dout, **kw: K.selective_scan_bwd(dout, **kw, backend="cuda-emu"))


def _mutant(tmp_path, old, new):
    """A copy of scan.cu with one piece of text replaced (which must occur exactly once)."""
    source = scan_cu.SOURCE.read_text()
    assert source.count(old) == 1, f"the mutation target must occur once in scan.cu: {old!r}"
    path = tmp_path / "scan_mutant.cu"
    path.write_text(source.replace(old, new))
    return path


BLOCK_SCAN_COMPOSE = "if (rank >= off) { b = a * pb + b; a = a * pa; }"
BLOCK_SCAN_BARRIER = "    s_a[rank] = a;\n    s_b[rank] = b;\n    __syncthreads();\n    for (int off = 1;"


def test_a_block_scan_missing_a_composition_term_fails_the_forward_check(tmp_path):
    mutant = _mutant(tmp_path, BLOCK_SCAN_COMPOSE, "if (rank >= off) { b = pb + b; a = a * pa; }")
    rng = np.random.default_rng(3)
    p = make_problem(rng, batch=1, dim=2, dstate=2, length=3 * CHUNK, positions=np.arange(3 * CHUNK) * 2,
                     seqlen=6 * CHUNK, dtype=np.float64)
    check_forward(p, emu(SMALL)[0])           # the real kernel passes ...
    with pytest.raises(AssertionError, match="over tolerance"):
        check_forward(p, emu(dict(SMALL, source=mutant))[0])     # ... the mutant does not


def _thread_sanitizer_reason():
    probe = Path(tempfile.mkdtemp()) / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    run = subprocess.run([cuda_emu.compiler(), "-fsanitize=thread", str(probe), "-o", str(probe.with_suffix(""))],
                         capture_output=True, text=True)
    return None if run.returncode == 0 else f"the compiler cannot build with -fsanitize=thread: {run.stderr[-300:]}"


TSAN_REASON = _thread_sanitizer_reason() if cuda_emu.unavailable_reason() is None else "no compiler"
tsan = pytest.mark.skipif(TSAN_REASON is not None, reason=str(TSAN_REASON))


def _run_under_thread_sanitizer(source):
    exe = cuda_emu.build(source=source, sanitize="thread", driver=DRIVER, **SMALL)
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=0 exitcode=66"}
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)


@tsan
def test_the_real_kernel_runs_clean_under_thread_sanitizer():
    """A multi-chunk forward and backward of scan.cu, every option on, "hold" included."""
    run = _run_under_thread_sanitizer(scan_cu.SOURCE)
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.startswith("checksum")


DB_PARTIAL = "if (valid[j]) dB_part[prow + first + j] = d_own * dl[j] * uv[j];"
# The order-dependent sum, as mamba_ssm's backward does it: every channel of a group
# atomically adds into one accumulator, in whatever order the blocks run.
DB_ATOMIC = ("if (valid[j]) atomicAdd(&dB_part[(((long)b * dim + g * (dim / groups)) * dstate + n) * length "
             "+ first + j], d_own * dl[j] * uv[j]);")


def _gradient_bits(p, seeds, monkeypatch, source=scan_cu.SOURCE):
    """The backward's outputs as bytes, once per shuffle seed (block and thread start order)."""
    _, backward = emu(dict(SMALL, source=source))
    runs = []
    for seed in seeds:
        monkeypatch.setenv("ALIGNSCAN_EMU_SHUFFLE_SEED", str(seed))
        runs.append(tuple(None if g is None else np.ascontiguousarray(g).tobytes()
                          for g in backward(p.dout(), **p.kwargs())))
    return runs


def _many_channels(alignment):
    rng = np.random.default_rng(11)
    m = 2 * CHUNK + 3
    positions = np.sort(rng.choice(m + 40, m, replace=False))[None]
    return make_problem(rng, batch=1, dim=8, dstate=3, length=m, groups=2, positions=positions, seqlen=m + 45,
                        alignment=alignment, dtype=np.float32)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_gradients_are_bit_identical_whatever_order_the_blocks_run_in(alignment, monkeypatch):
    """20 runs, each with the blocks (channels) and the threads started in another order: the
    same bits every time (dB, dC: per-channel partials summed in a fixed order, no atomics);
    and the reference still agrees."""
    p = _many_channels(alignment)
    runs = _gradient_bits(p, range(20), monkeypatch)
    assert all(run == runs[0] for run in runs), "a gradient changed with the launch order"
    check_backward(p, emu(SMALL)[1])


def test_an_order_dependent_sum_is_caught(tmp_path, monkeypatch):
    """The mutation to that atomicAdd: within tolerance, but not the same bits."""
    mutant = _mutant(tmp_path, DB_PARTIAL, DB_ATOMIC)
    p = _many_channels("prev")
    runs = _gradient_bits(p, range(20), monkeypatch, source=mutant)
    assert any(run[3] != runs[0][3] for run in runs), "the shuffled launch order must change the atomic sum's bits"
    check_backward(p, emu(dict(SMALL, source=mutant))[1])     # still correct to tolerance: only the bits move


@tsan
def test_a_missing_barrier_is_reported_by_thread_sanitizer(tmp_path):
    mutant = _mutant(tmp_path, BLOCK_SCAN_BARRIER, "    s_a[rank] = a;\n    s_b[rank] = b;\n    for (int off = 1;")
    run = _run_under_thread_sanitizer(mutant)
    assert run.returncode == 66 and "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-2000:]
    assert "block_scan" in run.stderr


def test_builds_are_cached_and_a_read_only_cache_falls_back_to_a_temporary_directory(tmp_path, repo_root):
    assert cuda_emu.build(**SMALL) == cuda_emu.build(**SMALL)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so no cache directory can be made below it")
    script = textwrap.dedent("""
        import numpy as np
        from alignscan import cuda_kernels as K, reference as R
        from alignscan.testing import make_problem
        from alignscan.cuda_kernels import cuda_emu
        p = make_problem(np.random.default_rng(0), batch=1, dim=2, dstate=2, length=5, dtype=np.float32)
        out = K.selective_scan_fwd(**p.kwargs(return_last_state=False), backend="cuda-emu")
        assert R.within_tolerance(out, R.selective_scan(**p.kwargs(return_last_state=False)), np.float32)
        print(cuda_emu.cache_dir())
    """)
    env = {**os.environ, "ALIGNSCAN_CACHE_DIR": str(blocked / "cache"), "XDG_CACHE_HOME": str(blocked / "xdg"),
           "HOME": str(blocked / "home")}
    run = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "alignscan-cuda-emu-" in run.stdout, "a temporary directory must take the build"


def test_no_compiler_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in cuda_emu.unavailable_reason()
