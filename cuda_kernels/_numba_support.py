"""numba building blocks shared by the CPU kernels: the threading layer, caching that
tolerates read-only directories, dtype-preserving casts, and an exp that LLVM can vectorise.

Threading: numba's TBB layer is the one that is both thread-safe (several Python threads
may call the kernels at once) and fork-safe (a process that ran them may fork, e.g. a torch
DataLoader with workers); OpenMP's kills forked workers, the workqueue aborts on concurrent
calls. ``select_threading_layer`` (run when cuda_kernels is imported) makes TBB the layer:
pip's ``tbb`` puts libtbb.so.12 in the environment's lib/, which the loader does not search,
so it is loaded from there first. A layer chosen in $NUMBA_THREADING_LAYER, or one already
started, is left alone.

The float32 exp is a Cephes-style polynomial (range reduction to [-ln2/2, ln2/2], degree-6
minimax, scale by 2^n through the exponent bits): branch-free, so the kernels' inner loops over a
block of channels compile to SIMD code; relative error about 6e-8 (one float32 ulp). The float32
softplus is max(x, 0) + log1p(exp(-|x|)) with log1p(t) = 2·atanh(t / (2 + t)) as an odd
series (t in (0, 1], error below 1e-8): also branch-free. float64 keeps ``math.exp`` and
``math.log1p``, which the float64 tolerance (1e-10) needs.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaWarning
from numba.extending import intrinsic, overload

from alignscan.reference.scan import SOFTPLUS_THRESHOLD

__all__ = ["cached_njit", "compile_notice", "fallback_cache_dir", "cast_like", "fast_exp", "softplus", "softplus_grad", "sigmoid", "select_threading_layer",
           "hold_sum", "hold_sum_grad", "hold_sums", "HOLD_DIRECT_STEPS"]

TBB_LIBRARY = "libtbb.so.12"


def select_threading_layer():
    """Make numba's TBB threading layer the one the kernels use (see the module doc);
    returns the layer chosen, or None (with a warning) when TBB cannot be loaded."""
    import numba
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return os.environ["NUMBA_THREADING_LAYER"]
    try:
        return numba.threading_layer()          # already started: nothing to choose any more
    except ValueError:
        pass
    for directory in dict.fromkeys((Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib")):
        library = directory / TBB_LIBRARY
        if library.exists():
            try:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                pass
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401  (loads only if the TBB library can)
    except ImportError as exc:
        warnings.warn(f"alignscan: numba's TBB threading layer is not available ({exc}); the CPU kernels are then "
                      "not fork-safe: install the 'tbb' package (pip install 'tbb>=2021.6,<2024')", RuntimeWarning,
                      stacklevel=2)
        return None
    numba.config.THREADING_LAYER = "tbb"
    return "tbb"


def _sources_digest():
    """A digest of every Python source in this package."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _stamp_with_package_sources(dispatcher):
    """numba keeps a cached kernel until the file that defines it changes, but the kernels
    inline helpers from other files (this one): a changed helper would leave a stale, wrong
    kernel in the cache. The cache's source stamp therefore also carries a digest of every
    source file of the package (numba internals; a numba without them keeps its own rule)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = (cache_file._source_stamp, _SOURCES_DIGEST)
    return dispatcher


_SOURCES_DIGEST = _sources_digest()


_CACHE_FALLBACK = {"tried": False, "dir": None}


def fallback_cache_dir():
    """A per-user cache directory for the compiled kernels when numba finds no writable one
    (a read-only install whose $NUMBA_CACHE_DIR or home cache cannot be written either)."""
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"alignscan-numba-cache-{uid}"


def _use_fallback_cache(reason):
    """Point numba at ``fallback_cache_dir()`` once per process (warning once, in one line);
    False when that cannot be written either."""
    import numba
    state = _CACHE_FALLBACK
    if not state["tried"]:
        state["tried"] = True
        directory = fallback_cache_dir()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory):
                pass
            numba.config.CACHE_DIR = str(directory)
            state["dir"] = directory
            warnings.warn(f"alignscan: no writable numba cache directory ({reason}); the compiled CPU kernels are "
                          f"cached in {directory} instead", RuntimeWarning, stacklevel=4)
        except OSError:
            warnings.warn(f"alignscan: no writable numba cache directory ({reason}, nor {directory}): every process "
                          f"compiles the CPU kernels (about {COMPILE_SECONDS} s)", RuntimeWarning, stacklevel=4)
    return state["dir"] is not None


def cached_njit(**options):
    """``njit(cache=True, **options)`` that never fails because of the cache: with no
    writable cache directory (a read-only install) it caches in ``fallback_cache_dir()``,
    and if that cannot be written either it compiles without a cache, saying so once.
    A change to any source file of the package invalidates the cache."""
    def decorate(fn):
        for attempt in range(2):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NumbaWarning)
                    return _stamp_with_package_sources(njit(cache=True, **options)(fn))
            except (RuntimeError, OSError) as exc:   # numba: "cannot cache function ...: no locator available"
                if attempt or not _use_fallback_cache(str(exc).split(":")[-1].strip() or type(exc).__name__):
                    return njit(cache=False, **options)(fn)
    return decorate


# About how long the first call compiles each CPU kernel (float32, measured on the project's
# 2-core machine with an empty cache: forward 7 s, backward 43 s).
KERNEL_COMPILE_SECONDS = {"forward": 10, "backward": 45}
COMPILE_SECONDS = sum(KERNEL_COMPILE_SECONDS.values())
_NOTICED = set()


def compile_notice(dispatcher, what):
    """A context manager around the first call of a kernel: when it will compile (no
    compiled version in this process and none in the cache), one line on stderr says so
    and, when done, how long it took."""
    import contextlib
    import time

    if dispatcher.signatures or what in _NOTICED or _cached_on_disk(dispatcher):
        return contextlib.nullcontext()
    _NOTICED.add(what)

    @contextlib.contextmanager
    def notice():
        print(f"alignscan: compiling the CPU {what} kernel once (about {KERNEL_COMPILE_SECONDS.get(what, 30)} s; "
              f"cached afterwards)...",
              end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return notice()


def _cached_on_disk(dispatcher):
    """Whether numba's cache holds an index for the kernel (numba internals; True when they
    cannot be read, so that no notice is printed on a guess)."""
    try:
        return Path(dispatcher._cache._cache_file._index_path).exists()
    except AttributeError:
        return True


def cast_like(x, like):
    """x converted to the float type of ``like`` (keeps float32 kernels in float32)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(cast_like, inline="always")
