"""The data of the ImageNet commands, from the field's own libraries: torchvision's
``ImageFolder`` (one subfolder per class, the sorted class names are the label indices),
the released models' evaluation transform in ``torchvision.transforms.v2``, and timm's
training transform (the DeiT recipe Vim fine-tunes with: random resized crop, flip,
RandAugment, colour jitter, random erasing; see ``recipe``).

Evaluation uses the released models' transform: resize the shorter side to size/0.875 (256
for 224) with bicubic interpolation, centre crop, ImageNet mean and std (Vim's DeiT
``build_transform``; PlainMamba's mmcls test pipeline is the same). It and the image decoder
(``vision.read_image``: 8-bit RGB, 16-bit scaled) live in ``alignscan.vision``, a floor
below, so that ``visualize`` feeds a model exactly what ``evaluate`` does.

What is still written here, and why: ``image_folder`` keeps the first ``--limit`` images of
each class and turns torchvision's FileNotFoundError into a one-line DataError naming
``--data``; ``Images`` returns an unreadable image's message instead of raising, so that
the commands can stop with its path or skip and count it (``--skip-unreadable``);
``train_transform`` gives timm's RandAugment posterize the 0-bit case that Pillow 13 refuses
(``_posterize``).
"""
from __future__ import annotations

from alignscan import vision

from .options import DataError

__all__ = ["image_folder", "eval_transform", "train_transform", "Images", "collate", "MEAN", "STD", "CROP_RATIO"]

# The released models' constants, defined once with their transform (alignscan.vision).
MEAN, STD, CROP_RATIO = vision.MEAN, vision.STD, vision.CROP_RATIO


def image_folder(root, limit=0):
    """torchvision's ImageFolder over ``root``/<class>/... (no transform: ``Images`` applies
    one), with only the first ``limit`` images (sorted by path) of each class (0: all)."""
    torchvision = vision.torchvision()
    try:
        # Decoded as visualize decodes (vision.read_image): 16-bit images scaled, not clipped.
        folder = torchvision.datasets.ImageFolder(str(root), loader=vision.read_image, allow_empty=True)
    except FileNotFoundError as exc:
        raise DataError(f"--data must be a folder with one subfolder per class holding images: {exc}") from None
    if limit:
        taken, samples = {}, []
        for path, label in folder.samples:          # sorted by class, then by path
            if taken.get(label, 0) < limit:
                samples.append((path, label))
                taken[label] = taken.get(label, 0) + 1
        folder.samples = folder.imgs = samples
        folder.targets = [label for _, label in samples]
    if not folder.samples:
        raise DataError(f"--data {root}: no images in its {len(folder.classes)} class folders")
    return folder


def eval_transform(size):
    """Resize the shorter side to size/0.875 (bicubic), centre crop ``size``, scale to [0, 1],
    normalise with the ImageNet mean and std: a PIL image in, a float32 (3, size, size) out.
    ``alignscan.vision.eval_transform``, which ``visualize`` uses too: one pipeline."""
    return vision.eval_transform(size)


def train_transform(size, recipe):
    """timm's training transform with the recipe's augmentation (``recipe``: a dict with
    aa, color_jitter, reprob, remode, recount, train_interpolation), its RandAugment posterize
    ops made to accept 0 bits (``_posterize``)."""
    vision.timm()
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    transform = create_transform(size, is_training=True, auto_augment=recipe["aa"] or None,
                                 color_jitter=recipe["color_jitter"], interpolation=recipe["train_interpolation"],
                                 re_prob=recipe["reprob"], re_mode=recipe["remode"], re_count=recipe["recount"],
                                 mean=MEAN, std=STD)
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if "Posterize" in op.name:
                    op.aug_fn = _posterize
    return transform


def _posterize(image, bits, **_):
    """Posterize keeping ``bits`` (0 to 8) most significant bits of every channel. timm's
    RandAugment asks for 0 bits (a black image, as Pillow gave before 13) when the sampled
    magnitude reaches 10: Vim's "rand-m9-mstd0.5-inc1" does so for about 1 draw in 600,
    which Pillow 13's ImageOps.posterize refuses with a ValueError."""
    from PIL import ImageOps
    if bits >= 8:
        return image
    if bits <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits)


class Images:
    """Dataset of (index, image, label) over ``indices`` of a folder; an unreadable image
    gives (index, message, label), reported by the caller, never dropped silently."""

    def __init__(self, folder, indices, transform):
        self.folder, self.indices, self.transform = folder, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except Exception as exc:            # only reading: an error in the transform is a bug, raised
            return index, f"{path}: {type(exc).__name__}: {exc}", label
        return index, self.transform(image), label


def collate(items):
    import torch
    good = [(i, x, y) for i, x, y in items if not isinstance(x, str)]
    bad = [(i, x) for i, x, _ in items if isinstance(x, str)]
    if not good:
        return None, None, None, bad
    index, images, labels = zip(*good)
    return torch.tensor(index), torch.stack(images), torch.tensor(labels), bad
