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
    untimed = [name for name in status if not K.backends.get(name).timed]
    backends = ["reference"] + [name for name, reason in status.items() if reason is None and name not in untimed]
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
        elif name in untimed:
            print(f"  (not timed: {name}: {K.backends.get(name).purpose})")
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


def run_flops(args):
    from bench.models_bench import flops_checks, flops_rows, format_flops
    rows = flops_rows()
    print("\nFLOPs (GMACs as the paper counts them; pruned = paper preset) beside the paper's Table 1:")
    print(format_flops(rows))
    return {"flops": rows, "performance_checks": flops_checks(rows)}


def backend_and_device(requested):
    """(backend name, "cpu" or "cuda") for --backend (else $ALIGNSCAN_BACKEND, else the CPU
    default), checked by the one registry: an unknown name or one that cannot run here is a
    ValueError / BackendUnavailable naming the option or the variable."""
    import os

    from cuda_kernels import backends
    import bridges  # noqa: F401  (registers the "torch" backend)
    name = requested if requested is not None else os.environ.get(backends.ENV_BACKEND) or None
    if name is None:
        return backends.resolve(None, "cpu"), "cpu"
    what = "--backend" if requested is not None else f"the environment variable {backends.ENV_BACKEND}"
    entry = backends.get(name, what=what)
    device = "cuda" if entry.device == "cuda" else "cpu"
    return backends.resolve(name, device), device


def run_models(args):
    import numba
    import torch

    from bench.models_bench import format_throughput, throughput, throughput_checks
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(numba.get_num_threads())
    backend, device = backend_and_device(args.backend)
    img, batch, repeats = (64, 2, 1) if args.quick else (224, args.batch, 5)
    rows = throughput(batch=batch, img=img, repeats=repeats, backend=backend, device=device)
    print(f"\nThroughput ({device}, backend {backend}, float32, {img}x{img}, batch {batch}, "
          f"{numba.get_num_threads()} thread(s), median of {repeats} interleaved rounds):")
    print(format_throughput(rows))
    return {"throughput": rows, "performance_checks": [] if args.quick else throughput_checks(rows)}


def run_zero_shot(args):
    import numba
    import torch

    from bench import zero_shot
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(numba.get_num_threads())
    result = zero_shot.run(args.out, quick=args.quick, cache_dir=args.cache, seed=args.seed)
    print()
    print((args.out / "zero_shot.md").read_text())
    print(f"Table: {(args.out / 'zero_shot.md').resolve()}  plot: {(args.out / 'zero_shot.png').resolve()}")
    return {"zero_shot": result}


def run_visualize(args):
    from bench import visualize
    result = visualize.run(args.out, image_path=args.image, model_name=args.model, checkpoint=args.checkpoint,
                           quick=args.quick, cache_dir=args.cache)
    print("Figures (" + result["weights"] + "):")
    for path in result["figures"]:
        print(f"  {Path(path).resolve()}")
    return {"visualize": result}


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


def _run(args):
    """The results of the chosen subcommand (or of the main job: kernels, then FLOPs)."""
    if args.command == "flops":
        return run_flops(args)
    if args.command == "models":
        return run_models(args)
    if args.command == "zero-shot":
        return run_zero_shot(args)
    if args.command == "visualize":
        return run_visualize(args)
    results = run_kernels(args)
    if args.command == "kernels":
        return results
    flops = run_flops(args)
    results["flops"] = flops["flops"]
    results["performance_checks"] = results["performance_checks"] + flops["performance_checks"]
    return results


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="tiny sizes: finishes in well under a minute")
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    common.add_argument("--threads", type=int, default=1,
                        help="numba threads (default 1: ratios comparable to the single-threaded NumPy reference)")
    parser = argparse.ArgumentParser(prog="python -m bench", parents=[common], description=(
        "alignscan benchmarks. With no subcommand, the main job: the kernel table for every "
        "backend that runs here, a verdict per check, results JSON and plots in --out."))
    sub = parser.add_subparsers(dest="command", metavar="{kernels,flops,models,zero-shot,visualize}")
    sub.add_parser("kernels", parents=[common],
                   help="backend x alignment x keep ratio: time, speed-up over keep 1.0, deviation from the reference",
                   description="The kernel table, the numba-cpu performance checks at the ViM-S layer shape, and "
                               "the torch op against its autograd twin and the bare kernel.")
    sub.add_parser("flops", parents=[common], help="FLOPs of the five models, dense and pruned, beside the paper",
                   description="GFLOPs by the paper's two counting recipes with real per-layer token counts.")
    m = sub.add_parser("models", parents=[common], help="images/s of dense, align and relabel (ViM-S, PlainMamba-L3)",
                       description="Model throughput with the paper presets; on a GPU use --backend cupy --batch 64.")
    m.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    m.add_argument("--backend", default=None, help="scan backend (default: by device); cupy runs on CUDA")
    z = sub.add_parser("zero-shot", parents=[common], help="train a small ViM on digits, prune without fine-tuning",
                       description="The paper's claim at a scale this machine trains: a ViM on scikit-learn's digits "
                                   "(cached), test top-1 of dense / align / relabel / self / mask at keep 0.9..0.3 and "
                                   "four importance metrics, then align and relabel fine-tuned briefly; fidelity of "
                                   "remaining tokens on the trained model and on random-init ViM-S and PlainMamba-L3.")
    z.add_argument("--cache", type=Path, default=None, help="weights cache folder (default OUT/cache)")
    z.add_argument("--seed", type=int, default=0, help="training seed (the train/test split stays fixed; default 0)")
    v = sub.add_parser("visualize", parents=[common], help="kept tokens per stage and class-token attention maps",
                       description="Figures like the paper's Fig. A1 and Fig. 3 (dense / align / relabel).")
    v.add_argument("--image", default=None, help="an image file (default: digits test images)")
    v.add_argument("--model", default=None, help="vim_tiny or vim_small (default: the trained digits ViM)")
    v.add_argument("--checkpoint", default=None, help="official weights for --model")
    v.add_argument("--cache", type=Path, default=None, help="weights cache folder (default OUT/cache)")
    args = parser.parse_args(argv)

    try:
        results = _run(args)
    except (ValueError, TypeError) as exc:      # bad arguments: say which, no traceback
        parser.error(str(exc))
    lines = verdicts(results)
    print("\nVerdicts:")
    print("\n".join(text for _, text in lines))
    name = {"zero-shot": "zero_shot_run.json", "visualize": "visualize.json"}.get(args.command, f"{args.command}.json")
    path = _write(results, args.out, name if args.command else "results.json")
    print(f"\nResults written to {path.resolve()}")
    return 0 if all(ok for ok, _ in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
