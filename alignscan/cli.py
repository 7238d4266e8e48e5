"""The command line: ``alignscan <command>`` or ``python -m alignscan <command>``.

One front door for the library's programs, which are siblings that never import each other:
measurement (``alignscan.bench``: ``bench``, the main job, and ``kernels``, ``flops``,
``models``), the experiments (``alignscan.science``: ``zero-shot``, ``visualize``) and
ImageNet (``alignscan.imagenet``: ``evaluate``, ``finetune``, torchrun-ready). This module
parses and checks the arguments, sets the threads, dispatches with explicit arguments, turns
the checks a command returns into verdicts and writes the run's record (its arguments, the
machine, peak memory and results) to --out. With no command it prints this help.

Exit status: 2 for a usage error (argparse's, or one of the explicit argument checks run
before any work: --out, --threads, --batch, --backend / $ALIGNSCAN_BACKEND, --image, ...) and
for a problem with the user's data, checkpoint or output folder (one line); 1 when a
correctness verdict fails (a kernel off the reference, a FLOPs count off the paper), or,
with --strict, a timing verdict; 0 otherwise. A timing verdict that misses is timed again
(interleaved) before it is reported as missed. Any other error is a bug and shows its
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from alignscan.outputs import write_json
from alignscan.runtime import exit_on_sigterm, machine, peak_memory, set_threads

__all__ = ["main", "build_parser", "check_arguments", "COMMANDS", "UsageError"]

PROG = "alignscan"
DEFAULT_OUT = Path("bench_out")
COMMANDS = ("bench", "kernels", "flops", "models", "zero-shot", "visualize", "evaluate", "finetune")
# The record each command writes in --out; evaluate/finetune write their own results file,
# so theirs is named *_run.json.
RECORDS = {"bench": "results.json", "zero-shot": "zero_shot_run.json", "evaluate": "evaluate_run.json",
           "finetune": "finetune_run.json"}


class UsageError(Exception):
    """A bad argument found by the explicit checks: reported like argparse's errors (exit 2)."""


class Backend:
    """The scan backend of a command that builds models: ``requested`` (--backend, or None:
    each scan call takes the registry's choice for its tensors' device, $ALIGNSCAN_BACKEND
    first), ``device`` (the device type this process runs its models on) and ``name`` (the
    backend that runs there, for the record)."""

    def __init__(self, requested, device, name):
        self.requested, self.device, self.name = requested, device, name


def check_backend(requested, device):
    """The Backend for --backend ``requested`` (or $ALIGNSCAN_BACKEND, or the registry's
    default) on ``device``, checked by the one registry before any work; UsageError naming
    the option or the variable and the device when it cannot run there."""
    from alignscan.cuda_kernels import backends
    where = f" (this process runs its models on {device}"
    where += ": torch sees a GPU)" if device == "cuda" else ": torch sees no GPU)"
    try:
        if requested is not None:
            backends.get(requested, what="--backend")
            return Backend(requested, device, backends.resolve(requested, device))
        return Backend(None, device, backends.resolve(None, device))
    except ValueError as exc:
        raise UsageError(f"{exc}{where}") from None
    except backends.BackendUnavailable as exc:
        raise UsageError(f"{'--backend ' + requested if requested else 'no backend'}: {exc}{where}") from None


# --- the commands: each takes the parsed options and returns its results ----------------------

def run_bench(args, backend):
    from alignscan.bench import commands
    return commands.main_job(args.out, quick=args.quick)


def run_kernels(args, backend):
    from alignscan.bench import commands
    return commands.kernels(args.out, quick=args.quick)


def run_flops(args, backend):
    from alignscan.bench import commands
    return commands.flops(quick=args.quick, counted=args.counted)


def run_models(args, backend):
    from alignscan.bench import commands
    return commands.models(backend.requested, backend.device, quick=args.quick, batch=args.batch)


