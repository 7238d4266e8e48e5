"""scan.cu, the default GPU kernel, run unmodified on the CPU (backend "cuda-emu"): the same
equivalence to the reference as every backend, at chunks of 32 x 2 = 64 tokens so that short
sequences span several chunks (and once at the GPU's 128 x 4); float16 and bfloat16 inputs
read in place (the emulated conversions bit for bit against NumPy's and torch's); buffers it
must write whole, a gap coefficient on token 0 and an exploding state; mutants of the kernel
that must fail; and ThreadSanitizer on the real kernel, which must find no race."""
import dataclasses
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
from alignscan.reference.positions import GapCoefficients
from alignscan.testing import make_problem
from tests.kernels.equivalence import check_backward, check_forward
from tests.kernels.half import HALVES, check_half_backward, check_half_forward, half_scan

DRIVER = Path(__file__).with_name("emu_race_driver.cpp")
HALF_DRIVER = Path(__file__).with_name("emu_half_driver.cpp")
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


BLOCK_SCAN_COMPOSE = "if (rank >= off) { b = advance_state(a, pb, b); a = a * pa; }"
BLOCK_SCAN_BARRIER = "    s_a[rank] = a;\n    s_b[rank] = b;\n    __syncthreads();\n    for (int off = 1;"


def test_a_block_scan_missing_a_composition_term_fails_the_forward_check(tmp_path):
    mutant = _mutant(tmp_path, BLOCK_SCAN_COMPOSE, "if (rank >= off) { b = advance_state(A(1), pb, b); a = a * pa; }")
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


class _ZeroedNumPy:
    """NumPy whose ``empty`` returns zeros: what an accumulator that is added into needs (as
    mamba_ssm zeroes dB before its atomicAdds); scan.cu's own buffers are written, not added to."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.zeros(shape, dtype)


def _emu_backward(source, xp=np):
    """backward(dout, **kwargs) of scan.cu (``source``) on the CPU, buffers from ``xp.empty``."""
    launch = cuda_emu.launcher(SMALL["threads"], SMALL["items"], source)

    def backward(dout, **kw):
        args = R.validate_scan_args(**kw)
        params = ScanParams.build(args, args.coefficients(R.compute_dtype(args.u.dtype)))
        return scan_cu.backward(dout, params, xp, launch, **SMALL)
    return backward


def _gradient_bits(p, seeds, monkeypatch, source=scan_cu.SOURCE, xp=np):
    """The backward's outputs as bytes, once per shuffle seed (block and thread start order)."""
    backward = _emu_backward(source, xp)
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
    """The mutation to that atomicAdd (into a zeroed accumulator, as it needs):
    within tolerance, but not the same bits."""
    mutant = _mutant(tmp_path, DB_PARTIAL, DB_ATOMIC)
    p = _many_channels("prev")
    runs = _gradient_bits(p, range(20), monkeypatch, source=mutant, xp=_ZeroedNumPy())
    assert any(run[3] != runs[0][3] for run in runs), "the shuffled launch order must change the atomic sum's bits"
    check_backward(p, _emu_backward(mutant, _ZeroedNumPy()))     # still correct to tolerance: only the bits move


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


# --- float16 and bfloat16 inputs -------------------------------------------------------------

def _conversion_values():
    """float32 values where rounding to float16 and bfloat16 can go wrong: every exact half and
    bfloat16 value, the midpoints between neighbours and one float32 ulp either side of them
    (ties to even, carries into the exponent, the largest finite values, the float16
    subnormals and underflow), ±0, ±inf, NaN, and 2^20 random float32 bit patterns."""
    with np.errstate(invalid="ignore"):     # the NaN patterns
        halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
        bf16 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    values = []
    for grid in (halves, bf16):
        finite = np.unique(grid[np.isfinite(grid)])
        mid = (finite[:-1] + finite[1:]) / 2
        values += [finite, mid]
    values.append(np.array([65504.0, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 2.0**-14, 3.3895313892515355e38]))
    exact = np.concatenate(values)
    exact = np.concatenate([exact, -exact]).astype(np.float32)    # the midpoints are exact in float32
    bits = exact.view(np.uint32)
    near = np.concatenate([bits, bits + 1, bits - 1]).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    random = np.random.default_rng(0).integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([near, specials, random])


