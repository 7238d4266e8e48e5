"""Everything that needs a GPU, in one command, for a lent GPU machine:

    PYTHONPATH=. python -m alignscan.bench.gpu_run [--budget-s 330] [--out DIR] [--dry-run]

(from the repository root: ``alignscan/`` there links every layer, so nothing needs installing)

It runs on that machine's image as it is (Python 3.12, torch, cupy, numba, numba-cuda, pytest,
hypothesis; no network, nothing installed): it needs nothing else (no tqdm, matplotlib or
SciPy). Steps, each printed as it starts and ends:

1. the GPU tests (``pytest -m gpu`` on the files that hold them: scan.cu through CuPy,
   numba.cuda, the torch op on CUDA tensors, the conformance suite's GPU backends);
2. the device-to-device copy bandwidth;
3. forward and forward+backward of cupy and numba-cuda at the ViM-S layer shape, batch 64,
   keep 1.0 / 0.7 / 0.5, every alignment, with effective bandwidth and the goals;
4. if time is left, images/s of ViM-S and PlainMamba-L3 (dense, align, relabel), batch 64,
   on the cupy backend;
5. the deterministic backward: scan.cu's gradients from 5 runs compared bit for bit, with
   the time and the bytes of its per-channel dB/dC partials;
6. the pruned ViM-S and PlainMamba-L3 (align, paper presets) captured in a CUDA graph and
   replayed: logits against eager, replay and eager times (a forward that waited for the
   host could not be captured);
7. the user's path, none given a backend (``gpu_user_path``): ``alignscan evaluate`` (two
   modes) and one ``alignscan finetune`` step on a generated folder, each in its own process
   (skipped with the reason where torchvision/timm/Pillow are not installed);
8. bf16 autocast forward+backward of the op and of a pruned ViM-S against float32: time,
   peak memory, deviation;
9. a pruned ViM-T exported on the CPU (torch.export) run on CUDA tensors, against eager.

It stops starting new work when the budget (default 330 s: the whole run fits in 6 minutes)
is spent and says what it skipped. One JSON, named after the device, goes to --out, else
$OUT, else ./bench_out (never into the package; commit it under bench/results/ by hand).
``--dry-run`` exercises every step here without a GPU: the tests are collected (not run),
the timings use the numba CPU kernel at small shapes, and the JSON is marked "dry_run".
The tests are those of the checkout in the working directory (``--tests``).
Timings go through ``alignscan.bench.timing`` (on a GPU: synchronised before and after each
call), goals through ``alignscan.bench.checks``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import alignscan
from alignscan.bench.checks import check, plain_checks
from alignscan.bench.timing import median_time
from alignscan.outputs import write_json

KEEP = (1.0, 0.7, 0.5)
GPU_TEST_FILES = ("tests/kernels/test_cupy_raw.py", "tests/kernels/test_numba_cuda.py",
                  "tests/bridges/test_op_integration.py", "tests/conformance/test_backends.py")


def say(text):
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {text}", flush=True)


class GPU:
    """Timing and arrays on the GPU (CuPy, CUDA events)."""

    dry = False
    batch = 64
    dim = 768

    def __init__(self):
        import cupy
        self.xp = cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)

    def seconds(self, fn, repeats=20, warmup=3):
        """Median seconds of fn(), the device synchronised before and after each call."""
        sync = self.xp.cuda.Device().synchronize
        return median_time(fn, repeats=repeats, warmup=warmup, sync=sync)

    def backends(self, status):
        return [b for b in ("cupy", "numba-cuda") if status[b] is None]


class DryRun(GPU):
    """The same steps on the CPU: numba-cpu, small shapes, a wall clock."""

    dry = True
    batch = 2
    dim = 64

    def __init__(self):
        self.xp = np
        self.name = "dry-run (CPU)"

    def seconds(self, fn, repeats=3, warmup=1):
        return median_time(fn, repeats=repeats, warmup=warmup)

    def backends(self, status):
        return ["numba-cpu"]


def run_gpu_tests(device, timeout_s, checkout):
    """The gpu-marked tests of the checkout (collected only in a dry run); counts from pytest's
    summary."""
    missing = [f for f in GPU_TEST_FILES if not (checkout / f).is_file()]
    if missing:
        return {"returncode": None, "summary": f"not run: {checkout} has no {missing[0]} (give --tests a checkout)",
                "counts": {}, "tail": "", "stderr_tail": "", "collected_only": device.dry}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    if device.dry:
        command.append("--collect-only")
    root = Path(alignscan.__file__).resolve().parents[1]          # the folder that holds alignscan
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = run.stdout.strip().splitlines() or [""]
    summary = lines[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|tests? collected|deselected)",
                                                 summary)}
    return {"returncode": run.returncode, "summary": summary, "counts": counts, "tail": run.stdout[-4000:],
            "stderr_tail": run.stderr[-2000:], "collected_only": device.dry}


def copy_bandwidth(device, nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    xp = device.xp
    nbytes = nbytes if not device.dry else 1 << 26
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    dst = xp.empty_like(src)
    seconds = device.seconds(lambda: dst.__setitem__(Ellipsis, src), repeats=10)
    return 2 * nbytes / seconds


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


def bench_backend(device, backend, budget_end, alignments):
    from alignscan import cuda_kernels as K
    from alignscan import reference as R
    from alignscan.testing import vim_layer_problem
    rows = []
    xp = device.xp
    for alignment in alignments:
        for keep in KEEP:
            if time.monotonic() > budget_end:
                rows.append({"backend": backend, "alignment": alignment, "keep_ratio": keep, "skipped": "budget"})
                continue
            p = vim_layer_problem(batch=device.batch, dim=device.dim, keep_ratio=keep, alignment=alignment,
                                  dtype=np.float32)
            kw = p.kwargs(return_last_state=False)
            position_map = R.PositionMap(kw.pop("positions"), kw.pop("seqlen"))   # made once, as a model does
            kw = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
            dout = xp.asarray(p.dout())
            fwd = lambda: K.selective_scan_fwd(**kw, positions=position_map, backend=backend)
            fb = lambda: (fwd(), K.selective_scan_bwd(dout, **kw, positions=position_map, backend=backend))
            t_f, t_fb = device.seconds(fwd), device.seconds(fb, repeats=10 if not device.dry else 3)
            rows.append({"backend": backend, "alignment": alignment, "keep_ratio": keep, "tokens": int(p.u.shape[2]),
                         "fwd_s": t_f, "fwd_bwd_s": t_fb,
                         "fwd_bandwidth": scan_bytes(p, False) / t_f, "fwd_bwd_bandwidth": scan_bytes(p, True) / t_fb})
        say(f"  {backend} {alignment}: done")
    return rows


def goals(rows, copy_bw):
    """The GPU goals, measured once (a GPU run is too short to time a miss again)."""
    out = []
    get = {(r["backend"], r["alignment"], r["keep_ratio"]): r for r in rows if "fwd_s" in r}
    for backend in sorted({r["backend"] for r in rows}):
        base = get.get((backend, "prev", 1.0))
        if base is None:
            continue
        frac = base["fwd_bandwidth"] / copy_bw
        out.append(check(f"{backend}: forward bandwidth / copy bandwidth at keep 1.0", frac, ">= 0.5", frac >= 0.5,
                         kind="timing"))
        for r in (0.7, 0.5):
            if (backend, "prev", r) in get:
                v = get[(backend, "prev", r)]["fwd_s"] / base["fwd_s"]
                out.append(check(f"{backend}: time at keep {r} / keep 1.0", v, f"<= {r + 0.05:.2f}", v <= r + 0.05,
                                 kind="timing"))
        if (backend, "none", 0.7) in get and (backend, "prev", 0.7) in get:
            v = get[(backend, "prev", 0.7)]["fwd_s"] / get[(backend, "none", 0.7)]["fwd_s"]
            out.append(check(f"{backend}: aligned / relabel at keep 0.7", v, "<= 1.05", v <= 1.05, kind="timing"))
    return out


def _guarded(step):
    """A step's result, or its error (a failed step never loses the others' results)."""
    try:
        return step()
    except Exception as exc:          # reported in the JSON, the run goes on
        say(f"    failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def determinism(device, runs=5):
    """scan.cu's backward (cupy; numba-cpu in a dry run) run ``runs`` times on one problem:
    whether every gradient is the same bits each time, its median time, and the memory of the
    per-channel dB/dC partials that make it deterministic (2·b·dim·N·M accumulators)."""
    from alignscan import cuda_kernels as K
    from alignscan.testing import vim_layer_problem
    backend = "numba-cpu" if device.dry else "cupy"
    p = vim_layer_problem(batch=8 if not device.dry else 2, dim=device.dim, keep_ratio=0.7, alignment="prev",
                          dtype=np.float32)
    kw = {k: (device.xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.kwargs(return_last_state=False).items()}
    dout = device.xp.asarray(p.dout())
    backward = lambda: K.selective_scan_bwd(dout, **kw, backend=backend)
    as_bytes = lambda grads: [None if g is None else device.xp.asnumpy(g).tobytes() if not device.dry
                              else np.ascontiguousarray(g).tobytes() for g in grads]
    first = as_bytes(backward())
    identical = all(as_bytes(backward()) == first for _ in range(runs - 1))
    b, d, m = p.u.shape
    n = p.A.shape[1]
    result = {"backend": backend, "runs": runs, "bit_identical": identical, "bwd_s": device.seconds(backward),
              "partials_bytes": 2 * b * d * n * m * 4, "shape": [b, d, m, n]}
    say(f"    bit-identical over {runs} runs: {identical}; partials {result['partials_bytes'] / 1e6:.0f} MB")
    return result


def graph_capture(device, names=("vim_small", "plainmamba_l3"), batch=64):
    """Each pruned model (align, paper preset, cupy backend) captured in a CUDA graph once and
    replayed on a static input: max |logits - eager|, replay and eager seconds."""
    import torch

    from alignscan import models
    out = []
    for name in names:
        torch.manual_seed(0)
        model = models.create(name, pruning=models.paper_preset(name), backend="cupy").eval().cuda()
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        with torch.no_grad():
            eager = model(x)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(x)                                      # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = model(x)
            graph.replay()
            torch.cuda.synchronize()
            row = {"model": name, "batch": batch, "max_abs_diff": float((captured - eager).abs().max()),
                   "replay_s": device.seconds(graph.replay), "eager_s": device.seconds(lambda: model(x))}
        say(f"    {name}: captured; replay {row['replay_s'] * 1e3:.1f} ms vs eager {row['eager_s'] * 1e3:.1f} ms")
        out.append(row)
    return out


def output_dir(args):
    if args.out is not None:
        return args.out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path("bench_out")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m alignscan.bench.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes (default $OUT, else ./bench_out)")
    parser.add_argument("--tests", type=Path, default=Path.cwd(),
                        help="the checkout whose GPU tests run (default: the working directory)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="stop starting work after this many seconds (default 330: done inside 6 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="every step without a GPU (CPU stand-ins)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    start = time.monotonic()
    end = start + args.budget_s
    from alignscan import cuda_kernels as K
    from alignscan.reference import ALIGNMENTS
    status = K.available_backends()
    if args.dry_run:
        device = DryRun()
    elif status["cupy"] is not None:
        say(f"no GPU for CuPy here: {status['cupy']} (use --dry-run to exercise the steps without one)")
        return 2
    else:
        device = GPU()
    out_dir = output_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"device: {device.name}; budget {args.budget_s:.0f} s; results to {out_dir}")
    result = {"device": device.name, "dry_run": device.dry, "backends": {k: v or "available" for k, v in status.items()},
              "python": sys.version.split()[0]}
    say("1/9 GPU tests" + (" (collected only: dry run)" if device.dry else ""))
    result["gpu_tests"] = run_gpu_tests(device, timeout_s=max(60, int(0.45 * args.budget_s)), checkout=args.tests)
    say(f"    {result['gpu_tests']['summary']}")
    say("2/9 copy bandwidth")
    result["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
    say(f"    {result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    say("3/9 kernels at the ViM-S layer shape")
    rows = []
    for backend in device.backends(status):
        rows += bench_backend(device, backend, end, ALIGNMENTS)
    result["kernels"] = rows
    result["goals"] = goals(rows, result["copy_bandwidth_bytes_per_s"])
    if time.monotonic() < end - 60 or device.dry:
        say("4/9 model throughput")
        from alignscan.bench.models_bench import throughput, throughput_checks
        try:
            tp = throughput(batch=device.batch, img=224 if not device.dry else 64, repeats=3 if not device.dry else 1,
                            backend="cupy" if not device.dry else "numba-cpu", device="cuda" if not device.dry else "cpu",
                            progress=False)
            result["throughput"] = tp
            result["goals"] += plain_checks(throughput_checks(tp))
        except Exception as exc:       # report, do not lose the kernel results
            result["throughput_error"] = f"{type(exc).__name__}: {exc}"
            say(f"    throughput failed: {result['throughput_error']}")
    else:
        result["throughput_skipped"] = "budget"
        say("4/9 model throughput: skipped (budget)")
    if time.monotonic() < end - 30 or device.dry:
        say("5/9 deterministic backward")
        result["determinism"] = _guarded(lambda: determinism(device))
    else:
        result["determinism"] = {"skipped": "budget"}
    if (time.monotonic() < end - 30 or device.dry) and not device.dry:
        say("6/9 CUDA graph capture of the pruned models")
        result["graphs"] = _guarded(lambda: graph_capture(device))
    else:
        result["graphs"] = {"skipped": "dry run: needs a CUDA GPU" if device.dry else "budget"}
        say(f"6/9 CUDA graph capture: skipped ({result['graphs']['skipped']})")
    from alignscan.bench import gpu_user_path
    user_steps = (("7/9 the user's commands without --backend", "user_commands",
                   lambda: gpu_user_path.commands(device.dry)),
                  ("8/9 bf16 autocast against float32", "half",
                   lambda: gpu_user_path.half(device.dry, lambda fn: device.seconds(fn, repeats=3 if not device.dry
                                                                                    else 1, warmup=1))),
                  ("9/9 an exported pruned model on this device", "export", lambda: gpu_user_path.export(device.dry)))
    for label, key, step in user_steps:
        if time.monotonic() < end - 30 or device.dry:
            say(label)
            result[key] = _guarded(step)
            verdict = result[key].get("passed", False if "error" in result[key] else None)
            say(f"    {'PASS' if verdict else 'skipped' if verdict is None else 'FAIL'}")
            if verdict is not None:
                result["goals"].append(check(label.split(" ", 1)[1], float(bool(verdict)), "1 (passed)", verdict))
        else:
            result[key] = {"skipped": "budget"}
            say(f"{label}: skipped (budget)")
    result["wall_s"] = time.monotonic() - start
    path = out_dir / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device.name).strip('_')}.json"
    write_json(path, result)
    for g in result["goals"]:
        say(f"[{'PASS' if g['passed'] else 'FAIL'}] {g['check']} = {g['value']:.3f} (goal {g['goal']})")
    say(f"wrote {path} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
