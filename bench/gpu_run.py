"""Everything that needs a GPU, in one go, for a lent GPU machine (see DEVELOPERS.md):

    python -m bench.gpu_run [--out bench/results] [--budget-s 420]

1. the GPU tests (``pytest -m gpu``), 2. the device-to-device copy bandwidth, 3. forward
and forward+backward of cupy and numba-cuda at the ViM-S layer shape with batch 64, keep
1.0 / 0.7 / 0.5, every alignment, with effective bandwidth (bytes of inputs read and
outputs written / time) and the issue's goals, 4. if time is left, images/s of ViM-S and
PlainMamba-L3 (dense, align, relabel) at batch 64 on the cupy backend. Writes one JSON named after the device,
e.g. bench/results/gpu_NVIDIA_H100_80GB_HBM3.json, and stays inside the 8-minute budget
(it stops starting new work when the budget is spent and says what it skipped).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEEP = (1.0, 0.7, 0.5)
ALIGN = ("prev", "self", "none")


def _device_name():
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def gpu_seconds(fn, repeats=20, warmup=3):
    """Median GPU time of fn() (CUDA events around each call)."""
    import cupy
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 1 GiB buffer."""
    import cupy
    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    seconds = gpu_seconds(lambda: dst.__setitem__(Ellipsis, src), repeats=10)
    return 2 * nbytes / seconds


def run_gpu_tests(timeout_s):
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout_s)
    summary = (run.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    return {"returncode": run.returncode, "summary": summary, "counts": counts, "tail": run.stdout[-4000:]}


def scan_bytes(p, backward):
    """Bytes the scan must move at least: inputs read once, outputs written once."""
    item = p.u.dtype.itemsize
    b, d, m = p.u.shape
    n = p.A.shape[1]
    g = p.B.shape[1] if p.B.ndim == 4 else 1
    tokens = b * d * m * item
    bc = b * g * n * m * item
    fwd = 3 * tokens + 2 * bc + tokens            # u, delta, z, B, C in; out
    if not backward:
        return fwd
    return fwd + tokens + 3 * tokens + 2 * bc + 3 * tokens + 2 * bc   # recompute reads, dout; du, ddelta, dz, dB, dC


def bench_backend(backend, budget_end, batch=64):
    import cupy

    import cuda_kernels as K
    from bench.problems import vim_layer_problem
    rows = []
    for alignment in ALIGN:
        for keep in KEEP:
            if time.monotonic() > budget_end:
                rows.append({"backend": backend, "alignment": alignment, "keep_ratio": keep, "skipped": "budget"})
                continue
            p = vim_layer_problem(batch=batch, keep_ratio=keep, alignment=alignment, dtype=np.float32)
            kw = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) and k != "positions" else v)
                  for k, v in p.kwargs(return_last_state=False).items()}
            dout = cupy.asarray(p.dout())
            fwd = lambda: K.selective_scan_fwd(**kw, backend=backend)
            fb = lambda: (fwd(), K.selective_scan_bwd(dout, **kw, backend=backend))
            t_f, t_fb = gpu_seconds(fwd), gpu_seconds(fb, repeats=10)
            rows.append({"backend": backend, "alignment": alignment, "keep_ratio": keep, "tokens": int(p.u.shape[2]),
                         "fwd_s": t_f, "fwd_bwd_s": t_fb,
                         "fwd_bandwidth": scan_bytes(p, False) / t_f, "fwd_bwd_bandwidth": scan_bytes(p, True) / t_fb})
    return rows


def goals(rows, copy_bw):
    out = []
    get = {(r["backend"], r["alignment"], r["keep_ratio"]): r for r in rows if "fwd_s" in r}
    for backend in sorted({r["backend"] for r in rows}):
        base = get.get((backend, "prev", 1.0))
        if base is None:
            continue
        frac = base["fwd_bandwidth"] / copy_bw
        out.append({"check": f"{backend}: forward bandwidth / copy bandwidth at keep 1.0", "value": frac,
                    "goal": ">= 0.5", "passed": frac >= 0.5})
        for r in (0.7, 0.5):
            if (backend, "prev", r) in get:
                v = get[(backend, "prev", r)]["fwd_s"] / base["fwd_s"]
                out.append({"check": f"{backend}: time at keep {r} / keep 1.0", "value": v,
                            "goal": f"<= {r + 0.05:.2f}", "passed": v <= r + 0.05})
        if (backend, "none", 0.7) in get and (backend, "prev", 0.7) in get:
            v = get[(backend, "prev", 0.7)]["fwd_s"] / get[(backend, "none", 0.7)]["fwd_s"]
            out.append({"check": f"{backend}: aligned / relabel at keep 0.7", "value": v, "goal": "<= 1.05",
                        "passed": v <= 1.05})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting work after this (default 420)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    end = start + args.budget_s
    import cuda_kernels as K
    status = K.available_backends()
    if status["cupy"] is not None:
        print(f"no GPU for CuPy here: {status['cupy']}")
        return 2
    device = _device_name()
    result = {"device": device, "backends": {k: v or "available" for k, v in status.items()}}
    result["gpu_tests"] = run_gpu_tests(timeout_s=max(60, int(0.45 * args.budget_s)))
    print("GPU tests:", result["gpu_tests"]["summary"])
    result["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
    rows = []
    for backend in ("cupy", "numba-cuda"):
        if status[backend] is None:
            rows += bench_backend(backend, end)
    result["kernels"] = rows
    result["goals"] = goals(rows, result["copy_bandwidth_bytes_per_s"])
    if time.monotonic() < end - 60:
        # Model throughput with the cupy backend (issue: models), batch 64.
        from bench.models_bench import throughput, throughput_checks
        try:
            tp = throughput(batch=64, repeats=3, backend="cupy", device="cuda", progress=False)
            result["throughput"] = tp
            result["goals"] += throughput_checks(tp)
        except Exception as exc:       # report, do not lose the kernel results
            result["throughput_error"] = f"{type(exc).__name__}: {exc}"
    else:
        result["throughput_skipped"] = "budget"
    result["wall_s"] = time.monotonic() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"
    path.write_text(json.dumps(result, indent=2))
    for g in result["goals"]:
        print(f"[{'PASS' if g['passed'] else 'FAIL'}] {g['check']} = {g['value']:.3f} (goal {g['goal']})")
    print(f"wrote {path} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
