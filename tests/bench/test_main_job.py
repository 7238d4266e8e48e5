"""The main job runs end to end in --quick mode and writes what it says it writes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import reference as R
from bench.kernels import kernel_table
from bench.problems import vim_layer_problem

REPO = Path(__file__).resolve().parents[2]


def test_quick_main_job_writes_results_and_plot(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["kernels"]
    assert {r["backend"] for r in rows} >= {"reference", "numba-cpu"}
    assert all(r["within_tolerance"] for r in rows)
    assert (tmp_path / "kernels_time_vs_keep.png").stat().st_size > 1000
    assert "[PASS]" in run.stdout and "[FAIL]" not in run.stdout


def test_kernel_table_deviation_is_the_library_deviation():
    """The table's numbers come from the library: recompute one row's deviation by hand."""
    (row,) = kernel_table(backends=("numba-cpu",), alignments=("prev",), keep_ratios=(0.7,), batch=1, dim=16,
                          repeats=1, backward=False, progress=False)
    p = vim_layer_problem(batch=1, dim=16, keep_ratio=0.7, alignment="prev", dtype=np.float32)
    import cuda_kernels as K
    out = K.selective_scan_fwd(**p.kwargs(return_last_state=False))
    assert row["max_rel_dev"] == R.max_deviation(out, R.selective_scan(**p.kwargs(return_last_state=False)))[1]
    assert row["tokens"] == p.u.shape[2]


def test_every_subcommand_has_help():
    for args in (["--help"], ["kernels", "--help"]):
        run = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0 and "usage" in run.stdout


def test_flops_subcommand_prints_the_library_numbers(tmp_path):
    import models
    run = subprocess.run([sys.executable, "-m", "bench", "flops", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "flops.json").read_text())["flops"]
    assert [r["model"] for r in rows] == list(models.NAMES)
    for r in rows:
        assert r["dense_gflops"] == models.flops(r["model"])
        assert r["pruned_gflops"] == models.flops(r["model"], models.paper_preset(r["model"]))


def test_models_subcommand_quick(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "models", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "models.json").read_text())["throughput"]
    assert {(r["model"], r["mode"]) for r in rows} == {(m, k) for m in ("vim_small", "plainmamba_l3")
                                                      for k in ("dense", "align", "relabel")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_every_subcommand_help():
    for sub in ("flops", "models"):
        run = subprocess.run([sys.executable, "-m", "bench", sub, "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and "usage" in run.stdout
