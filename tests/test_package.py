"""One import name: installing the project adds ``alignscan`` and nothing else to
site-packages, no module is importable under two names, and a user's own top-level
``models`` / ``bench`` / ``reference`` packages neither shadow ours nor are shadowed."""
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from tests import REPO

LAYERS = ("reference", "cuda_kernels", "bridges", "models", "bench", "science", "imagenet")

# A forward of a pruned model, the op, and the main job's command line, then what got imported.
_PROBE = textwrap.dedent("""
    import json, sys, torch
    import alignscan
    from alignscan import models
    from alignscan import cli
    model = models.create("vim_tiny", pruning=models.PruningConfig("align", (1,), 0.5), img_size=32, depth=2,
                          num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    cli.build_parser().parse_args(["kernels", "--quick"])
    import os
    root = os.path.dirname(os.path.dirname(os.path.realpath(alignscan.__file__)))
    files = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(root + os.sep):      # ours: one name per file
            files.setdefault(os.path.realpath(path), []).append(name)
    print(json.dumps({"modules": sorted(sys.modules), "twice": {p: n for p, n in files.items() if len(n) > 1},
                      "alignscan": alignscan.__file__, "logits": list(logits.shape),
                      "create": alignscan.create is models.create}))
""")


def _probe(cwd, extra_path=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, extra_path))}
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_no_module_is_imported_under_two_names(tmp_path):
    seen = _probe(tmp_path)
    stray = [m for m in seen["modules"] if m.split(".")[0] in LAYERS]
    assert not stray, f"imported under a top-level name of a layer: {stray[:10]}"
    assert not seen["twice"], seen["twice"]
    assert seen["logits"] == [1, 3] and seen["create"]


def test_a_users_own_models_package_does_not_shadow_ours(tmp_path):
    """A research repository with its own ``models/`` (DeiT, mmcls projects), ``bench.py`` and
    ``reference/`` on the path: ours still load, and theirs stays theirs."""
    theirs = tmp_path / "their_repo"
    for name in ("models", "reference", "cuda_kernels"):
        (theirs / name).mkdir(parents=True)
        (theirs / name / "__init__.py").write_text(f"WHOSE = 'theirs'\nraise ImportError('their {name} loaded')\n")
    (theirs / "bench.py").write_text("raise ImportError('their bench loaded')\n")
    seen = _probe(theirs, extra_path=[theirs])
    assert seen["logits"] == [1, 3]
    assert not [m for m in seen["modules"] if m.split(".")[0] in LAYERS]
    check = subprocess.run([sys.executable, "-c", "import models; print(models.WHOSE)"], cwd=theirs,
                           capture_output=True, text=True, timeout=60)
    assert "their models loaded" in check.stderr          # `import models` is still the user's own


def _source_copy(tmp_path):
    """The checkout copied (links kept), so that building a wheel writes nothing into it."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "bench_out", ".hypothesis", ".pytest_cache", ".benchmarks"))
    return source


def test_the_wheel_holds_one_top_level_name_and_the_cuda_sources(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(_source_copy(tmp_path)), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "No module named" in run.stderr:
        pytest.skip(f"cannot build a wheel here without build isolation: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = tmp_path.glob("alignscan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"alignscan", wheel.name.split("-py")[0] + ".dist-info"}
    for layer in LAYERS:
        assert f"alignscan/{layer}/__init__.py" in names, layer
    assert {"alignscan/cuda_kernels/scan.cu", "alignscan/cuda_kernels/cuda_emu.h"} <= set(names)


def _site_directories():
    """Where this interpreter finds installed packages: its site-packages and, when enabled, the user's."""
    directories = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        directories.append(site.getusersitepackages())
    return directories


@pytest.mark.slow
def test_a_fresh_venv_with_the_wheel_adds_one_name_to_site_packages(tmp_path):
    """`pip install .` (not editable) in a new environment: site-packages gains alignscan and
    its dist-info, and the package works from there (dependencies from this interpreter)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(_source_copy(tmp_path)), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    env_dir = tmp_path / "venv"
    # Not system_site_packages: that inherits the base interpreter's site-packages, which lack
    # torch when this suite itself runs inside a virtualenv.
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this interpreter's site directories, listed as plain paths so
    # that their own .pth files (an editable alignscan among them) are not run and the wheel's
    # copy, earlier on the path, is the alignscan imported.
    (site_packages / "_running_interpreter.pth").write_text("".join(f"{d}\n" for d in _site_directories()))
    before = set(os.listdir(site_packages))
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site_packages), str(wheel),
                    "-q"], check=True, capture_output=True, timeout=300)
    added = set(os.listdir(site_packages)) - before
    # the package, its dist-info, and (pip --target) the `alignscan` console script in bin/
    assert {a for a in added if not a.endswith(".dist-info") and a != "bin"} == {"alignscan"}, added
    run = subprocess.run([python, "-c", "import alignscan, alignscan.models; print(alignscan.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(site_packages)), run.stdout
