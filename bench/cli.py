"""``python -m bench``: the main job and its subcommands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path("bench_out")


def _kernels(args):
    import numpy as np

    from bench.kernels import format_table, kernel_table
    backends = ["reference"]
    rows = kernel_table(backends=backends, batch=1, dim=768 if not args.quick else 96,
                        keep_ratios=(1.0, 0.7) if args.quick else (1.0, 0.7, 0.5),
                        dtype=np.float32, repeats=2 if args.quick else 5)
    print("Kernel table (ViM-S layer shape, forward, median wall time):")
    print(format_table(rows))
    return {"kernels": rows}


def _verdicts(results):
    lines = []
    for row in results.get("kernels", []):
        ok = row["within_tolerance"]
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {row['backend']} {row['alignment']} keep {row['keep_ratio']}: "
                     f"max relative deviation {row['max_rel_dev']:.1e} from the {row['judged_against']}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "alignscan benchmarks. With no subcommand: the main job (the kernel table with a "
        "verdict per check), written to --out as JSON."))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, finishes in well under a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    sub = parser.add_subparsers(dest="command")
    k = sub.add_parser("kernels", help="backend x alignment x keep ratio: time and deviation from the reference")
    k.add_argument("--quick", action="store_true", help="tiny sizes")
    k.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)

    results = _kernels(args)
    verdicts = _verdicts(results)
    print("\nVerdicts:")
    print("\n".join(verdicts))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nResults written to {path.resolve()}")
    return 0 if all(v.startswith("[PASS]") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
