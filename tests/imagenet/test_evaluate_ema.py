"""``evaluate --ema``: the plain weights by default (the numbers do not change), the
checkpoint's model_ema with ``yes`` or ``auto``, a clear error for ``yes`` on a file without
one, and evaluate.json names the weights it evaluated."""
import argparse
import json

import numpy as np
import pytest
import torch

from alignscan import models
from alignscan.imagenet import data as imagenet_data
from alignscan.imagenet import evaluate, options


def _folder(root, classes=3, per_class=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray((rng.random((70, 80, 3)) * 255).astype(np.uint8)).save(root / f"class_{c}" / f"{k}.png")
    return root


def _args(folder, checkpoint, out, *extra):
    parser = argparse.ArgumentParser()
    options.add_evaluate_arguments(parser)
    args = parser.parse_args(["--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data", str(folder),
                              "--img-size", "64", "--modes", "dense", "--workers", "0", *extra])
    args.out, args.quick = out, False
    options.check_arguments(args)
    return args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    folder = _folder(root / "val")
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights.append(models.create("vim_tiny", num_classes=3, img_size=64).eval())
    both = root / "both.pth"
    torch.save({"model": weights[0].state_dict(), "model_ema": weights[1].state_dict(), "epoch": 1}, both)
    plain = root / "plain.pth"
    torch.save({"model": weights[0].state_dict()}, plain)
    folder_images = imagenet_data.image_folder(folder)
    x = torch.stack([imagenet_data.eval_transform(64)(folder_images.loader(p)) for p, _ in folder_images.samples])
    labels = torch.tensor(folder_images.targets)
    with torch.no_grad():
        correct = [int((w(x).argmax(-1) == labels).sum()) for w in weights]
    assert correct[0] != correct[1], "the two sets of weights must tell apart which one was evaluated"
    return folder, both, plain, correct


def test_the_option_defaults_to_the_plain_weights(setup, tmp_path):
    folder, both, _, _ = setup
    assert _args(folder, both, tmp_path).ema == "no"
    with pytest.raises(SystemExit):
        _args(folder, both, tmp_path, "--ema", "maybe")


@pytest.mark.parametrize("ema,weights,which", [(None, "model", 0), ("no", "model", 0), ("yes", "model_ema", 1),
                                               ("auto", "model_ema", 1)])
def test_evaluate_json_names_the_weights_evaluated(setup, tmp_path, ema, weights, which):
    folder, both, _, correct = setup
    summary = evaluate.evaluate_command(_args(folder, both, tmp_path, *(["--ema", ema] if ema else [])))
    saved = json.loads((tmp_path / "evaluate.json").read_text())
    assert saved["weights"] == summary["weights"] == weights and saved["ema"] == (ema or "no")
    assert saved["results"][0]["correct"] == correct[which]
    assert f"({weights} weights)" in (tmp_path / "evaluate.md").read_text()


def test_auto_without_an_ema_evaluates_the_plain_weights_and_yes_is_an_error(setup, tmp_path):
    folder, _, plain, correct = setup
    summary = evaluate.evaluate_command(_args(folder, plain, tmp_path / "auto", "--ema", "auto"))
    assert summary["weights"] == "model" and summary["results"][0]["correct"] == correct[0]
    with pytest.raises(options.DataError, match="holds no 'model_ema'"):
        evaluate.evaluate_command(_args(folder, plain, tmp_path / "yes", "--ema", "yes"))
