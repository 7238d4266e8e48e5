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

What is still written here, and why: ``image_folder`` finds the classes and their images by
its own rules (``class_folders``, ``class_images``: hidden entries are never classes or
images; directory links are followed, each directory once, so a link loop cannot count an
image twice; a file reached twice in one class counts once, and a file reached from two
classes is an error, never an image with two labels), keeps the first ``--limit`` images of
each class and turns torchvision's FileNotFoundError into a one-line DataError naming
``--data``; ``Images`` returns an unreadable image's message instead of raising, so that
the commands can stop with its path or skip and count it (``--skip-unreadable``);
``train_transform`` gives timm's RandAugment posterize the 0-bit case that Pillow 13 refuses
(``_posterize``).
"""
from __future__ import annotations

import os

from alignscan import vision

from .options import DataError

__all__ = ["image_folder", "class_folders", "class_images", "eval_transform", "train_transform", "Images", "collate", "MEAN", "STD", "CROP_RATIO"]

# The released models' constants, defined once with their transform (alignscan.vision).
MEAN, STD, CROP_RATIO = vision.MEAN, vision.STD, vision.CROP_RATIO


def class_folders(root):
    """The sorted class names under ``root``: its subfolders (links to folders included),
    hidden ones (".git", ".cache", ...) left out."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def class_images(root, classes, is_image):
    """[(path, label)] for every image under ``root``/<class>, sorted by class then path.
    Directory links are followed, each real directory once per class (a loop ends there);
    hidden files and folders are skipped. A real file reached twice in one class is counted
    once; one reached from two classes raises DataError naming both."""
    samples, owner = [], {}
    for label, name in enumerate(classes):
        found, seen_dirs, stack = [], set(), [os.path.join(root, name)]
        while stack:
            folder = stack.pop()
            real = os.path.realpath(folder)
            if real in seen_dirs:
                continue
            seen_dirs.add(real)
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        stack.append(entry.path)
                    elif entry.is_file() and is_image(entry.path):
                        found.append(entry.path)
        for path in sorted(found):
            real = os.path.realpath(path)
            if real in owner:
                first_label, first_path = owner[real]
                if first_label != label:
                    raise DataError(f"--data {root}: the image {real} is reached from two classes, "
                                    f"{classes[first_label]!r} ({first_path}) and {name!r} ({path}): "
                                    f"an image must have one label (a link between class folders?)")
                continue
            owner[real] = (label, path)
            samples.append((path, label))
    return samples


def _image_folder_type():
    """torchvision's ImageFolder with ``class_folders`` and ``class_images`` as its rules."""
    torchvision = vision.torchvision()
    from torchvision.datasets.folder import has_file_allowed_extension

    class ImageFolder(torchvision.datasets.ImageFolder):
        def find_classes(self, directory):
            classes = class_folders(directory)
            return classes, {name: k for k, name in enumerate(classes)}

        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            check = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
            classes = sorted(class_to_idx, key=class_to_idx.get)
            return class_images(str(directory), classes, check)
    return ImageFolder


def image_folder(root, limit=0):
    """torchvision's ImageFolder over ``root``/<class>/... (no transform: ``Images`` applies
    one) by this module's folder rules, with only the first ``limit`` images (sorted by path)
    of each class (0: all)."""
    try:
        # Decoded as visualize decodes (vision.read_image): 16-bit images scaled, not clipped.
        folder = _image_folder_type()(str(root), loader=vision.read_image, allow_empty=True)
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