def run_zero_shot(args, backend):
    from alignscan.science import zero_shot
    result = zero_shot.run(args.out, quick=args.quick, cache_dir=args.cache, seed=args.seed, tasks=args.tasks,
                           seeds=args.seeds, jobs=args.jobs, confirmatory_test=args.confirmatory)
    print()
    print((args.out / "zero_shot.md").read_text())
    print(f"Table: {(args.out / 'zero_shot.md').resolve()}")
    for figure in result["figures"]:
        print(f"Plot: {Path(figure).resolve()}")
    return {"zero_shot": {k: v for k, v in result.items() if k not in ("rows", "paired", "fidelity")},
            "details": str((args.out / "zero_shot.json").resolve())}


def run_visualize(args, backend):
    from alignscan.science import visualize
    result = visualize.run(args.out, image_path=args.image, model_name=args.model, checkpoint=args.checkpoint,
                           quick=args.quick, cache_dir=args.cache)
    print("Figures (" + result["weights"] + "):")
    for path in result["figures"]:
        print(f"  {Path(path).resolve()}")
    return {"visualize": result}


def run_evaluate(args, backend):
    from alignscan import imagenet
    return {"evaluate": imagenet.evaluate_command(args, backend=backend.requested)}


def run_finetune(args, backend):
    from alignscan import imagenet
    return {"finetune": imagenet.finetune_command(args, backend=backend.requested)}


def runner(command):
    """The function that runs ``command``: ``run_<command>`` of this module, looked up when
    called (so that a test can replace one)."""
    return globals()["run_" + command.replace("-", "_")]


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
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "alignscan: token pruning in vision state space models. `alignscan bench` is the main job: the kernel "
        "table for every backend that runs here, the FLOPs table, a verdict per check, results JSON and plots "
        "in --out. Options may come before or after the command."))
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def add(name, **kwargs):
        p = sub.add_parser(name, **kwargs)
        _add_common(p, suppress=True)
        return p
    add("bench", help="the main job: the kernel table, the FLOPs table, a verdict per check",
        description="The kernel table (every backend that runs here), the numba-cpu performance checks, the torch op "
                    "against its autograd twin, thread and token scaling, then the FLOPs of the five models beside "
                    "the paper's Table 1; a verdict per check, results.json and plots in --out.")
    add("kernels", help="backend x alignment x keep ratio: time, speed-up over keep 1.0, deviation from the reference",
        description="The kernel table, the numba-cpu performance checks at the ViM-S layer shape, the torch op against "
                    "its autograd twin and the bare kernel, and how numba-cpu scales with threads and tokens.")
    f = add("flops", help="FLOPs of the five models, dense and pruned, beside the paper",
            description="GFLOPs by the paper's two counting recipes with real per-layer token counts; with --counted "
                        "also what torch's FlopCounterMode counts over a real forward of each model.")
    f.add_argument("--counted", action="store_true",
                   help="also run each model once under torch's FlopCounterMode (224 px; 64 with --quick)")
    m = add("models", help="images/s of dense, align and relabel (ViM-S, PlainMamba-L3)",
            description="Model throughput with the paper presets; on a GPU, larger batches (--batch 64).")
    m.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    m.add_argument("--backend", default=None, help="scan backend (default $ALIGNSCAN_BACKEND, else the registry's choice for the "
                        "device the models run on)")
    z = add("zero-shot", help="the alignment on trial: small ViMs (digits, scan distance) pruned without fine-tuning",
            description="Small ViMs trained here (cached): on scikit-learn's digits and on a generated task where the "
                        "distance along the scan decides the label. Zero-shot top-1 of dense / align / hold / self / "
                        "relabel / mask at keep 0.9..0.3, with ViM's conv compact or position-aware, and the kept "
                        "tokens chosen by each mode, once by the dense model, at random, or (distance task) among "
                        "background tokens only; paired McNemar tests of align, hold and relabel on the same images; "
                        "on digits also importance metrics, brief fine-tuning and fidelity.")
    z.add_argument("--cache", type=Path, default=None, help="weights cache folder (default OUT/cache)")
    z.add_argument("--seed", type=int, default=None, help="training seed (the train/test split stays fixed; default 0)")
    z.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, e.g. 0,1,2,3,4: every task is trained and run once per seed, "
                        "and the span contrasts are tested across the seeds that reach their bar (default: --seed)")
    z.add_argument("--jobs", type=int, default=1,
                   help="how many (task, seed) jobs run at once, each in its own process with --threads shared out "
                        "(at least 1 each); 2 with --threads 2 keeps both cores busy where one process's small "
                        "ops leave one idle (default 1: one after the other)")
    z.add_argument("--tasks", default=None,
                   help="comma-separated tasks: digits, distance, heldout (the distance task with test mark pairs "
                        "never seen in training, trained to a 95 %% bar; default digits,distance)")
    z.add_argument("--confirmatory", action="store_true",
                   help="the pre-registered confirmatory test (science/design.py, CONFIRMATORY) instead: the held-out "
                        "task on the design's seeds and a new draw of test images, the span cells it tests, and the "
                        "gap decay behind align's errors; its seeds and task are the design's, so --seed, --seeds and "
                        "--tasks are refused (with --quick: a tiny model on two seeds)")
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
    """Every explicit argument check, before any work (UsageError on the first bad one).
    Returns the Backend of a command that builds models, or None."""
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    _check_out(args.out)
    if getattr(args, "batch", 1) < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    from alignscan.cuda_kernels import backends
    backend = None
    if args.command in ("models", "evaluate", "finetune"):
        from alignscan.runtime import process_device
        backend = check_backend(getattr(args, "backend", None), process_device())
    elif os.environ.get(backends.ENV_BACKEND):       # validated the same way everywhere, naming the variable
        try:
            backends.get(os.environ[backends.ENV_BACKEND],
                         what=f"the environment variable {backends.ENV_BACKEND}")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.command == "zero-shot":
        from alignscan.science.zero_shot import TASK_CONFIGS
        if args.confirmatory:
            given = [name for name, value in (("--tasks", args.tasks), ("--seeds", args.seeds)) if value is not None]
            given += ["--seed"] if args.seed is not None else []
            if given:
                raise UsageError(f"{', '.join(given)} cannot be given with --confirmatory: the pre-registered design "
                                 f"fixes its task and seeds")
        args.seed = 0 if args.seed is None else args.seed
        args.tasks = "digits,distance" if args.tasks is None else args.tasks
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
    return backend