def _cast_like(x, like):
    if like == types.float32:
        return lambda x, like: np.float32(x)
    return lambda x, like: np.float64(x)


@intrinsic
def _int32_bits_as_float32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@intrinsic
def _float32_bits_as_int32(typingctx, x):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return sig, codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """a·b + c with one rounding (llvm.fma.f32): opaque to fast-math reassociation, which
    would otherwise fold the two-constant range reduction below back into one constant."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                   4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))


_EXP_HI = np.float32(88.72283)          # above: exp(x) > FLT_MAX, inf
_EXP_LO = np.float32(-87.33654)         # below: exp(x) < FLT_MIN, flushed to 0 (no denormal slowdown)
_FLT_MIN = np.float32(1.1754944e-38)
_INF_BITS = np.int32(0x7F800000)


@njit(inline="always", fastmath={"contract"})
def _expf32(x):
    """exp(x) in float32, branch-free (selects, not branches, so a loop over it vectorises):
    at most ``reference.tolerances.FAST_EXP_MAX_ULP`` ulp from the float64 exp rounded; inf
    above ln(FLT_MAX), 0 below ln(FLT_MIN) (no denormals), NaN for NaN, 1 exactly at 0."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    # np.floor keeps float32 (math.floor would return an int64: the polynomial would then run
    # in float64, and AVX2 has no packed int64 -> float conversion, so the loop went scalar).
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = _fma32(-n, _LN2_LO, _fma32(-n, _LN2_HI, xc))
    p = _P[0]
    p = p * r + _P[1]
    p = p * r + _P[2]
    p = p * r + _P[3]
    p = p * r + _P[4]
    p = p * r + _P[5]
    p = p * r * r + r + np.float32(1.0)
    # p·2^n by adding n to p's exponent field (integer arithmetic: exact, and out of reach of
    # fast-math reassociation, which turned p·2^a·2^b into p·(2^a·2^b) = p·inf at n = 128). A
    # result below FLT_MIN (exponent field 0) is flushed to 0 next.
    bits = _float32_bits_as_int32(p) + (np.int32(n) << 23)
    # The edges as bit masks, not branches (a branch in this inlined helper would be control
    # flow in every kernel's IR): 0 below FLT_MIN, inf above ln(FLT_MAX), x itself if NaN.
    keep = -(np.int32(_int32_bits_as_float32(bits) >= _FLT_MIN) & np.int32(x >= _EXP_LO))
    bits = bits & keep
    big = -np.int32(x > _EXP_HI)
    bits = (bits & ~big) | (_INF_BITS & big)
    nan = -np.int32(x != x)
    return _int32_bits_as_float32((bits & ~nan) | (_float32_bits_as_int32(x) & nan))


def fast_exp(x):
    """exp(x): the vectorisable polynomial for float32, math.exp for float64."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(fast_exp, inline="always")
def _fast_exp(x):
    if x == types.float32:
        return lambda x: _expf32(x)
    return lambda x: math.exp(x)


@njit(inline="always", fastmath={"contract"})
def _softplus32(x):
    t = _expf32(-abs(x))                       # in (0, 1]
    s = t / (np.float32(2.0) + t)              # log1p(t) = 2·atanh(s), s in (0, 1/3]
    s2 = s * s
    p = np.float32(2.0 / 13.0)
    p = p * s2 + np.float32(2.0 / 11.0)
    p = p * s2 + np.float32(2.0 / 9.0)
    p = p * s2 + np.float32(2.0 / 7.0)
    p = p * s2 + np.float32(2.0 / 5.0)
    p = p * s2 + np.float32(2.0 / 3.0)
    p = p * s2 + np.float32(2.0)
    return max(x, np.float32(0.0)) + s * p


@njit(inline="always")
def _softplus64(x):
    # log1p(exp(x)) up to the threshold, x above: the mamba kernel's rule (SPEC §1)
    below = math.log1p(math.exp(min(x, SOFTPLUS_THRESHOLD)))
    return below if x <= SOFTPLUS_THRESHOLD else x


def softplus(x):
    """softplus(x) as SPEC §1 (above the threshold the float32 series differs from x by < 3e-9)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(softplus, inline="never")
