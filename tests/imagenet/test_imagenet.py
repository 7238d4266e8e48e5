"""Evaluate and fine-tune on an ImageNet-style folder the test makes (a few classes of a few
PNGs), with a checkpoint in the official layout saved from a randomly initialised model:
one process and torchrun with 2 Gloo processes give the same counts; fine-tuning runs,
resumes from its saved step, and writes a checkpoint that evaluates as the in-memory model;
damaged inputs give clear errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignscan import models, vision
from alignscan.imagenet import data as imagenet_data
from alignscan.imagenet import finetune, options, world
from tests import REPO


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


def official_files(root, classes=3, per_class=4, name="vim_tiny", img_size=64):
    """A generated ImageNet-style folder and a checkpoint of ``name`` in the official layout
    for it: (folder, checkpoint)."""
    folder = make_folder(root / "data", classes=classes, per_class=per_class)
    checkpoint = root / f"{name}_{img_size}.pth"
    save_official(checkpoint, name, classes, img_size)
    return folder, checkpoint


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
    run = subprocess.run([*prefix, "-m", "alignscan", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    return run


def _steps(path):
    """The step records of a finetune log (the run records between them mark starts and resumes)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_the_folder_is_torchvisions_imagefolder_with_a_per_class_limit(data):
    folder = imagenet_data.image_folder(data[0])
    assert isinstance(folder, vision.torchvision().datasets.ImageFolder)
    assert folder.classes == ["class_00", "class_01", "class_02"] and len(folder) == 12
    assert [label for _, label in folder.samples] == [0] * 4 + [1] * 4 + [2] * 4
    limited = imagenet_data.image_folder(data[0], limit=2)
    assert len(limited) == 6 and [Path(p).name for p, _ in limited.samples[:2]] == ["img_0.png", "img_1.png"]


