"""Evaluate and fine-tune on an ImageNet-style folder the test makes (a few classes of a few
PNGs), with a checkpoint in the official layout saved from a randomly initialised model:
one process and torchrun with 2 Gloo processes give the same counts; fine-tuning runs,
resumes from its saved step, and writes a checkpoint that evaluates as the in-memory model;
damaged inputs give clear errors."""
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from alignscan import models
from alignscan.imagenet import data as imagenet_data
from alignscan.imagenet import finetune, options, world

REPO = Path(__file__).resolve().parents[2]


def make_folder(root, classes=3, per_class=4, size=(80, 72), seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for k in range(per_class):
            pixels = (rng.random((size[1], size[0], 3)) * 60 + 60 * c).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{k}.png")
    return root


def save_official(path, name, classes, img_size, seed=0):
    torch.manual_seed(seed)
    model = models.create(name, num_classes=classes, img_size=img_size)
    state = model.state_dict()
    torch.save({"model": state} if name.startswith("vim") else {"state_dict": state}, path)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    folder = make_folder(root / "train")
    checkpoint = root / "vim_tiny_64.pth"
    save_official(checkpoint, "vim_tiny", 3, 64)
    return folder, checkpoint


def _bench(*args, torchrun=False, timeout=600):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"] \
        if torchrun else [sys.executable]
    run = subprocess.run([*prefix, "-m", "alignscan.bench", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    return run


def _steps(path):
    """The step records of a finetune log (the run records between them mark starts and resumes)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_the_folder_reader_follows_imagefolder(data):
    folder = imagenet_data.ImageFolder(data[0])
    assert folder.classes == ["class_00", "class_01", "class_02"] and len(folder) == 12
    assert [label for _, label in folder.samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(imagenet_data.ImageFolder(data[0], limit=2)) == 6
    from PIL import Image
    image = Image.new("RGB", (100, 60))
    assert imagenet_data.eval_transform(image, 64).shape == (3, 64, 64)
    assert imagenet_data.train_transform(image, 64, np.random.default_rng(0)).shape == (3, 64, 64)


def test_evaluate_one_process_and_torchrun_agree(data, tmp_path):
    folder, checkpoint = data
    args = ["evaluate", "--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data", str(folder), "--img-size",
            "64", "--modes", "dense,align,hold,relabel", "--keep", "0.5", "--workers", "0", "--batch", "5"]
    _bench(*args, "--out", str(tmp_path / "one"))
    _bench(*args, "--out", str(tmp_path / "two"), torchrun=True)
    one = json.loads((tmp_path / "one" / "evaluate.json").read_text())
    two = json.loads((tmp_path / "two" / "evaluate.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["results"], two["results"]):
        assert (a["mode"], a["correct"], a["total"], a["top5"]) == (b["mode"], b["correct"], b["total"], b["top5"])
        assert a["total"] == 12
    assert [(p["a"], p["b"], p["both"], p["only_a"], p["only_b"]) for p in one["paired"]] == \
        [(p["a"], p["b"], p["both"], p["only_a"], p["only_b"]) for p in two["paired"]]
    assert {(p["a"], p["b"]) for p in one["paired"]} >= {("align", "dense"), ("align", "relabel")}
    assert (tmp_path / "one" / "evaluate.png").stat().st_size > 1000 and (tmp_path / "one" / "evaluate.md").exists()


def test_the_issue_command_at_224_pixels(tmp_path):
    folder = make_folder(tmp_path / "val", classes=2, per_class=2, size=(256, 240))
    checkpoint = tmp_path / "vim_tiny.pth"
    save_official(checkpoint, "vim_tiny", 2, 224)
    args = ["evaluate", "--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data", str(folder), "--modes",
            "dense,align,relabel", "--workers", "0"]
    _bench(*args, "--out", str(tmp_path / "one"))
    _bench(*args, "--out", str(tmp_path / "two"), torchrun=True)
    counts = [[(r["mode"], r["correct"], r["total"]) for r in json.loads((tmp_path / d / "evaluate.json").read_text())
               ["results"]] for d in ("one", "two")]
    assert counts[0] == counts[1] and counts[0][0][2] == 4


def _finetune_args(folder, checkpoint, out, **over):
    args = Namespace(model="vim_tiny", checkpoint=checkpoint, resume=None, data=folder, mode="align", keep=0.5,
                     conv="compact", metric="clip", epochs=1, max_steps=2, batch=4, workers=0, limit=0, img_size=64,
                     lr=1e-4, min_lr=None, warmup_lr=None, weight_decay=None, warmup_epochs=None, schedule=None,
                     seed=0, backend=None, out=out, backend_device=("numba-cpu", "cpu"), quick=False,
                     from_scratch=False, overwrite=False, skip_unreadable=False)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_finetune_runs_resumes_and_its_checkpoint_evaluates_as_the_model_in_memory(data, tmp_path):
    folder, checkpoint = data
    summary, model = finetune._finetune(_finetune_args(folder, checkpoint, tmp_path / "a", max_steps=1), world.World())
    assert summary["steps"] == 1
    saved = Path(summary["checkpoint"])
    loaded = models.load_checkpoint(models.create("vim_tiny", pruning=models.paper_preset("vim_tiny", keep_ratio=0.5),
                                                  num_classes=3, img_size=64), saved)
    x = torch.stack([imagenet_data.eval_transform(imagenet_data._load_rgb(p), 64) for p, _ in imagenet_data.ImageFolder(folder).samples])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    # resume: continues from the saved step to the next
    resumed, _ = finetune._finetune(_finetune_args(folder, None, tmp_path / "a", resume=saved, max_steps=2),
                                    world.World())
    assert resumed["steps"] == 2
    log = _steps(tmp_path / "a" / "finetune_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    # the checkpoint is in the official layout: `bench evaluate` reads it, with the same answer
    _bench("evaluate", "--model", "vim_tiny", "--checkpoint", str(saved), "--data", str(folder), "--img-size", "64",
           "--modes", "align", "--keep", "0.5", "--workers", "0", "--out", str(tmp_path / "eval"))
    evaluated = json.loads((tmp_path / "eval" / "evaluate.json").read_text())["results"][0]
    reloaded = models.load_checkpoint(models.create("vim_tiny", pruning=models.paper_preset("vim_tiny", keep_ratio=0.5),
                                                    num_classes=3, img_size=64), saved).eval()
    labels = torch.tensor([label for _, label in imagenet_data.ImageFolder(folder).samples])
    with torch.no_grad():
        assert evaluated["correct"] == int((reloaded(x).argmax(-1) == labels).sum())


@pytest.mark.parametrize("torchrun", [False, True], ids=["one process", "torchrun 2"])
def test_finetune_from_the_command_line(data, tmp_path, torchrun):
    folder, checkpoint = data
    _bench("finetune", "--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data", str(folder), "--img-size",
           "64", "--mode", "hold", "--keep", "0.5", "--epochs", "1", "--max-steps", "2", "--batch", "2", "--workers",
           "0", "--out", str(tmp_path), torchrun=torchrun)
    log = _steps(tmp_path / "finetune_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    saved = tmp_path / "checkpoint_vim_tiny_hold.pth"
    models.load_checkpoint(models.create("vim_tiny", num_classes=3, img_size=64), saved)


@pytest.mark.parametrize("torchrun", [False, True], ids=["one process", "torchrun 2"])
def test_the_issue_finetune_command_a_folder_smaller_than_one_batch_still_trains(data, tmp_path, torchrun):
    folder, checkpoint = data
    _bench("finetune", "--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data", str(folder), "--img-size",
           "64", "--epochs", "1", "--limit", "2", "--workers", "0", "--out", str(tmp_path), torchrun=torchrun)
    log = _steps(tmp_path / "finetune_log.jsonl")
    assert [r["step"] for r in log] == [1]                      # 6 images, batch 64: one smaller batch
    models.load_checkpoint(models.create("vim_tiny", num_classes=3, img_size=64),
                           tmp_path / "checkpoint_vim_tiny_align.pth")


def test_clear_errors_for_a_wrong_checkpoint_an_empty_folder_and_unreadable_images(data, tmp_path):
    folder, _ = data
    other = tmp_path / "pm.pth"
    save_official(other, "plainmamba_l1", 3, 64)
    run = subprocess.run([sys.executable, "-m", "alignscan.bench", "evaluate", "--model", "vim_tiny", "--checkpoint", str(other),
                          "--data", str(folder), "--img-size", "64", "--workers", "0", "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "another architecture" in run.stderr
    classes = tmp_path / "ten.pth"
    save_official(classes, "vim_tiny", 10, 64)
    with pytest.raises(ValueError, match="the checkpoint has 10 classes, the data folder 3"):
        options.load_weights(models.create("vim_tiny", num_classes=3, img_size=64), classes, 3)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        imagenet_data.ImageFolder(tmp_path / "empty")
    broken = make_folder(tmp_path / "broken", classes=2, per_class=2)
    (broken / "class_00" / "img_0.png").write_bytes(b"not a png")
    ckpt = tmp_path / "two.pth"
    save_official(ckpt, "vim_tiny", 2, 64)
    base = ["evaluate", "--model", "vim_tiny", "--checkpoint", str(ckpt), "--data", str(broken), "--img-size", "64",
            "--modes", "dense", "--workers", "0"]
    run = subprocess.run([sys.executable, "-m", "alignscan.bench", *base, "--out", str(tmp_path / "b1")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "unreadable image" in run.stderr and "img_0.png" in run.stderr
    _bench(*base, "--skip-unreadable", "--out", str(tmp_path / "b2"))
    result = json.loads((tmp_path / "b2" / "evaluate.json").read_text())
    assert result["unreadable"] == 1 and result["evaluated"] == 3 and result["results"][0]["total"] == 3