def test_the_emulated_half_conversions_are_bit_exact(tmp_path):
    """__float2half_rn and __float2bfloat16_rn round to nearest even exactly as NumPy's float16
    and torch's bfloat16 casts do (NaN: any NaN), and __half2float, __bfloat162float widen all
    65,536 bit patterns exactly."""
    import torch
    exe = cuda_emu.build(driver=HALF_DRIVER, **SMALL)
    values = _conversion_values()
    values.tofile(tmp_path / "values")
    run = subprocess.run([str(exe), str(tmp_path / "values"), str(tmp_path / "narrowed"), str(tmp_path / "widened")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    narrowed = np.fromfile(tmp_path / "narrowed", np.uint16).reshape(-1, 2)
    widened = np.fromfile(tmp_path / "widened", np.float32).reshape(-1, 2)
    nan = np.isnan(values)
    with np.errstate(over="ignore"):
        want_half = values.astype(np.float16).view(np.uint16)
    want_bf16 = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
    for got, want, name in ((narrowed[:, 0], want_half, "__float2half_rn"), (narrowed[:, 1], want_bf16,
                                                                              "__float2bfloat16_rn")):
        wrong = np.flatnonzero((got != want) & ~nan)
        assert wrong.size == 0, f"{name}: {wrong.size} values rounded wrongly, e.g. {values[wrong[:3]]!r}: " \
                                f"{got[wrong[:3]]} vs {want[wrong[:3]]}"
        assert np.all(got[nan] == 0x7fff), f"{name}: a NaN must become the canonical NaN 0x7fff"
    patterns = np.arange(65536, dtype=np.uint32)
    exact_half = patterns.astype(np.uint16).view(np.float16).astype(np.float32)
    exact_bf16 = (patterns << 16).view(np.float32)
    for got, want, name in ((widened[:, 0], exact_half, "__half2float"), (widened[:, 1], exact_bf16,
                                                                          "__bfloat162float")):
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), f"{name}: {np.flatnonzero(~same)[:5]} widened wrongly"


def _half_problem(alignment, length=2 * CHUNK + 5, **kw):
    """A pruned problem over three chunks with every option on (z, D, delta_bias, softplus,
    groups, last_state): gaps before the first token, after the last, across chunk boundaries."""
    rng = np.random.default_rng(sum(map(ord, alignment)))
    positions = np.sort(rng.choice(length + 60, length, replace=False))[None] + 2
    base = dict(batch=1, dim=4, dstate=3, length=length, groups=2, positions=positions, seqlen=length + 70,
                alignment=alignment, dtype=np.float32)
    return make_problem(rng, **dict(base, **kw))


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("storage", HALVES)
def test_half_inputs_match_the_reference_forward_and_backward(storage, alignment):
    """u, delta, B, C, z, dout in float16 or bfloat16 (bits): out, du, ddelta, dz, dB, dC come
    back in that dtype and last_state, dA, dD, ddelta_bias in float32, each at its row of the
    tolerance table against the reference on the same half values."""
    h = half_scan(_half_problem(alignment), storage)
    check_half_forward(h, lambda params: cuda_emu.forward(params, **SMALL))
    check_half_backward(h, lambda dout, params: cuda_emu.backward(dout, params, **SMALL))


@pytest.mark.parametrize("storage", HALVES)
def test_half_inputs_are_read_in_place_by_the_half_instance(storage):
    """The kernels launched are scan.cu's __half / __nv_bfloat16 instances, and every streamed
    input they get is the caller's own memory: no float copy is made."""
    h = half_scan(_half_problem("hold", length=9), storage)
    seen = []
    real = cuda_emu.launcher(**SMALL)

    def spy(name, dtype, grid, block, params):
        seen.append((scan_cu.instance(name, dtype), params))
        real(name, dtype, grid, block, params)
    scan_cu.backward(h.dout, h.params, np, spy, **SMALL)
    given = [h.params.args.u, h.params.args.delta, h.params.args.B, h.params.args.C, h.params.args.z, h.dout]
    ctype = scan_cu.SPECIALISATIONS[storage]
    assert [name for name, _ in seen] == [f"selective_scan_fwd<{ctype}>", f"selective_scan_bwd<{ctype}>",
                                          f"reduce_channels<{ctype}>", f"reduce_channels<{ctype}>"]
    launched = seen[1][1]
    for position, array in zip((0, 1, 3, 4, 6, 22), given):    # SCAN_INPUTS order; dout after its 22
        assert launched[position] is array, f"argument {position} is a copy, not the caller's array"


class _PoisonedNumPy:
    """NumPy whose ``empty`` fills what it returns with NaN (bfloat16 bits: 0x7fc0): a buffer
    the kernels leave partly unwritten shows up in the results."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        arr = np.empty(shape, dtype)
        if arr.dtype == np.uint16:
            arr.fill(0x7fc0)
        else:
            arr.fill(np.nan)
        return arr


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("length", [0, 2 * CHUNK + 5])
def test_buffers_allocated_empty_are_written_whole(storage, length):
    """out, last_state, the chunk states, du, ddelta, dz, the per-channel partials of dB and dC,
    dB, dC and the partials of dA, dD, ddelta_bias are allocated without zeroing; with each
    filled with NaN first, the results still equal the reference (an empty sequence too,
    where no kernel runs and every gradient is zero)."""
    p = _half_problem("prev", length=length, positions=np.arange(length)[None] * 2, seqlen=2 * length + 3)
    launch = cuda_emu.launcher(**SMALL)
    if storage == "float32":
        args = R.validate_scan_args(**p.kwargs())
        params = ScanParams.build(args, args.coefficients(np.float32))
        with_params = lambda **kw: params
        check_forward(p, lambda **kw: scan_cu.forward(with_params(), _PoisonedNumPy(), launch, **SMALL))
        check_backward(p, lambda dout, **kw: scan_cu.backward(dout, with_params(), _PoisonedNumPy(), launch, **SMALL))
    else:
        h = half_scan(p, storage)
        check_half_forward(h, lambda params: scan_cu.forward(params, _PoisonedNumPy(), launch, **SMALL))
        check_half_backward(h, lambda dout, params: scan_cu.backward(dout, params, _PoisonedNumPy(), launch, **SMALL))


def test_a_gap_on_token_0_reads_nothing_before_the_first_token():
    """Hand-built "hold" coefficients with q > 0 on token 0 (a position map never has one):
    token 0 has no predecessor, so its held input is zero and nothing before B is read.
    B is placed right after a NaN in memory: a read of B[-1] would turn the result NaN."""
    p = _half_problem("hold", length=CHUNK + 3)
    args = R.validate_scan_args(**p.kwargs())
    coefs = args.coefficients(np.float32)
    hold = coefs.hold.copy()
    hold[:, 0] = 3.0
    memory = np.empty(args.B.size + 1, np.float32)
    memory[0] = np.nan
    memory[1:] = args.B.ravel()
    after_nan = memory[1:].reshape(args.B.shape)
    params = ScanParams.build(dataclasses.replace(args, B=after_nan), GapCoefficients(coefs.coef_self, coefs.coef_prev,
                                                                                      hold, coefs.trailing))
    check_forward(p, lambda **kw: cuda_emu.forward(params, **SMALL))
    check_backward(p, lambda dout, **kw: cuda_emu.backward(dout, params, **SMALL))


def _pattern(x):
    """0 finite, 1 NaN, ±2 ±inf."""
    x = np.asarray(x, np.float64)
    return np.where(np.isnan(x), 1, np.where(np.isinf(x), 2 * np.sign(x), 0))


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_an_exploding_state_overflows_to_the_references_infinities(alignment):
    """Two states of every channel grow by e^(8Δ) a token (A = +8): over 200 tokens they
    overflow in float32 and in float64. last_state has the reference's (and numba-cpu's)
    inf/NaN pattern, ±inf where it is infinite, not NaN (the block scan composes products
    of decays that overflowed); out has numba-cpu's, the other float32 kernel's, token by
    token; the states that decay stay within tolerance."""
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(230, 200, replace=False))[None]
    p = make_problem(rng, batch=1, dim=2, dstate=4, length=200, positions=positions, seqlen=235, alignment=alignment,
                     dtype=np.float32, z=False, D=False, delta_softplus=False, delta_bias=False)
    p.A[:, :2] = 8.0
    args = R.validate_scan_args(**p.kwargs())
    out, last = cuda_emu.forward(ScanParams.build(args, args.coefficients(np.float32)), **SMALL)
    with np.errstate(over="ignore", invalid="ignore"):      # the overflow is the point
        _, ref_last = R.selective_scan(**p.kwargs())
    cpu_out, cpu_last = K.selective_scan_fwd(**p.kwargs(), backend="numba-cpu")
    assert np.isinf(ref_last[..., :2]).all(), "the problem must overflow in float64 too"
    np.testing.assert_array_equal(_pattern(last), _pattern(ref_last), "last_state: inf/NaN pattern of the reference")
    np.testing.assert_array_equal(_pattern(last), _pattern(cpu_last), "last_state: inf/NaN pattern of numba-cpu")
    np.testing.assert_array_equal(_pattern(out), _pattern(cpu_out), "out: inf/NaN pattern of numba-cpu")
    R.assert_within_tolerance(last[..., 2:], ref_last[..., 2:], np.float32, "last_state of the decaying states")
