"""One image pipeline: ``visualize --image`` and ``evaluate`` feed a model the same tensor for
the same file (the input is captured at the model in both), through ``vision.read_image``
(8-bit RGB; 16-bit scaled from its nominal range, never clipped, never stretched by its own
maximum; palette, CMYK, grey and alpha images converted) and ``vision.eval_transform``."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from alignscan import models, vision
from alignscan.imagenet import data as imagenet_data
from alignscan.imagenet import evaluate, options
from alignscan.models.vim import VisionMamba
from alignscan.science import visualize


def _rgb(path):
    image = vision.read_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_a_uniform_16_bit_image_keeps_its_mean_in_the_middle(tmp_path, fmt):
    path = tmp_path / f"mid.{fmt}"
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)     # what Pillow's clip gives
    pixels = _rgb(path)
    assert pixels.shape == (20, 30, 3) and (pixels == 128).all()                   # 32768 / 257, rounded


def test_16_bit_values_are_scaled_by_the_nominal_range_not_the_maximum(tmp_path):
    values = np.array([[0, 257, 1000, 30000, 65535, 65278]], np.uint16)
    Image.fromarray(values).save(tmp_path / "ramp.png")
    assert _rgb(tmp_path / "ramp.png")[0, :, 0].tolist() == [0, 1, 4, 117, 255, 254]
    dark = np.full((8, 8), 1000, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert (_rgb(tmp_path / "dark.png") == 4).all()                               # dark stays dark


def test_palette_images_take_their_palette_colours(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2, 0, 1, 2, 2, 2])
    image.save(tmp_path / "palette.png")
    expected = [(255, 0, 0), (0, 255, 0), (10, 20, 30), (255, 0, 0), (0, 255, 0), (10, 20, 30), (10, 20, 30),
                (10, 20, 30)]
    assert [tuple(p) for p in _rgb(tmp_path / "palette.png").reshape(-1, 3)] == expected
    image.info["transparency"] = 1
    image.save(tmp_path / "transparent.png", transparency=1)
    assert [tuple(p) for p in _rgb(tmp_path / "transparent.png").reshape(-1, 3)] == expected


@pytest.mark.parametrize("fmt,tolerance", [("tiff", 0), ("jpeg", 8)])
def test_cmyk_images_become_rgb(tmp_path, fmt, tolerance):
    colours = {(0, 255, 255, 0): (255, 0, 0), (0, 0, 0, 0): (255, 255, 255), (0, 0, 0, 255): (0, 0, 0),
               (255, 0, 255, 0): (0, 255, 0)}
    image = Image.new("CMYK", (64, 16))
    for k, cmyk in enumerate(colours):
        image.paste(cmyk, (16 * k, 0, 16 * (k + 1), 16))
    path = tmp_path / f"cmyk.{fmt}"
    image.save(path, quality=100) if fmt == "jpeg" else image.save(path)
    assert Image.open(path).mode == "CMYK"
    pixels = _rgb(path)
    for k, rgb in enumerate(colours.values()):
        assert np.abs(pixels[8, 16 * k + 8] - np.array(rgb)).max() <= tolerance


def test_grey_bilevel_and_alpha_images_become_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert (_rgb(tmp_path / "grey.png") == grey[..., None]).all()
    Image.fromarray(np.stack([grey, np.full_like(grey, 7)], -1), "LA").save(tmp_path / "la.png")
    assert (_rgb(tmp_path / "la.png") == grey[..., None]).all()
    Image.fromarray(grey > 100).save(tmp_path / "bits.png")
    assert set(np.unique(_rgb(tmp_path / "bits.png"))) == {0, 255}
    rgba = np.dstack([np.full((4, 4, 3), 90, np.uint8), np.zeros((4, 4), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert (_rgb(tmp_path / "rgba.png") == 90).all()


def test_32_bit_and_float_images_are_refused_with_their_name(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match=r"image .*float\.tiff has mode 'F'.*no nominal range"):
        vision.read_image(tmp_path / "float.tiff")


def test_evaluate_and_visualize_use_the_same_transform_function():
    size = 64
    image = Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8))
    torch.testing.assert_close(imagenet_data.eval_transform(size)(image), vision.eval_transform(size)(image),
                               rtol=0, atol=0)
    assert (imagenet_data.MEAN, imagenet_data.STD, imagenet_data.CROP_RATIO) == (vision.MEAN, vision.STD, 0.875)


@pytest.mark.parametrize("kind", ["rgb jpeg", "16-bit png"])
def test_visualize_and_evaluate_feed_the_model_the_same_tensor(tmp_path, kind):
    image_dir = tmp_path / "val" / "only_class"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    if kind == "rgb jpeg":
        path = image_dir / "picture.jpg"
        Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8)).save(path)
    else:
        path = image_dir / "picture.png"
        Image.fromarray((rng.random((70, 90)) * 65535).astype(np.uint16)).save(path)
    torch.manual_seed(0)
    checkpoint = tmp_path / "vim.pth"
    torch.save({"model": models.create("vim_tiny", num_classes=1, img_size=64).state_dict()}, checkpoint)
    seen = {"visualize": [], "evaluate": []}
    current = []

    def capture(module, args):
        if isinstance(module, VisionMamba) and current:
            seen[current[0]].append(args[0].detach().clone())
    handle = torch.nn.modules.module.register_module_forward_pre_hook(capture)
    try:
        current[:] = ["visualize"]
        visualize.run(tmp_path / "figures", image_path=path, model_name="vim_tiny", quick=True, log=lambda *_: None)
        current[:] = ["evaluate"]
        parser = argparse.ArgumentParser()
        options.add_evaluate_arguments(parser)
        args = parser.parse_args(["--model", "vim_tiny", "--checkpoint", str(checkpoint), "--data",
                                  str(tmp_path / "val"), "--img-size", "64", "--modes", "dense", "--workers", "0"])
        args.out, args.quick = tmp_path / "evaluate", False
        evaluate.evaluate_command(args)
    finally:
        handle.remove()
    assert seen["visualize"] and seen["evaluate"]
    shown, evaluated = seen["visualize"][0], seen["evaluate"][0]
    assert shown.shape == evaluated.shape == (1, 3, 64, 64)
    torch.testing.assert_close(shown, evaluated, rtol=0, atol=0)
    expected = vision.eval_transform(64)(vision.read_image(path))[None]
    torch.testing.assert_close(shown, expected, rtol=0, atol=0)
