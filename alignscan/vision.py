"""torchvision and timm, imported so that they work beside a CPU build of torch.

PyPI's torchvision wheels for Linux are linked against the CUDA build of torch
(``libtorch_cuda.so``). Beside the CPU build (``torch==2.13.0+cpu`` on this project's
machines, ``--index-url .../whl/cpu`` elsewhere) their compiled detection operators cannot
load; torchvision then still works for what this project uses (``datasets.ImageFolder``,
``transforms.v2``: pure Python over PIL and torch), except that its import stops at
``register_fake("torchvision::nms")``, which needs the operator's schema to exist
("operator torchvision::nms does not exist"). timm imports torchvision, so it stops too.

``torchvision()`` and ``timm()`` import them; only where torchvision's compiled operators
cannot be loaded do they first declare the schemas of the two operators torchvision
registers unconditionally (``nms`` and ``qnms``), with no kernel: calling a detection
operator raises torchvision's own "Couldn't load custom C++ ops" error; everything else is
torchvision's own code, untouched. With a
torchvision that matches its torch (a CUDA pair, or a source build), nothing is declared.

The released models' input pipeline lives here too, below every program that feeds a model
an image (``imagenet`` evaluates with it, ``science.visualize`` draws with it; as siblings
they cannot share it any higher): ``read_image`` decodes a file to 8-bit RGB, and
``eval_transform`` is the released models' evaluation transform (resize the shorter side to
size / 0.875 with bicubic interpolation, centre crop, ImageNet mean and std: Vim's DeiT
``build_transform``, PlainMamba's mmcls test pipeline, timm's ``resolve_data_config`` of
these models).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["torchvision", "timm", "declared_schemas", "read_image", "to_rgb8", "eval_transform", "MEAN", "STD",
           "CROP_RATIO"]

MEAN = (0.485, 0.456, 0.406)          # timm.data.IMAGENET_DEFAULT_MEAN / _STD
STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875                    # the released models' crop: 224 of 256

# torchvision's own schemas of the operators its _meta_registrations.py registers fakes for
# whatever its extension did (torchvision/csrc/ops/nms.cpp, qnms in quantized/cpu).
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None          # the torch.library.Library holding the declared schemas (kept alive)


def declared_schemas():
    """The schemas declared here (empty when torchvision's own operators loaded)."""
    return () if _library is None else _SCHEMAS


def _extension_loads(spec):
    """True when torchvision's compiled operators load beside this torch."""
    import torch
    folder = os.path.dirname(spec.origin)
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return True
            except OSError:
                return False
    return False


def torchvision():
    """``import torchvision``, working beside a CPU build of torch (see the module docstring).

    Raises ImportError naming the install command when torchvision is not installed."""
    global _library
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed: pip install torchvision==0.28.0 (the release that pairs "
                          "with torch 2.13.0; see the README's command 1)")
    import torch
    if _library is None and not _extension_loads(spec):
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        except RuntimeError:                      # no schema yet (nobody declared it): declare both
            _library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                _library.define(schema)
    return importlib.import_module("torchvision")


def timm():
    """``import timm`` (torchvision imported first, as ``torchvision()`` does)."""
    torchvision()
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed: pip install -e '.[all]' (or pip install timm)")
    return importlib.import_module("timm")


# The nominal top of each integer mode whose samples are wider than 8 bits.
_SIXTEEN_BITS = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(image, name="image"):
    """A PIL image as 8-bit RGB. Palette, grey, bilevel, CMYK, YCbCr and alpha modes go
    through Pillow's own conversion (alpha dropped, as torchvision's loader does). 16-bit
    grey (PNG, TIFF) is scaled from its nominal range, 0..65535 to 0..255 (v / 257, rounded),
    never clipped (Pillow's ``convert`` clips it: a mid-grey 32768 would turn white) and
    never rescaled by the image's own maximum (a dark image stays dark). 32-bit integer and
    float images have no nominal range: ValueError naming ``name`` and the mode.
    (Pillow itself reads 16-bit-per-channel RGB PNGs as 8-bit RGB, keeping the high byte.)"""
    from PIL import Image
    if image.mode == "RGB":
        return image
    sixteen = image.mode in _SIXTEEN_BITS or (image.mode == "I" and image.format == "PNG")   # PNG's "I" is 16-bit
    if sixteen:
        import numpy as np
        wide = np.asarray(image).astype(np.float64)
        grey = Image.fromarray(np.floor(wide * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8))
        return grey.convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith(("I;", "F;")):
        raise ValueError(f"{name} has mode {image.mode!r} (32-bit integer or float samples): it has no nominal range "
                         "to scale to 8 bits; save it as 8- or 16-bit")
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")          # Pillow's route for a palette with a transparent entry
    return image.convert("RGB")


def read_image(path):
    """The image file at ``path`` as an 8-bit RGB PIL image (``to_rgb8``): the one decoder of
    every model input read from a file (the ImageNet folders, ``visualize --image``)."""
    from PIL import Image
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    return to_rgb8(image, name=f"image {path}")


def eval_transform(size, crop_pct=CROP_RATIO, interpolation="bicubic", mean=MEAN, std=STD, channels=3):
    """The evaluation transform of the released models (the defaults): resize the shorter side
    to ``int(size / crop_pct)`` with ``interpolation``, centre crop ``size``, scale to [0, 1],
    normalise with ``mean`` and ``std``. An 8-bit RGB PIL image in (``read_image``), a float32
    (channels, size, size) tensor out; ``channels=1`` takes Pillow's luma (L) first."""
    import torch
    torchvision()
    from torchvision.transforms import InterpolationMode, v2
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    steps = [v2.Resize(int(size / crop_pct), interpolation=InterpolationMode(interpolation)), v2.CenterCrop(size)]
    if channels == 1:
        steps.append(v2.Grayscale(1))
    return v2.Compose(steps + [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
