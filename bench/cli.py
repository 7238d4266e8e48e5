"""``python -m bench``: the main job and its subcommands (see --help)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

DEFAULT_OUT = Path("bench_out")


def _machine():
    import numba
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numba_threads": numba.get_num_threads()}


def run_kernels(args):
    """The kernel table for every backend that can run here, the performance checks, a plot."""
    import numba
    import numpy as np

    import cuda_kernels as K
    from bench.kernels import exp_floor_seconds, format_table, kernel_table, performance_checks, plot_times
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    status = K.available_backends()
    backends = ["reference"] + [name for name, reason in status.items() if reason is None]
    quick = args.quick
    shape = dict(batch=1, dim=96) if quick else dict(batch=8, dim=768)
    rows = kernel_table(backends=backends, keep_ratios=(1.0, 0.7) if quick else (1.0, 0.7, 0.5),
                        dtype=np.float32, repeats=2 if quick else 5, **shape)
    print(f"Kernel table (one ViM-S scan layer: {rows[0]['shape']}, float32 inputs, median wall time, "
          f"{numba.get_num_threads()} numba thread(s)):")
    print(format_table(rows))
    for name, reason in status.items():
        if reason is not None:
            print(f"  (not run: {name}: {reason})")
    # At --quick sizes a call takes microseconds and overhead decides the ratios: no checks.
    checks = [] if quick else performance_checks(rows, exp_floor_seconds(**shape))
    results = {"kernels": rows, "performance_checks": checks,
               "backends": {k: v or "available" for k, v in status.items()}}
    if not quick:
        import torch

        from bench.bridges_bench import bridge_checks, bridge_rows
        torch.set_num_threads(numba.get_num_threads())
        print("\nThe torch op (bridges.selective_scan_fn, numba-cpu) against its autograd twin and the bare kernel...")
        bridge = bridge_rows()
        for name, seconds in bridge["seconds"].items():
            print(f"  {name:<16} {1e3 * seconds:10.2f} ms")
        results["bridge"] = bridge
        results["performance_checks"] = checks + bridge_checks(bridge)
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_times(rows, args.out / "kernels_time_vs_keep.png")
    print(f"Plot: {plot.resolve()}")
    return results


def verdicts(results):
    lines = []
    for row in results.get("kernels", []):
        lines.append((row["within_tolerance"], f"{row['backend']} {row['alignment']} keep {row['keep_ratio']}: "
                      f"max relative deviation {row['max_rel_dev']:.1e} from the {row['judged_against']}"))
    for c in results.get("performance_checks", []):
        lines.append((c["passed"], f"{c['check']} = {c['value']:.2f} (goal {c['goal']})"))
    return [(ok, f"[{'PASS' if ok else 'FAIL'}] {text}") for ok, text in lines]


def _write(results, out, name):
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps({"machine": _machine(), **results}, indent=2))
    return path


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="tiny sizes: finishes in well under a minute")
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    common.add_argument("--threads", type=int, default=1,
                        help="numba threads (default 1: ratios comparable to the single-threaded NumPy reference)")
    parser = argparse.ArgumentParser(prog="python -m bench", parents=[common], description=(
        "alignscan benchmarks. With no subcommand, the main job: the kernel table for every "
        "backend that runs here, a verdict per check, results JSON and plots in --out."))
    sub = parser.add_subparsers(dest="command", metavar="{kernels}")
    sub.add_parser("kernels", parents=[common],
                   help="backend x alignment x keep ratio: time, speed-up over keep 1.0, deviation from the reference",
                   description="The kernel table and the numba-cpu performance checks at the ViM-S layer shape.")
    args = parser.parse_args(argv)

    results = run_kernels(args)
    lines = verdicts(results)
    print("\nVerdicts:")
    print("\n".join(text for _, text in lines))
    path = _write(results, args.out, "kernels.json" if args.command == "kernels" else "results.json")
    print(f"\nResults written to {path.resolve()}")
    return 0 if all(ok for ok, _ in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
