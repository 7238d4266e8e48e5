"""The data of the ImageNet commands: an ImageNet-style folder (what torchvision's ImageFolder
reads: one subfolder per class, the sorted class names are the label indices), the released
models' evaluation transform and the training augmentation, and the datasets the loaders read.

Evaluation uses the released models' transform: resize the shorter side to size/0.875 (256
for 224) with bicubic interpolation, centre crop, ImageNet mean and std (the DeiT recipe of
Vim; PlainMamba's mmcls test pipeline is the same).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .options import DataError

__all__ = ["ImageFolder", "eval_transform", "train_transform", "EvalSet", "TrainSet", "collate", "MEAN", "STD"]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP_RATIO = 0.875

class ImageFolder:
    """(path, label) for every image below ``root``/<class>/..., classes sorted by name.

    Args:
        limit: keep the first ``limit`` images (sorted by path) of each class (0: all).
    """

    def __init__(self, root, limit=0):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"--data must be a folder with one subfolder per class, got {str(root)!r}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(f"--data {root}: no class subfolders (an ImageNet-style folder has one per class)")
        self.samples = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
            self.samples += [(p, label) for p in (files[:limit] if limit else files)]
        if not self.samples:
            raise DataError(f"--data {root}: no images ({', '.join(EXTENSIONS)}) in its {len(self.classes)} class "
                             f"folders")

    def __len__(self):
        return len(self.samples)


def _load_rgb(path):
    from PIL import Image
    with Image.open(path) as image:
        return image.convert("RGB")


def _to_tensor(image):
    import torch
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def eval_transform(image, size):
    """Resize the shorter side to size/0.875 (bicubic), centre crop ``size``, normalise."""
    from PIL import Image
    short = int(size / CROP_RATIO)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(image.crop((left, top, left + size, top + size)))


def train_transform(image, size, rng):
    """Random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) and a random horizontal flip."""
    from PIL import Image
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:   # fall back to a centre crop of the whole image
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(image)


class EvalSet:
    """Dataset of (index, image, label); an unreadable image gives (index, None, label)."""

    def __init__(self, folder, indices, size):
        self.folder, self.indices, self.size = folder, indices, size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.folder.samples[index]
        try:
            return index, eval_transform(_load_rgb(path), self.size), label
        except Exception as exc:      # unreadable: reported by the caller, never dropped silently
            return index, f"{path}: {type(exc).__name__}: {exc}", label


class TrainSet:
    """Dataset of (index, augmented image, label); an unreadable image gives (index, message,
    label), as ``EvalSet``, for ``collate`` to report or skip."""

    def __init__(self, folder, size, seed):
        self.folder, self.size, self.seed, self.epoch = folder, size, seed, 0

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        path, label = self.folder.samples[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        try:
            return index, train_transform(_load_rgb(path), self.size, rng), label
        except Exception as exc:      # unreadable: reported by the caller, never dropped silently
            return index, f"{path}: {type(exc).__name__}: {exc}", label


def collate(items):
    import torch
    good = [(i, x, y) for i, x, y in items if not isinstance(x, str)]
    bad = [(i, x) for i, x, _ in items if isinstance(x, str)]
    if not good:
        return None, None, None, bad
    index, images, labels = zip(*good)
    return torch.tensor(index), torch.stack(images), torch.tensor(labels), bad