def _softplus(x):
    if x == types.float32:
        def impl32(x):
            return _softplus32(x)
        return impl32

    def impl64(x):
        return _softplus64(x)
    return impl64


def sigmoid(x):
    """1 / (1 + exp(-x)) in the type of x."""
    raise NotImplementedError("only callable from numba-compiled code")


@njit(inline="always", fastmath={"contract"})
def _sigmoid32(x):
    return np.float32(1.0) / (np.float32(1.0) + _expf32(-x))


@overload(sigmoid, inline="always")
def _sigmoid(x):
    if x == types.float32:
        return lambda x: _sigmoid32(x)
    return lambda x: 1.0 / (1.0 + math.exp(-x))


def softplus_grad(x):
    """d softplus / dx: sigmoid(x) below the threshold, 1 above (float32: sigmoid, which
    rounds to 1 there)."""
    raise NotImplementedError("only callable from numba-compiled code")


@njit(inline="always")
def _softplus_grad64(x):
    if x <= SOFTPLUS_THRESHOLD:
        return 1.0 / (1.0 + math.exp(-x))
    return 1.0


@overload(softplus_grad, inline="always")
def _softplus_grad(x):
    if x == types.float32:
        return lambda x: _sigmoid32(x)
    return lambda x: _softplus_grad64(x)


# --- Alignment "hold" (reference.hold): S_q(x) and T_q(x) = dS_q/dx ---------------------
# Only tokens after a gap need them, once per (token, channel, state). The scalar forms are
# reference.hold's closed forms in float64 (the trailing steps, gaps longer than
# HOLD_DIRECT_STEPS); the kernels call ``hold_sums`` on a whole row of states or channels,
# which sums a short gap's q terms directly in the row's dtype so that the loops vectorise
# (one libm expm1 per element made "hold" 6-8x slower than "prev" at keep 0.7).

HOLD_DIRECT_STEPS = 8

@njit(inline="always")
def _langevin64(y):
    if abs(y) < 0.1:
        y2 = y * y
        return y * (1.0 / 3.0 + y2 * (-1.0 / 45.0 + y2 * (2.0 / 945.0 + y2 * (-1.0 / 4725.0 + y2 * (2.0 / 93555.0)))))
    return 1.0 / math.tanh(y) - 1.0 / y


@njit(inline="always")
def hold_sum(q, x):
    """S_q(x) = Σ_{k<q} exp(k·x) = expm1(q·x)/expm1(x), q at x = 0 (float64)."""
    q, x = np.float64(q), np.float64(x)
    if x == 0.0:
        return q
    return math.expm1(q * x) / math.expm1(x)


@njit(inline="always")
def hold_sum_grad(q, x):
    """T_q(x) = dS_q/dx = Σ_{k<q} k·exp(k·x), without cancellation (float64)."""
    q, x = np.float64(q), np.float64(x)
    if x == 0.0:
        return q * (q - 1.0) / 2.0
    if abs(q * x) < 1.0:
        return hold_sum(q, x) * ((q - 1.0) / 2.0 + (q * _langevin64(q * x / 2.0) - _langevin64(x / 2.0)) / 2.0)
    em1 = math.expm1(x)
    return (q * math.exp(q * x) * em1 - math.exp(x) * math.expm1(q * x)) / (em1 * em1)


@njit(inline="always")
def hold_sums(q, x, ratio, power, sums, grads, with_grads):
    """sums[j] = S_q(x[j]) and, if with_grads, grads[j] = T_q(x[j]), for j < len(x).

    A gap of q <= HOLD_DIRECT_STEPS steps adds its terms exp(k·x), k < q, as powers of one
    exp (no cancellation, relative error about q ulp); longer gaps use the float64 closed
    forms. ``ratio`` and ``power`` are scratch rows as long as x."""
    m = x.shape[0]
    if q <= HOLD_DIRECT_STEPS:
        for j in range(m):
            ratio[j] = fast_exp(x[j])
            power[j] = 1.0
            sums[j] = 1.0
        if with_grads:
            for j in range(m):
                grads[j] = 0.0
        k = 1
        while k < q:
            weight = cast_like(k, sums[0])
            for j in range(m):
                power[j] *= ratio[j]
                sums[j] += power[j]
            if with_grads:
                for j in range(m):
                    grads[j] += weight * power[j]
            k += 1
    else:
        for j in range(m):
            sums[j] = hold_sum(q, x[j])
        if with_grads:
            for j in range(m):
                grads[j] = hold_sum_grad(q, x[j])
