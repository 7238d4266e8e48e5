"""alignscan.bench.gpu_run is ready for a lent GPU: a dry run exercises every step here, with only the
packages the GPU machine's image has (tqdm, matplotlib, SciPy and scikit-learn are blocked),
from the repository root with PYTHONPATH=., and writes its JSON into $OUT."""
import json
import os
import subprocess
import sys
import textwrap

from tests import REPO

NOT_ON_THE_GPU_IMAGE = ("tqdm", "matplotlib", "scipy", "sklearn")


def test_dry_run_needs_only_the_gpu_image_packages_and_writes_its_json_into_OUT(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # Importing a blocked package fails as if it were not installed (its spec is found, so
    # that torch's probes with importlib.util.find_spec still work, but it cannot be loaded).
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.machinery, sys
        class _Loader:
            def create_module(self, spec):
                raise ImportError(f"{{spec.name}} is not on the lent GPU machine's image")
            def exec_module(self, module):
                pass
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {NOT_ON_THE_GPU_IMAGE!r}:
                    return importlib.machinery.ModuleSpec(name, _Loader())
        sys.meta_path.insert(0, _Block())
    """))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), "."]), "OUT": str(out)}
    run = subprocess.run([sys.executable, "-m", "alignscan.bench.gpu_run", "--dry-run", "--budget-s", "240"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for step in ("1/9 GPU tests", "2/9 copy bandwidth", "3/9 kernels", "4/9 model throughput",
                 "5/9 deterministic backward", "6/9 CUDA graph capture", "7/9 the user's commands",
                 "8/9 bf16 autocast", "9/9 an exported pruned model"):
        assert step in run.stdout, f"progress line for {step!r} missing"
    (path,) = out.glob("gpu_*.json")
    result = json.loads(path.read_text())
    assert result["dry_run"] is True
    tests = result["gpu_tests"]
    assert tests["returncode"] == 0 and tests["collected_only"], tests["tail"][-2000:] + tests["stderr_tail"]
    assert "collected" in tests["summary"] and "error" not in tests["summary"], tests["summary"]
    assert {r["alignment"] for r in result["kernels"]} == {"prev", "self", "none", "hold"}
    assert all(r["fwd_s"] > 0 for r in result["kernels"] if "fwd_s" in r)
    assert result["throughput"] and "throughput_error" not in result
    assert result["determinism"]["bit_identical"] is True and result["determinism"]["partials_bytes"] > 0
    assert "needs a CUDA GPU" in result["graphs"]["skipped"]
    # the user's path, with no --backend: the commands ran and named the backend that ran
    commands = result["user_commands"]
    assert commands["passed"] is True, commands
    assert [s["command"] for s in commands["steps"]] == ["evaluate", "finetune"]
    assert all(s["backend"]["name"] == "numba-cpu" and s["backend"]["requested"] is None for s in commands["steps"])
    assert result["half"]["passed"] is True and set(result["half"]["rows"]) >= {"op_float32", "op_bfloat16"}
    assert result["export"]["passed"] is True
    assert result["wall_s"] < 360


def test_without_a_gpu_it_says_so_and_exits_2():
    run = subprocess.run([sys.executable, "-m", "alignscan.bench.gpu_run"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "no GPU for CuPy here" in run.stdout and "--dry-run" in run.stdout