def _previous_eval_transform(image, size):
    """An evaluation transform written by hand, without torchvision: the long side rounded,
    the crop offset floored. The test below shows where torchvision's geometry gives the
    same pixels."""
    from PIL import Image
    w, h = image.size
    scale = int(size / 0.875) / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    array = (array - np.array(imagenet_data.MEAN, np.float32)) / np.array(imagenet_data.STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _vim_eval_transform(size):
    """Vim's own evaluation transform (DeiT's build_transform, torchvision's v1 API)."""
    transforms = vision.torchvision().transforms
    return transforms.Compose([transforms.Resize(int(size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(imagenet_data.MEAN, imagenet_data.STD)])


@pytest.mark.parametrize("width,height,size", [(80, 72, 64), (256, 240, 224), (300, 200, 224), (640, 427, 224),
                                               (257, 300, 224), (1000, 201, 64)])
def test_the_evaluation_transform_is_the_released_models_and_todays_where_todays_was_right(width, height, size):
    from PIL import Image
    image = Image.fromarray((np.random.default_rng(width).random((height, width, 3)) * 255).astype(np.uint8))
    new = imagenet_data.eval_transform(size)(image)
    assert new.dtype == torch.float32 and new.shape == (3, size, size)
    torch.testing.assert_close(new, _vim_eval_transform(size)(image), rtol=0, atol=1e-6)
    old = _previous_eval_transform(image, size)
    # torchvision truncates the resized long side and rounds the crop offset; the hand-written
    # transform rounded and floored. They agree where both give the same pixels (the folders
    # the evaluate tests make), and differ by a one-pixel shift elsewhere.
    def geometry(side, previous):
        scaled = side * int(size / 0.875) / min(width, height)
        resized = max(size, round(scaled)) if previous else max(size, int(scaled))
        return resized, (resized - size) // 2 if previous else int(round((resized - size) / 2))
    same = all(geometry(side, True) == geometry(side, False) for side in (width, height))
    if same:
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    else:
        assert (new - old).abs().max() > 0.1


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
    import argparse
    parser = argparse.ArgumentParser()
    options.add_finetune_arguments(parser)
    args = parser.parse_args(["--model", "vim_tiny", "--data", str(folder), "--mode", "align", "--keep", "0.5",
                              "--epochs", "1", "--max-steps", "2", "--batch", "4", "--workers", "0", "--img-size", "64",
                              "--lr", "1e-4"])
    args.checkpoint, args.out, args.quick = checkpoint, out, False
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_finetune_runs_resumes_and_its_checkpoint_evaluates_as_the_model_in_memory(data, tmp_path):
    folder, checkpoint = data
    summary, model = finetune._finetune(_finetune_args(folder, checkpoint, tmp_path / "a", max_steps=1), "numba-cpu",
                                       world.World())
    assert summary["steps"] == 1
    saved = Path(summary["checkpoint"])
    loaded = models.load_checkpoint(models.create("vim_tiny", pruning=models.paper_preset("vim_tiny", keep_ratio=0.5),
                                                  num_classes=3, img_size=64), saved)
    evaluation = imagenet_data.image_folder(folder)
    x = torch.stack([imagenet_data.eval_transform(64)(evaluation.loader(p)) for p, _ in evaluation.samples])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    # resume: continues from the saved step to the next
    resumed, _ = finetune._finetune(_finetune_args(folder, None, tmp_path / "a", resume=saved, max_steps=2),
                                    "numba-cpu", world.World())
    assert resumed["steps"] == 2
    log = _steps(tmp_path / "a" / "finetune_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    # the checkpoint is in the official layout: `alignscan evaluate` reads it, with the same answer
    _bench("evaluate", "--model", "vim_tiny", "--checkpoint", str(saved), "--data", str(folder), "--img-size", "64",
           "--modes", "align", "--keep", "0.5", "--workers", "0", "--out", str(tmp_path / "eval"))
    evaluated = json.loads((tmp_path / "eval" / "evaluate.json").read_text())["results"][0]
    reloaded = models.load_checkpoint(models.create("vim_tiny", pruning=models.paper_preset("vim_tiny", keep_ratio=0.5),
                                                    num_classes=3, img_size=64), saved).eval()
    labels = torch.tensor(evaluation.targets)
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
    run = subprocess.run([sys.executable, "-m", "alignscan", "evaluate", "--model", "vim_tiny", "--checkpoint", str(other),
                          "--data", str(folder), "--img-size", "64", "--workers", "0", "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "another architecture" in run.stderr
    classes = tmp_path / "ten.pth"
    save_official(classes, "vim_tiny", 10, 64)
    with pytest.raises(ValueError, match="the checkpoint has 10 classes, the data folder 3"):
        options.load_weights(models.create("vim_tiny", num_classes=3, img_size=64), classes, 3)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        imagenet_data.image_folder(tmp_path / "empty")
    broken = make_folder(tmp_path / "broken", classes=2, per_class=2)
    (broken / "class_00" / "img_0.png").write_bytes(b"not a png")
    ckpt = tmp_path / "two.pth"
    save_official(ckpt, "vim_tiny", 2, 64)
    base = ["evaluate", "--model", "vim_tiny", "--checkpoint", str(ckpt), "--data", str(broken), "--img-size", "64",
            "--modes", "dense", "--workers", "0"]
    run = subprocess.run([sys.executable, "-m", "alignscan", *base, "--out", str(tmp_path / "b1")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "unreadable image" in run.stderr and "img_0.png" in run.stderr
    _bench(*base, "--skip-unreadable", "--out", str(tmp_path / "b2"))
    result = json.loads((tmp_path / "b2" / "evaluate.json").read_text())
    assert result["unreadable"] == 1 and result["evaluated"] == 3 and result["results"][0]["total"] == 3


@pytest.mark.parametrize("name", ["vim_tiny", "plainmamba_l1"])
def test_each_preset_finetunes_one_epoch_and_records_its_recipe(tmp_path, name):
    from alignscan.imagenet import recipe
    folder = make_folder(tmp_path / "train", classes=2, per_class=3)
    checkpoint = tmp_path / f"{name}.pth"
    save_official(checkpoint, name, 2, 64)
    family = "vim" if name.startswith("vim") else "plainmamba"
    _bench("finetune", "--model", name, "--checkpoint", str(checkpoint), "--data", str(folder), "--img-size", "64",
           "--epochs", "1", "--batch", "2", "--workers", "0", "--keep", "0.5", "--out", str(tmp_path / "o"))
    record = json.loads((tmp_path / "o" / "finetune_run.json").read_text())["finetune"]["recipe"]
    preset = recipe.RECIPES[family]
    assert record["name"] == family
    for key in ("mixup", "cutmix", "smoothing", "model_ema", "model_ema_decay", "sched", "lr", "warmup_lr", "min_lr",
                "warmup_epochs", "weight_decay", "opt", "aa", "reprob", "drop_path"):
        assert record[key] == preset[key], key
    steps = _steps(tmp_path / "o" / "finetune_log.jsonl")
    assert len(steps) == 3 and all(r["lr"] == preset["warmup_lr"] for r in steps)   # epoch 0 of the warm-up
    saved = tmp_path / "o" / f"checkpoint_{name}_align.pth"
    blob = torch.load(saved, weights_only=True)
    assert {"model_ema", "scheduler", "optimizer", "recipe"} <= set(blob)
    models.load_checkpoint(models.create(name, num_classes=2, img_size=64), saved)        # strict


def test_every_recipe_entry_is_overridable_and_checked():
    import argparse

    from alignscan.imagenet import recipe
    parser = argparse.ArgumentParser()
    options.add_finetune_arguments(parser)
    args = parser.parse_args(["--model", "vim_tiny", "--data", ".", "--recipe", "plainmamba", "--mixup", "0",
                              "--cutmix", "0", "--no-model-ema", "--sched", "constant", "--smoothing", "0.2"])
    resolved = recipe.resolve("vim", args)
    assert resolved["name"] == "plainmamba" and resolved["lr"] == 2e-5 and resolved["model_ema"] is False
    assert (resolved["mixup"], resolved["cutmix"], resolved["sched"], resolved["smoothing"]) == (0, 0, "constant", 0.2)
    assert set(recipe.RECIPES["vim"]) - {"source", "epochs"} <= set(vars(args))
    for flag, value, message in [("--model-ema-decay", "1.5", "model-ema-decay"), ("--reprob", "2", "reprob"),
                                 ("--lr", "-1", "--lr")]:
        bad = parser.parse_args(["--model", "vim_tiny", "--data", ".", flag, value])
        with pytest.raises(ValueError, match=message):
            recipe.check(recipe.resolve("vim", bad), 64)
    with pytest.raises(ValueError, match="--batch must be even"):
        recipe.check(recipe.resolve("vim", parser.parse_args(["--model", "vim_tiny", "--data", "."])), 5)


def test_the_recipe_state_resumes_the_ema_the_scheduler_and_the_optimizer():
    from alignscan.imagenet import recipe
    torch.manual_seed(0)
    cfg = dict(recipe.RECIPES["vim"], model_ema_decay=0.5, warmup_epochs=2)
    net = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    model = net()
    parts = recipe.Recipe(cfg, model, 3, epochs=4)
    lrs = [parts.start_epoch(e) for e in range(4)]
    # the warm-up, then timm's cosine over all 4 epochs (warm-up included, as DeiT's runs use it)
    cosine = [cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert lrs[0] == cfg["warmup_lr"] and lrs[2:] == pytest.approx(cosine[2:], rel=1e-12)
    for step in range(3):
        images, targets = parts.mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
        assert targets.shape == (4, 3) and torch.allclose(targets.sum(-1), torch.ones(4))   # mixed soft targets
        parts.loss(model(images), targets).backward()
        parts.optimizer.step()
        parts.ema.update(model, step=step)
    assert parts.mix(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]))[0].shape[0] == 2     # an odd batch loses one
    state = parts.state_dict()
    fresh = recipe.Recipe(cfg, net(), 3, epochs=4)
    assert fresh.load_state_dict(state) == []
    for a, b in zip(fresh.ema.module.state_dict().values(), parts.ema.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh.scheduler.state_dict() == parts.scheduler.state_dict()
    assert float(fresh.optimizer.state_dict()["state"][0]["step"]) == 3
    assert recipe.Recipe(cfg, net(), 3, epochs=4).load_state_dict(
        {"optimizer": state["optimizer"]}) == ["scheduler", "model_ema"]


def test_the_vim_recipes_randaugment_posterizes_to_0_bits_without_an_error(data):
    """timm's RandAugment asks for 0 bits when its sampled magnitude reaches 10 (Vim's
    m9-mstd0.5: about one image in 600); Pillow 13 refuses 0 bits. Forced there, the op gives
    the black image that older Pillow gave, and the whole transform still runs."""
    import argparse

    from PIL import Image

    from alignscan import registry
    from alignscan.imagenet import recipe
    RandAugment = vision.timm().data.auto_augment.RandAugment
    cfg = recipe.resolve(registry.family("vim_tiny"), argparse.Namespace())
    transform = imagenet_data.train_transform(64, cfg)
    augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    posterize = [op for op in augment.ops if "Posterize" in op.name]
    assert posterize, [op.name for op in augment.ops]
    image = Image.open(imagenet_data.image_folder(data[0]).samples[-1][0]).convert("RGB")   # pixels 120-180
    for op in posterize:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        assert op.level_fn(10, op.hparams) == (0,)               # the case Pillow 13 refuses
        assert np.asarray(op(image)).max() == 0
        op.magnitude = 5
        kept = np.asarray(op(image))
        bits = op.level_fn(5, op.hparams)[0]
        assert kept.max() > 0 and np.all(kept % (2 ** (8 - bits)) == 0)
    augment.ops, augment.num_layers = posterize, 2
    assert transform(image).shape == (3, 64, 64)


def test_an_error_in_the_transform_is_raised_not_reported_as_an_unreadable_image(data):
    folder = imagenet_data.image_folder(data[0])

    def broken(image):
        raise ZeroDivisionError("a bug in the transform")
    with pytest.raises(ZeroDivisionError, match="a bug in the transform"):
        imagenet_data.Images(folder, range(len(folder)), broken)[0]
