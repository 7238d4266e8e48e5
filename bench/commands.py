"""The measurements the command line runs: the kernel table, the FLOPs table, model
throughput, and the main job (the first two together). Each prints its tables as it goes
and returns a results dict whose "performance_checks" the command line turns into verdicts
(``alignscan.bench.checks``)."""
from __future__ import annotations

__all__ = ["main_job", "kernels", "flops", "models", "SMOKE"]

SMOKE = "SMOKE TEST (--quick): tiny sizes, the numbers show that it runs, not how it performs"


def main_job(out, quick=False):
    """The kernel table, then the FLOPs table: every check the project makes of its speed and
    of its FLOP counts against the paper."""
    results = kernels(out, quick=quick)
    counts = flops(quick=quick)
    results["flops"] = counts["flops"]
    results["performance_checks"] = results["performance_checks"] + counts["performance_checks"]
    return results


def kernels(out, quick=False):
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
    plot = plot_times(rows, out / "kernels_time_vs_keep.png", quick=quick)
    print(f"Plot: {plot.resolve()}")
    if not quick:
        from alignscan.bench.scaling import format_scaling, plot_scaling, scaling_table
        print("\nScaling of numba-cpu: threads (1 to all cores) at batch 1 and 8; tokens 197 to 262,144, each in a "
              "fresh process for its peak memory...")
        scaling = scaling_table()
        print(format_scaling(scaling))
        results["scaling"] = {k: v for k, v in scaling.items() if k != "checks"}
        results["performance_checks"] += scaling["checks"]
        print(f"Plot: {plot_scaling(scaling, out / 'kernels_scaling.png').resolve()}")
    return results


def flops(quick=False, counted=False):
    from alignscan.bench.models_bench import flops_checks, flops_rows, format_flops
    rows = flops_rows()
    print("\nFLOPs (GMACs as the paper counts them; pruned = paper preset) beside the paper's Table 1:")
    print(format_flops(rows))
    result = {"flops": rows, "performance_checks": flops_checks(rows)}
    if counted:
        from alignscan.bench.models_bench import counted_rows, format_counted
        img = 64 if quick else 224
        result["counted"] = counted_rows(img)
        print(f"\nWhat torch's FlopCounterMode counts over one forward ({img}x{img}, batch 1; the scan op by its "
              f"registered formula, mamba_ssm's convention, not MACs):")
        print(format_counted(result["counted"]))
    return result


def models(backend, device, quick=False, batch=8):
    import numba

    from alignscan.bench.models_bench import format_throughput, throughput, throughput_checks
    img, batch, repeats = (64, 2, 1) if quick else (224, batch, 5)
    rows = throughput(batch=batch, img=img, repeats=repeats, backend=backend, device=device)
    if quick:
        print(SMOKE)
    from alignscan.bridges import resolve_backend
    print(f"\nThroughput ({device}, backend {resolve_backend(device, backend)}, float32, {img}x{img}, batch {batch}, "
          f"{numba.get_num_threads()} thread(s), median of {repeats} interleaved rounds):")
    print(format_throughput(rows))

    def remeasure(name, modes):
        again = throughput(names=(name,), modes=modes, batch=batch, img=img, repeats=repeats + 2, backend=backend,
                           device=device, progress=False)
        return {r["mode"]: r["images_per_s"] for r in again}
    return {"throughput": rows, "performance_checks": [] if quick else throughput_checks(rows, remeasure)}
