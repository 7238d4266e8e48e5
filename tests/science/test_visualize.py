"""The visualize subcommand end to end in --quick mode: its figures, a ViM model on a user's
image, and a missing image as a clear error."""
import subprocess
import sys

import numpy as np

from tests import REPO
from tests.science.helpers import _run


def test_visualize_quick_writes_figures(tmp_path):
    _run("visualize", tmp_path=tmp_path)
    figures = sorted(tmp_path.glob("visualize_*.png"))
    assert len(figures) == 3 and all(f.stat().st_size > 5000 for f in figures)


def test_visualize_with_a_vim_model_and_an_image(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    image = tmp_path / "in.png"
    plt.imsave(image, np.random.default_rng(0).random((40, 40, 3)))
    _run("visualize", "--model", "vim_tiny", "--image", str(image), tmp_path=tmp_path)
    assert (tmp_path / "visualize_0.png").exists()


def test_missing_image_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan", "visualize", "--image", str(tmp_path / "nope.png"),
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "image must be an existing image file" in run.stderr
    assert "Traceback" not in run.stderr
