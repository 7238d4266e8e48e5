"""``python -m alignscan.bench``: the main job and its subcommands (see --help).

Exit status: 2 for a usage error (argparse's, or one of the explicit argument checks run
before any work: --out, --threads, --batch, --backend / $ALIGNSCAN_BACKEND, --image, ...);
1 when a correctness verdict fails (a kernel off the reference, a FLOPs count off the
paper), or, with --strict, a timing verdict; 0 otherwise. A timing verdict that misses is
timed again (interleaved) before it is reported as missed. Any other error is a bug and
shows its traceback.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from alignscan.bench.checks import plain_checks, settle_timing, verdicts
from alignscan.outputs import write_json

DEFAULT_OUT = Path("bench_out")
COMMANDS = ("kernels", "flops", "models", "zero-shot", "visualize", "evaluate", "finetune")
SMOKE = "SMOKE TEST (--quick): tiny sizes, the numbers show that it runs, not how it performs"


class UsageError(Exception):
    """A bad argument found by the explicit checks: reported like argparse's errors (exit 2)."""


def _versions():
    import numba
    import numpy
    out = {"python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__}
    try:
        import torch
        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    return out


def _machine():
    import numba
    return {"machine": platform.machine(), "processor": _cpu_model() or platform.processor() or platform.machine(),
            "instruction_set": instruction_set(), "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "threading_layer": _threading_layer(), "versions": _versions()}


def instruction_set():
    """The widest x86 vector extension the CPU has ("AVX-512", "AVX2", "AVX", "SSE"), or the
    machine's architecture elsewhere: timing ratios change with it."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        flags = []
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse2", "SSE")):
        if flag in flags:
            return name
    return platform.machine()


def _peak_memory():
    """Peak resident memory of this process and of its finished children (the scaling
    measurements run in their own processes), in GB (Linux reports ru_maxrss in KiB)."""
    import resource
    scale = 1e9 if sys.platform == "darwin" else 1e6
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
            "children_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale}


def _cpu_model():
    """The CPU's model name (Linux: /proc/cpuinfo), else None."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _threading_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def set_threads(threads):
    """numba's threads (clipped to 1..NUMBA_NUM_THREADS) and torch's, the same number."""
    import numba
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        import torch
        torch.set_num_threads(numba.get_num_threads())
    except ImportError:
        pass


def _set_threads(args):
    set_threads(args.threads)


def backend_and_device(requested):
    """(backend name, "cpu" or "cuda") for --backend (else $ALIGNSCAN_BACKEND, else the CPU
    default), checked by the one registry; raises UsageError naming the option or variable."""
    from alignscan import bridges  # noqa: F401  (registers the "torch" backend)
    from alignscan.cuda_kernels import backends
    name = requested if requested is not None else os.environ.get(backends.ENV_BACKEND) or None
    try:
        if name is None:
            return backends.resolve(None, "cpu"), "cpu"
        what = "--backend" if requested is not None else f"the environment variable {backends.ENV_BACKEND}"
        entry = backends.get(name, what=what)
        device = "cuda" if entry.device == "cuda" else "cpu"
        return backends.resolve(name, device), device
    except (ValueError, backends.BackendUnavailable) as exc:
        raise UsageError(str(exc)) from None


# --- the subcommands ---------------------------------------------------------------------

def run_kernels(args):
    """The kernel table for every backend that can run here, the performance checks, a plot."""
    import numba
    import numpy as np

    from alignscan import cuda_kernels as K
    from alignscan.bench.kernels import (
        exp_floor_seconds,
        format_table,
        kernel_table,
        performance_checks,
        plot_times,
    )
    status = K.available_backends()
    untimed = [name for name in status if not K.backends.get(name).timed]
    backends = ["reference"] + [name for name, reason in status.items() if reason is None and name not in untimed]
    quick = args.quick
    shape = dict(batch=1, dim=96) if quick else dict(batch=8, dim=768)
    rows = kernel_table(backends=backends, keep_ratios=(1.0, 0.7) if quick else (1.0, 0.7, 0.5),
                        dtype=np.float32, repeats=2 if quick else 5, **shape)
    if quick:
        print(SMOKE)
    print(f"Kernel table (one ViM-S scan layer: {rows[0]['shape']}, float32 inputs, median wall time "
          f"[min, max] over the repeats, {numba.get_num_threads()} numba thread(s)):")
    print(format_table(rows))
    for name, reason in status.items():
        if reason is not None:
            print(f"  (not run: {name}: {reason})")
        elif name in untimed:
            print(f"  (not timed: {name}: {K.backends.get(name).purpose})")
    # At --quick sizes a call takes microseconds and overhead decides the ratios: no checks.
    floors = {} if quick else exp_floor_seconds(**shape)
    checks = [] if quick else performance_checks(rows, floors, **shape)
    if floors:
        print("One exp per state element: " + ", ".join(f"{k}.exp {1e3 * v:.1f} ms" for k, v in floors.items()))
    results = {"kernels": rows, "performance_checks": checks, "exp_floor_s": floors,
               "backends": {k: v or "available" for k, v in status.items()}}
    if not quick:
        from alignscan.bench.bridges_bench import bridge_checks, bridge_rows
        print("\nThe torch op (bridges.selective_scan_fn, numba-cpu) against its autograd twin and the bare kernel...")
        bridge = bridge_rows()
        for name, seconds in bridge["seconds"].items():
            print(f"  {name:<16} {1e3 * seconds:10.2f} ms")
        results["bridge"] = bridge
        results["performance_checks"] = checks + bridge_checks(bridge)
    plot = plot_times(rows, args.out / "kernels_time_vs_keep.png", quick=quick)
    print(f"Plot: {plot.resolve()}")
    if not quick:
        from alignscan.bench.scaling import format_scaling, plot_scaling, scaling_table
        print("\nScaling of numba-cpu: threads (1 to all cores) at batch 1 and 8; tokens 197 to 262,144, each in a "
              "fresh process for its peak memory...")
        scaling = scaling_table()
        print(format_scaling(scaling))
        results["scaling"] = {k: v for k, v in scaling.items() if k != "checks"}
        results["performance_checks"] += scaling["checks"]
        print(f"Plot: {plot_scaling(scaling, args.out / 'kernels_scaling.png').resolve()}")
    return results


def run_flops(args):
    from alignscan.bench.models_bench import flops_checks, flops_rows, format_flops
    rows = flops_rows()
    print("\nFLOPs (GMACs as the paper counts them; pruned = paper preset) beside the paper's Table 1:")
    print(format_flops(rows))
    result = {"flops": rows, "performance_checks": flops_checks(rows)}
    if getattr(args, "counted", False):
        from alignscan.bench.models_bench import counted_rows, format_counted
        img = 64 if args.quick else 224
        result["counted"] = counted_rows(img)
        print(f"\nWhat torch's FlopCounterMode counts over one forward ({img}x{img}, batch 1; the scan op by its "
              f"registered formula, mamba_ssm's convention, not MACs):")
        print(format_counted(result["counted"]))
    return result


def run_models(args):
    import numba

    from alignscan.bench.models_bench import format_throughput, throughput, throughput_checks
    backend, device = args.backend_device
    img, batch, repeats = (64, 2, 1) if args.quick else (224, args.batch, 5)
    rows = throughput(batch=batch, img=img, repeats=repeats, backend=backend, device=device)
    if args.quick:
        print(SMOKE)
    print(f"\nThroughput ({device}, backend {backend}, float32, {img}x{img}, batch {batch}, "
          f"{numba.get_num_threads()} thread(s), median of {repeats} interleaved rounds):")
    print(format_throughput(rows))

    def remeasure(name, modes):
        again = throughput(names=(name,), modes=modes, batch=batch, img=img, repeats=repeats + 2, backend=backend,
                           device=device, progress=False)
        return {r["mode"]: r["images_per_s"] for r in again}
    return {"throughput": rows, "performance_checks": [] if args.quick else throughput_checks(rows, remeasure)}


def run_zero_shot(args):
    from alignscan.science import zero_shot
    result = zero_shot.run(args.out, quick=args.quick, cache_dir=args.cache, seed=args.seed, tasks=args.tasks,
                           seeds=args.seeds, jobs=args.jobs)
    print()
    print((args.out / "zero_shot.md").read_text())
    print(f"Table: {(args.out / 'zero_shot.md').resolve()}")
    for figure in result["figures"]:
        print(f"Plot: {Path(figure).resolve()}")
    return {"zero_shot": {k: v for k, v in result.items() if k not in ("rows", "paired", "fidelity")},
            "details": str((args.out / "zero_shot.json").resolve())}


def run_visualize(args):
    from alignscan.science import visualize
    result = visualize.run(args.out, image_path=args.image, model_name=args.model, checkpoint=args.checkpoint,
                           quick=args.quick, cache_dir=args.cache)
    print("Figures (" + result["weights"] + "):")
    for path in result["figures"]:
        print(f"  {Path(path).resolve()}")
    return {"visualize": result}


def run_evaluate(args):
    from alignscan import imagenet
    return {"evaluate": imagenet.evaluate_command(args)}


def run_finetune(args):
    from alignscan import imagenet
    return {"finetune": imagenet.finetune_command(args)}


def _serialisable(results):
    if "performance_checks" not in results:
        return results
    return {**results, "performance_checks": plain_checks(results["performance_checks"])}


def _run(args):
    """The results of the chosen subcommand (or of the main job: kernels, then FLOPs)."""
    runners = {"flops": run_flops, "models": run_models, "zero-shot": run_zero_shot, "visualize": run_visualize,
               "evaluate": run_evaluate, "finetune": run_finetune}
    if args.command in runners:
        return runners[args.command](args)
    results = run_kernels(args)
    if args.command == "kernels":
        return results
    flops = run_flops(args)
    results["flops"] = flops["flops"]
    results["performance_checks"] = results["performance_checks"] + flops["performance_checks"]
    return results


# --- arguments -------------------------------------------------------------------------------

def _add_common(parser, suppress):
    """--quick, --out, --threads, --strict; on subcommands with SUPPRESS defaults, so that an
    option given before the subcommand is not overwritten by the subcommand's default."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--quick", action="store_true", default=default(False),
                        help="tiny sizes: a smoke test that finishes in well under a minute")
    parser.add_argument("--out", type=Path, default=default(DEFAULT_OUT), help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=default(1),
                        help="numba and torch threads (default 1: ratios comparable to single-threaded NumPy)")
    parser.add_argument("--strict", action="store_true", default=default(False),
                        help="a missed timing goal also makes the exit status 1 (by default only correctness does)")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m alignscan.bench", description=(
        "alignscan benchmarks. With no subcommand, the main job: the kernel table for every backend that runs "
        "here, the FLOPs table, a verdict per check, results JSON and plots in --out. Options may come before or "
        "after the subcommand."))
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def add(name, **kwargs):
        p = sub.add_parser(name, **kwargs)
        _add_common(p, suppress=True)
        return p
    add("kernels", help="backend x alignment x keep ratio: time, speed-up over keep 1.0, deviation from the reference",
        description="The kernel table, the numba-cpu performance checks at the ViM-S layer shape, the torch op against "
                    "its autograd twin and the bare kernel, and how numba-cpu scales with threads and tokens.")
    f = add("flops", help="FLOPs of the five models, dense and pruned, beside the paper",
            description="GFLOPs by the paper's two counting recipes with real per-layer token counts; with --counted "
                        "also what torch's FlopCounterMode counts over a real forward of each model.")
    f.add_argument("--counted", action="store_true",
                   help="also run each model once under torch's FlopCounterMode (224 px; 64 with --quick)")
    m = add("models", help="images/s of dense, align and relabel (ViM-S, PlainMamba-L3)",
            description="Model throughput with the paper presets; on a GPU use --backend cupy --batch 64.")
    m.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    m.add_argument("--backend", default=None, help="scan backend (default $ALIGNSCAN_BACKEND, else by device)")
    z = add("zero-shot", help="the alignment on trial: small ViMs (digits, scan distance) pruned without fine-tuning",
            description="Small ViMs trained here (cached): on scikit-learn's digits and on a generated task where the "
                        "distance along the scan decides the label. Zero-shot top-1 of dense / align / hold / self / "
                        "relabel / mask at keep 0.9..0.3, with ViM's conv compact or position-aware, and the kept "
                        "tokens chosen by each mode, once by the dense model, at random, or (distance task) among "
                        "background tokens only; paired McNemar tests of align, hold and relabel on the same images; "
                        "on digits also importance metrics, brief fine-tuning and fidelity.")
    z.add_argument("--cache", type=Path, default=None, help="weights cache folder (default OUT/cache)")
    z.add_argument("--seed", type=int, default=0, help="training seed (the train/test split stays fixed; default 0)")
    z.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, e.g. 0,1,2,3,4: every task is trained and run once per seed, "
                        "and the span contrasts are tested across the seeds that reach their bar (default: --seed)")
    z.add_argument("--jobs", type=int, default=1,
                   help="how many (task, seed) jobs run at once, each in its own process with --threads shared out "
                        "(at least 1 each); 2 with --threads 2 keeps both cores busy where one process's small "
                        "ops leave one idle (default 1: one after the other)")
    z.add_argument("--tasks", default="digits,distance",
                   help="comma-separated tasks: digits, distance, heldout (the distance task with test mark pairs "
                        "never seen in training, trained to a 95 %% bar; default digits,distance)")
    v = add("visualize", help="kept tokens per stage and class-token attention maps",
            description="Figures like the paper's Fig. A1 and Fig. 3 (dense / align / relabel).")
    v.add_argument("--image", default=None, help="an image file (default: digits test images)")
    v.add_argument("--model", default=None, help="vim_tiny or vim_small (default: the trained digits ViM)")
    v.add_argument("--checkpoint", default=None, help="official weights for --model")
    v.add_argument("--cache", type=Path, default=None, help="weights cache folder (default OUT/cache)")
    from alignscan import imagenet
    imagenet.add_evaluate_arguments(add("evaluate", help=imagenet.EVALUATE_HELP, description=imagenet.EVALUATE_DOC))
    imagenet.add_finetune_arguments(add("finetune", help=imagenet.FINETUNE_HELP, description=imagenet.FINETUNE_DOC))
    return parser


def _check_out(out):
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create or write there ({exc.strerror or exc})") from None


def check_arguments(args):
    """Every explicit argument check, before any work (UsageError on the first bad one)."""
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    _check_out(args.out)
    if getattr(args, "batch", 1) < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    from alignscan.cuda_kernels import backends
    if args.command in ("models", "evaluate", "finetune") or getattr(args, "backend", None) is not None:
        args.backend_device = backend_and_device(getattr(args, "backend", None))
    elif os.environ.get(backends.ENV_BACKEND):       # validated the same way everywhere, naming the variable
        backend_and_device(None)
    if args.command == "zero-shot":
        from alignscan.science.zero_shot import TASK_CONFIGS
        tasks = tuple(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
        unknown = [t for t in tasks if t not in TASK_CONFIGS]
        if not tasks or unknown:
            raise UsageError(f"--tasks must name one or more of {', '.join(TASK_CONFIGS)}, got {args.tasks!r}")
        args.tasks = tasks
        if args.seeds is not None:
            try:
                seeds = tuple(dict.fromkeys(int(t) for t in args.seeds.split(",") if t.strip()))
            except ValueError:
                seeds = ()
            if not seeds or min(seeds) < 0:
                raise UsageError(f"--seeds must be comma-separated non-negative integers, got {args.seeds!r}")
            args.seeds = seeds
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.command == "visualize":
        if args.image is not None and not Path(args.image).is_file():
            raise UsageError(f"--image must be an existing image file (PNG or JPEG), got {args.image!r}")
        from alignscan import registry
        if args.model is not None and args.model not in registry.names("vim"):
            raise UsageError(f"--model must be a ViM (the class-token attention needs one): "
                             f"{' or '.join(registry.names('vim'))}, got {args.model!r}")
        if args.checkpoint is not None and not Path(args.checkpoint).is_file():
            raise UsageError(f"--checkpoint must be an existing file, got {args.checkpoint!r}")
    if args.command in ("evaluate", "finetune"):
        from alignscan import imagenet
        try:
            imagenet.check_arguments(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except UsageError as exc:
        parser.error(str(exc))
    _set_threads(args)
    from alignscan.imagenet.options import DataError
    try:
        results = _run(args)
    except DataError as exc:          # the user's data, checkpoint or folder: one line, exit 2 (1 is for bugs)
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    settle_timing(results.get("performance_checks", []))
    lines = verdicts(results)
    if lines:
        print("\nVerdicts:")
        print("\n".join(text for _, _, text in lines))
    correctness_ok = all(ok for ok, kind, _ in lines if kind != "timing")
    timing_ok = all(ok for ok, kind, _ in lines if kind == "timing")
    if not timing_ok:
        print("A timing goal was missed (after timing it again); timing verdicts set the exit status only with "
              "--strict." + (" --strict is on." if args.strict else ""))
    if os.environ.get("RANK", "0") != "0":              # under torchrun, rank 0 alone writes the record
        return 0 if correctness_ok else 1
    # the record of this run; evaluate/finetune write their own results file, so theirs is named *_run.json
    name = {"zero-shot": "zero_shot_run.json", "visualize": "visualize.json", "evaluate": "evaluate_run.json",
            "finetune": "finetune_run.json"}.get(args.command, f"{args.command}.json")
    path = args.out / (name if args.command else "results.json")
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "backend_device"}
    write_json(path, {"arguments": arguments, "quick": args.quick, "smoke_test": SMOKE if args.quick else None,
                      "machine": _machine(), "memory": _peak_memory(), **_serialisable(results)})
    print(f"\nResults written to {path.resolve()}")
    return 0 if correctness_ok and (timing_ok or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
