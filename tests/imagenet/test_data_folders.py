"""The folder rules of evaluate/finetune: hidden entries are never classes or images, link
loops cannot count an image twice, a link between class folders is an error naming both
classes, and a class folder that is a link to a real folder is a class like any other."""
import os

import pytest

from alignscan.imagenet.data import image_folder
from alignscan.imagenet.options import DataError
from tests.imagenet.test_imagenet import make_folder


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", classes=2, per_class=3)


def _counts(found):
    return {name: sum(1 for _, label in found.samples if label == k) for k, name in enumerate(found.classes)}


def test_a_link_loop_counts_each_image_once(folder):
    os.symlink("..", folder / "class_00" / "loop")                 # class_00/loop -> data/
    os.symlink(".", folder / "class_01" / "self")                  # class_01/self -> class_01/
    with pytest.raises(DataError, match="two classes"):            # class_00/loop reaches class_01's images
        image_folder(folder)
    os.unlink(folder / "class_00" / "loop")
    found = image_folder(folder)
    assert _counts(found) == {"class_00": 3, "class_01": 3} and len(found) == 6


def test_a_link_from_one_class_folder_to_another_is_an_error_naming_both(folder):
    os.symlink(folder / "class_01", folder / "class_00" / "more")
    with pytest.raises(DataError, match="'class_00'.*'class_01'"):
        image_folder(folder)


def test_hidden_folders_and_files_are_never_classes_or_images(folder):
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "objects" / "x.png").write_bytes((folder / "class_00" / "img_0.png").read_bytes())
    (folder / "class_00" / ".thumb.png").write_bytes((folder / "class_00" / "img_0.png").read_bytes())
    found = image_folder(folder)
    assert found.classes == ["class_00", "class_01"] and _counts(found) == {"class_00": 3, "class_01": 3}


def test_a_linked_class_folder_is_a_class_and_a_file_linked_twice_in_it_counts_once(folder, tmp_path):
    elsewhere = make_folder(tmp_path / "elsewhere", classes=1, per_class=2) / "class_00"
    os.symlink(elsewhere, folder / "class_02")
    os.symlink(elsewhere / "img_0.png", elsewhere / "img_0_again.png")
    found = image_folder(folder)
    assert found.classes == ["class_00", "class_01", "class_02"]
    assert _counts(found) == {"class_00": 3, "class_01": 3, "class_02": 2}
