"""What the science tests share: a digits configuration small enough to train in seconds,
and the main job's command line run in --quick mode."""
import subprocess
import sys

from alignscan.science.digits import DigitsConfig
from tests import REPO

TINY = DigitsConfig(embed_dim=16, depth=2, epochs=1, train_subset=64, batch_size=32)


def _run(*args, tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan", *args, "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run
