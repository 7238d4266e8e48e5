"""The main job runs end to end in --quick mode and writes what it says it writes."""
import json
import subprocess
import sys

import numpy as np
import pytest

from alignscan import reference as R
from alignscan.bench.kernels import kernel_table
from alignscan.testing import vim_layer_problem
from tests import REPO


def test_quick_main_job_writes_results_and_plot(tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
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
    from alignscan import cuda_kernels as K
    out = K.selective_scan_fwd(**p.kwargs(return_last_state=False))
    assert row["max_rel_dev"] == R.max_deviation(out, R.selective_scan(**p.kwargs(return_last_state=False)))[1]
    assert row["tokens"] == p.u.shape[2]


def test_every_subcommand_has_help():
    for args in (["--help"], ["kernels", "--help"]):
        run = subprocess.run([sys.executable, "-m", "alignscan", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0 and "usage" in run.stdout


def test_flops_subcommand_prints_the_library_numbers(tmp_path):
    from alignscan import models
    run = subprocess.run([sys.executable, "-m", "alignscan", "flops", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "flops.json").read_text())["flops"]
    assert [r["model"] for r in rows] == list(models.NAMES)
    for r in rows:
        assert r["dense_gflops"] == models.flops(r["model"])
        assert r["pruned_gflops"] == models.flops(r["model"], models.paper_preset(r["model"]))


def test_flops_counted_runs_every_model_under_the_counter(tmp_path):
    from alignscan import models
    run = subprocess.run([sys.executable, "-m", "alignscan", "flops", "--quick", "--counted", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "flops.json").read_text())["counted"]
    assert [(r["model"], r["pruning"]) for r in rows] == [(n, p) for n in models.NAMES for p in ("dense", "paper preset")]
    for r in rows:
        model = models.create(r["model"], pruning=models.paper_preset(r["model"]) if r["pruning"] != "dense" else None,
                              img_size=64)
        assert r["img_size"] == 64 and r["recipe_gflops"] == models.flops(model)
        assert r["counter_matmul_conv_gmacs"] > 0 and r["counter_scan_g"] > 0
    assert "FlopCounterMode" in run.stdout


def test_models_subcommand_quick(tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan", "models", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "models.json").read_text())["throughput"]
    assert {(r["model"], r["mode"]) for r in rows} == {(m, k) for m in ("vim_small", "plainmamba_l3")
                                                      for k in ("dense", "align", "relabel")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_every_subcommand_help():
    for sub in ("flops", "models"):
        run = subprocess.run([sys.executable, "-m", "alignscan", sub, "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and "usage" in run.stdout


def _bench(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "alignscan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_options_before_the_subcommand_are_honoured(tmp_path):
    run = _bench("--quick", "--out", str(tmp_path / "D"), "--threads", "2", "flops")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "D" / "flops.json").read_text())
    assert result["quick"] is True and result["arguments"]["threads"] == 2
    assert result["machine"]["numba_threads"] == 2
    assert set(result["machine"]["versions"]) >= {"python", "numpy", "numba", "torch"}
    assert result["machine"]["instruction_set"] in ("AVX-512", "AVX2", "AVX", "SSE") or result["machine"]["machine"]
    assert 0.05 < result["memory"]["peak_rss_gb"] < 24                 # the run's own peak, recorded


def test_a_bad_out_folder_is_a_usage_error_before_any_work():
    import time
    t0 = time.monotonic()
    run = _bench("bench", "--out", "/proc/x", "--quick")
    assert run.returncode == 2 and "--out" in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - t0 < 5


def test_bad_threads_and_a_bad_backend_variable_are_usage_errors(tmp_path):
    run = _bench("--threads", "0", "flops", "--out", str(tmp_path))
    assert run.returncode == 2 and "--threads must be >= 1" in run.stderr
    env = {**__import__("os").environ, "ALIGNSCAN_BACKEND": "bogus"}
    for command in ("kernels", "models"):
        run = _bench(command, "--quick", "--out", str(tmp_path), env=env)
        assert run.returncode == 2 and "ALIGNSCAN_BACKEND" in run.stderr and "Traceback" not in run.stderr, command


def test_an_error_inside_a_run_is_not_hidden_as_a_usage_error(tmp_path, monkeypatch):
    from alignscan import cli

    def broken(args, backend):
        raise ValueError("a bug inside the run")
    monkeypatch.setattr(cli, "run_flops", broken)
    with pytest.raises(ValueError, match="a bug inside the run"):
        cli.main(["flops", "--out", str(tmp_path)])


def _fake_timing_check(values):
    from alignscan.bench.checks import timing_check
    values = iter(values)
    first = next(values)
    return timing_check("a ratio", first, "<= 1.10", lambda v: v <= 1.10, lambda: next(values))


@pytest.mark.parametrize("values,strict,code,passed", [((1.18, 1.04), False, 0, True), ((1.18, 1.20), False, 0, False),
                                                        ((1.18, 1.20), True, 1, False)])
def test_a_missed_timing_goal_is_timed_again_and_fails_only_with_strict(tmp_path, monkeypatch, capsys, values,
                                                                         strict, code, passed):
    from alignscan import cli
    monkeypatch.setattr(cli, "run_flops", lambda args, backend: {"performance_checks": [_fake_timing_check(values)]})
    argv = ["flops", "--out", str(tmp_path)] + (["--strict"] if strict else [])
    assert cli.main(argv) == code
    out = capsys.readouterr().out
    assert "first measured 1.18, timed again" in out
    check = json.loads((tmp_path / "flops.json").read_text())["performance_checks"][0]
    assert check["passed"] is passed and check["first_value"] == 1.18 and check["kind"] == "timing"
    if not passed:
        assert "only with --strict" in out


def test_no_command_prints_the_help_and_runs_nothing(tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage: alignscan" in run.stdout and "bench" in run.stdout
    assert not list(tmp_path.iterdir())          # no bench_out: nothing ran


def test_the_console_script_is_the_same_command_line():
    from importlib import metadata
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "alignscan"]
    assert script.value == "alignscan.cli:main"
    import shutil
    path = shutil.which("alignscan")
    if path is None:
        pytest.skip("the alignscan script is not on PATH (not installed with pip)")
    run = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: alignscan" in run.stdout
