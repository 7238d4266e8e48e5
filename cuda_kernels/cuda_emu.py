"""The backend "cuda-emu": ``scan.cu``, the CUDA C++ kernel of the default GPU backend,
compiled unmodified with the host C++ compiler against ``cuda_emu.h`` (the CUDA execution
model on the CPU: a block's threads are real threads meeting at barriers) and run through
ctypes, with the same host code as the CuPy backend (``scan_cu``). It takes NumPy arrays.
It is slow; it exists so that the GPU kernel is tested, and can be debugged, on machines
without a GPU. float16 arrays and bfloat16 bits (uint16) are read in place, as on the GPU
(``cuda_emu.h`` emulates ``__half`` and ``__nv_bfloat16`` bit for bit).

    forward(args, coefficients, threads=128, items=4)   # SCAN_THREADS x SCAN_ITEMS per chunk
    build(threads, items, source=..., sanitize="thread", driver=...)   # tests: mutants, TSan

Builds are cached in ``$ALIGNSCAN_CACHE_DIR`` (else ``$XDG_CACHE_HOME/alignscan``, else
``~/.cache/alignscan``) under a key hashed from everything that goes into them; when that
directory cannot be written, a temporary one is used instead. The compiler is ``$CXX``, else
g++, c++ or clang++ from PATH.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import scan_cu
from .scan_cu import STORAGE_DTYPES

__all__ = ["HEADER", "CXX_FLAGS", "STORAGE_DTYPES", "compiler", "unavailable_reason", "cache_dir", "build",
           "launcher", "forward", "backward"]

HEADER = Path(__file__).with_name("cuda_emu.h")
CXX_FLAGS = ("-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas")
SANITIZE_FLAGS = {"thread": ("-fsanitize=thread", "-g", "-O1")}


def compiler():
    """The host C++ compiler: $CXX, else g++, c++ or clang++ on PATH; None if there is none."""
    given = os.environ.get("CXX")
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    return next((path for path in map(shutil.which, ("g++", "c++", "clang++")) if path), None)


def unavailable_reason():
    """None when a C++ compiler is there to build scan.cu for the CPU, else why not."""
    if compiler() is None:
        return "no C++ compiler found (looked for $CXX, g++, c++, clang++): install g++ or set CXX"
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx):
    run = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return run.stdout.splitlines()[0] if run.stdout else cxx


def _writable(directory):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True)
        probe.close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def cache_dir():
    """Where builds go: the first writable of $ALIGNSCAN_CACHE_DIR, $XDG_CACHE_HOME/alignscan,
    ~/.cache/alignscan; else a fresh temporary directory (never an error)."""
    candidates = []
    if os.environ.get("ALIGNSCAN_CACHE_DIR"):
        candidates.append(Path(os.environ["ALIGNSCAN_CACHE_DIR"]))
    xdg = os.environ.get("XDG_CACHE_HOME")
    candidates.append((Path(xdg) if xdg else Path.home() / ".cache") / "alignscan")
    for directory in candidates:
        target = directory / "cuda_emu"
        if _writable(target):
            return target
    return Path(tempfile.mkdtemp(prefix="alignscan-cuda-emu-"))


def _unit(source):
    """The translation unit: the emulation header, scan.cu as it is, and one launch entry
    that finds each template instance of ``scan_cu.kernel_names()`` by name."""
    table = "\n".join(f'        {{"{name}", [](dim3 g, dim3 b, void** p) {{ return cuda_emu::launch_kernel(&{name}, '
                      f'g, b, p); }}}},' for name in scan_cu.kernel_names())
    return f'''#include "{HEADER}"
#include "{Path(source).resolve()}"
#include <cstring>

extern "C" __attribute__((visibility("default"))) int alignscan_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                    unsigned by, unsigned bz, void** params) {{
    static const struct {{ const char* name; int (*launch)(dim3, dim3, void**); }} table[] = {{
{table}
    }};
    for (const auto& entry : table)
        if (std::strcmp(entry.name, name) == 0) return entry.launch(dim3(gx, gy, gz), dim3(bx, by, bz), params);
    return -1;
}}

extern "C" __attribute__((visibility("default"))) int alignscan_emu_geometry(int which) {{ return which == 0 ? SCAN_THREADS : SCAN_ITEMS; }}
'''


def build(threads=scan_cu.THREADS, items=scan_cu.ITEMS, source=scan_cu.SOURCE, sanitize=None, driver=None):
    """Compile scan.cu (or ``source``, e.g. a mutant) for the CPU; returns the path of the
    shared library, or of an executable when ``driver`` (a .cpp with main()) is given.
    ``sanitize="thread"`` builds with ThreadSanitizer. Cached by a hash of every input."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(unavailable_reason())
    source = Path(source)
    text = _unit(source) if driver is None else (f'#include "{HEADER}"\n#include "{source.resolve()}"\n'
                                                 f'#include "{Path(driver).resolve()}"\n')
    flags = [*CXX_FLAGS, *scan_cu.defines(threads, items), *SANITIZE_FLAGS.get(sanitize, ())]
    if driver is None:
        # Hidden symbols: two builds loaded at once (say 128 x 4 and 32 x 2) must not share a
        # template instance's static (__shared__) arrays through symbol interposition.
        flags += ["-fPIC", "-shared", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    key = hashlib.sha256("\0".join([HEADER.read_text(), source.read_text(), text, " ".join(flags),
                                    _compiler_version(cxx), Path(driver).read_text() if driver else ""])
                         .encode()).hexdigest()[:20]
    directory = cache_dir()
    target = directory / (f"scan_emu_{key}" + ("" if driver else ".so"))
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=directory) as work:
        unit = Path(work) / "unit.cpp"
        unit.write_text(text)
        built = Path(work) / target.name
        run = subprocess.run([cxx, *flags, str(unit), "-o", str(built)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {source.name} for the CPU (cuda-emu) failed:\n{run.stderr[-4000:]}")
        os.replace(built, target)     # atomic: a concurrent build or an interrupted one leaves no half file
    return target


@functools.lru_cache(maxsize=None)
def _library(threads, items, source):
    lib = ctypes.CDLL(str(build(threads, items, source)))
    lib.alignscan_emu_launch.restype = ctypes.c_int
    lib.alignscan_emu_launch.argtypes = [ctypes.c_char_p, *([ctypes.c_uint] * 6), ctypes.POINTER(ctypes.c_void_p)]
    return lib


def _argument(value):
    """A kernel argument as a ctypes value: arrays by pointer (None: null), integers as int."""
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise ValueError("cuda-emu kernel arrays must be C-contiguous")
        return ctypes.c_void_p(value.ctypes.data)
    return ctypes.c_int(int(value))


def launcher(threads=scan_cu.THREADS, items=scan_cu.ITEMS, source=scan_cu.SOURCE):
    """``launch(name, storage, grid, block, params)`` for ``scan_cu``, running on the CPU."""
    lib = _library(threads, items, str(Path(source).resolve()))

    def launch(name, storage, grid, block, params):
        values = [_argument(p) for p in params]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        grid3, block3 = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        status = lib.alignscan_emu_launch(scan_cu.instance(name, storage).encode(), *grid3, *block3, pointers)
        if status != 0:
            raise RuntimeError(f"cuda-emu has no kernel {scan_cu.instance(name, storage)}")
    return launch


def forward(params, out=None, last_state=None, stream=None, threads=scan_cu.THREADS,
            items=scan_cu.ITEMS, source=scan_cu.SOURCE):
    """out (batch, dim, M) in the storage dtype [, last_state (batch, dim, N) in the compute
    dtype] as NumPy arrays, computed by scan.cu on the CPU with ``threads`` x ``items`` tokens
    per chunk."""
    return scan_cu.forward(params, np, launcher(threads, items, source), threads, items,
                           out=out, last_state=last_state)


def backward(dout, params, grads_out=None, stream=None, threads=scan_cu.THREADS, items=scan_cu.ITEMS,
             source=scan_cu.SOURCE):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) as NumPy arrays, by scan.cu on the CPU
    (du, ddelta, dB, dC, dz in the storage dtype, the others in the compute dtype)."""
    return scan_cu.backward(dout, params, np, launcher(threads, items, source), threads, items,
                            grads_out=grads_out)
