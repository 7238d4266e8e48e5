"""`evaluate --shared-selection MODE`: every pruned mode scans exactly the tokens MODE's model
selects, so the modes differ by their scan alone; per-image predictions are saved beside the
JSON; the paired tests are Holm-corrected; one process and two under torchrun agree image by
image."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from alignscan import cli, models
from alignscan.imagenet import data as imagenet_data
from tests.imagenet.test_imagenet import official_files

MODES = "dense,align,relabel"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder, checkpoint = official_files(tmp_path_factory.mktemp("shared"), classes=3, per_class=3)
    return folder, checkpoint


def _argv(files, out):
    folder, checkpoint = files
    return ["evaluate", "--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data", str(folder), "--img-size",
            "64", "--keep", "0.5", "--modes", MODES, "--shared-selection", "align", "--batch", "4", "--workers", "0",
            "--out", str(out)]


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert cli.main(_argv(files, out)) == 0
    return out


def _model(mode, checkpoint):
    pruning = None if mode == "dense" else models.paper_preset("vim_tiny", mode=mode, keep_ratio=0.5)
    return models.load_checkpoint(models.create("vim_tiny", pruning=pruning, num_classes=3, img_size=64),
                                  checkpoint).eval()


def test_every_mode_scans_the_selecting_modes_tokens(files, one_process):
    folder, checkpoint = files
    saved = np.load(one_process / "evaluate_images.npz")
    assert list(saved["modes"]) == MODES.split(",") and saved["evaluated"].all()
    found = imagenet_data.image_folder(folder)
    assert list(saved["path"]) == [p for p, _ in found.samples] and list(saved["label"]) == found.targets
    x = torch.stack([imagenet_data.eval_transform(64)(found.loader(p)) for p, _ in found.samples])
    with torch.no_grad():
        align_logits, kept = _model("align", checkpoint)(x, return_kept=True)
        relabel_on_align_tokens = _model("relabel", checkpoint)(x, keep_plan=kept)
    top = lambda logits: logits.topk(3, dim=-1).indices.numpy()
    assert (saved["top5"][:, 1, :3] == top(align_logits)).all()
    assert (saved["top5"][:, 2, :3] == top(relabel_on_align_tokens)).all()
    summary = json.loads((one_process / "evaluate.json").read_text())
    assert summary["shared_selection"] == "align" and "scan's alone" in (one_process / "evaluate.md").read_text()
    paired = summary["paired"]
    assert {(p["a"], p["b"]) for p in paired} == {("dense", "relabel"), ("align", "dense"), ("align", "relabel"),
                                                  ("relabel", "dense")}
    assert all(p["p_value"] <= p["p_holm"] <= 1 for p in paired)


def test_two_processes_under_torchrun_give_the_same_images_and_tests(files, one_process, tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", "-m", "alignscan", *_argv(files, tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one, two = np.load(one_process / "evaluate_images.npz"), np.load(tmp_path / "evaluate_images.npz")
    for key in ("modes", "path", "label", "evaluated", "top5"):
        assert (one[key] == two[key]).all(), key
    a, b = (json.loads((d / "evaluate.json").read_text()) for d in (one_process, tmp_path))
    assert b["world_size"] == 2 and a["paired"] == b["paired"]
    assert [(r["mode"], r["correct"]) for r in a["results"]] == [(r["mode"], r["correct"]) for r in b["results"]]


def test_the_selecting_mode_must_be_a_pruned_mode_of_the_run(files, tmp_path, capsys):
    argv = _argv(files, tmp_path)
    argv[argv.index("align", argv.index("--shared-selection"))] = "hold"
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and "--shared-selection" in capsys.readouterr().err