def _serialisable(results):
    if "performance_checks" not in results:
        return results
    from alignscan.bench.checks import plain_checks
    return {**results, "performance_checks": plain_checks(results["performance_checks"])}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        backend = check_arguments(args)
    except UsageError as exc:
        parser.error(str(exc))
    set_threads(args.threads)
    exit_on_sigterm()
    from alignscan.outputs import FolderInUse
    try:
        with _holding(args.out):
            return _run(args, backend, parser)
    except FolderInUse as exc:
        parser.exit(2, f"{parser.prog}: error: --out {exc}\n")


def _holding(out):
    """This run's hold on --out (rank 0 alone under torchrun: the other ranks write there
    only through it)."""
    import contextlib

    from alignscan.outputs import hold_folder
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return hold_folder(out, " ".join([PROG, *sys.argv[1:]]))


def _run(args, backend, parser):
    from alignscan.imagenet.options import DataError
    try:
        results = runner(args.command)(args, backend)
    except DataError as exc:          # the user's data, checkpoint or folder: one line, exit 2 (1 is for bugs)
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    from alignscan.bench.checks import settle_timing, verdicts
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
    path = args.out / RECORDS.get(args.command, f"{args.command}.json")
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    from alignscan.bench.commands import SMOKE
    write_json(path, {"arguments": arguments, "quick": args.quick, "smoke_test": SMOKE if args.quick else None,
                      "backend": None if backend is None else {"name": backend.name, "device": backend.device,
                                                                  "requested": backend.requested},
                      "machine": machine(),
                      "memory": peak_memory(), **_serialisable(results)})
    print(f"\nResults written to {path.resolve()}")
    return 0 if correctness_ok and (timing_ok or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
