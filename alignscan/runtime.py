"""This process's place to run: its threads and the machine facts every run record carries.

Timing ratios change with the CPU's vector width and the thread count, so every command
records both (``machine()``); the command line, the benchmarks and the experiments' worker
processes set their threads through one function (``set_threads``). numba is imported only
when asked for, so that the command line's ``--help`` stays fast.
"""
from __future__ import annotations

import os
import platform
import sys

__all__ = ["set_threads", "exit_on_sigterm", "process_device", "machine", "instruction_set", "cpu_model", "versions", "peak_memory"]


def set_threads(threads):
    """numba's threads (clipped to 1..NUMBA_NUM_THREADS) and torch's, the same number."""
    import numba
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        import torch
        torch.set_num_threads(numba.get_num_threads())
    except ImportError:
        pass


def exit_on_sigterm():
    """SIGTERM (what torchrun and Slurm send at a time limit) ends this process as Ctrl-C
    does: by an exception, so that every ``finally`` runs and a half-written temporary file
    is removed (``outputs.write_bytes``). Without it the default action kills the process
    where it stands. Exit status 143 (128 + SIGTERM), as a killed process reports. Main
    thread only (signal handlers are installed there)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)


def process_device():
    """The device type this process's models run on: "cuda" where torch sees a GPU (as
    ``imagenet.world.World`` places them), else "cpu"."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []


def instruction_set():
    """The widest x86 vector extension the CPU has ("AVX-512", "AVX2", "AVX", "SSE"), or the
    machine's architecture elsewhere: timing ratios change with it."""
    flags = _cpu_flags()
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse2", "SSE")):
        if flag in flags:
            return name
    return platform.machine()


def cpu_model():
    """The CPU's model name (Linux: /proc/cpuinfo), else None."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def versions():
    """The versions that decide the numbers: Python, NumPy, numba, torch (None without it)."""
    import numba
    import numpy
    out = {"python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__}
    try:
        import torch
        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    return out


def _threading_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:          # no parallel region has run yet in this process
        return None


def machine():
    """The facts a timing needs beside it: CPU model and instruction set, cores, threads,
    numba's threading layer, versions."""
    import numba
    return {"machine": platform.machine(), "processor": cpu_model() or platform.processor() or platform.machine(),
            "instruction_set": instruction_set(), "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "threading_layer": _threading_layer(), "versions": versions()}


def peak_memory():
    """Peak resident memory of this process and of its finished children (the scaling
    measurements run in their own processes), in GB (Linux reports ru_maxrss in KiB)."""
    import resource
    scale = 1e9 if sys.platform == "darwin" else 1e6
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
            "children_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale}
