"""Checkpoint round trips in both official layouts, and clear errors for bad ones."""
import struct
import zipfile

import pytest
import torch

from alignscan import models

TINY = dict(embed_dim=32, depth=2, img_size=64, num_classes=10)


def _pair(name):
    torch.manual_seed(0)
    a = models.create(name, **TINY).eval()
    torch.manual_seed(1)
    b = models.create(name, **TINY).eval()
    return a, b


def test_vim_layout_round_trip(tmp_path):
    a, b = _pair("vim_tiny")
    path = tmp_path / "vim.pth"
    torch.save({"model": a.state_dict(), "epoch": 299}, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
        models.load_checkpoint(b, path)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_mmcls_layout_round_trip_drops_ema_entries(tmp_path):
    a, b = _pair("plainmamba_l2")
    state = dict(a.state_dict())
    state.update({"ema_backbone_pos_embed": torch.zeros(3), "ema_head_fc_weight": torch.zeros(2)})
    path = tmp_path / "plainmamba.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, path)
    x = torch.randn(1, 3, 64, 64)
    models.load_checkpoint(b, path)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path):
    a, b = _pair("vim_tiny")
    state = a.state_dict()
    state.pop("norm_f.weight")
    state["layers.9.mixer.D"] = torch.zeros(3)
    state["head.bias"] = torch.zeros(11)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        models.load_checkpoint(b, path)
    text = str(err.value)
    assert "missing keys (1): norm_f.weight" in text and "layers.9.mixer.D" in text and "head.bias" in text


def test_unrecognised_layout_and_missing_file(tmp_path):
    a, _ = _pair("vim_tiny")
    path = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2]}, path)
    with pytest.raises(ValueError, match="unrecognised layout"):
        models.load_checkpoint(a, path)
    with pytest.raises(ValueError, match="path"):
        models.load_checkpoint(a, tmp_path / "nope.pth")


def _flip_a_byte_inside_the_largest_tensor(path):
    """XOR one byte in the middle of the largest stored entry (a tensor's raw bytes)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len         # the entry's data (stored, not compressed)
    data[start + info.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["empty", "truncated", "byte flipped", "not a tensor"])
def test_a_damaged_checkpoint_is_a_value_error_naming_the_file(tmp_path, damage):
    a, b = _pair("vim_tiny")
    path = tmp_path / f"{damage.replace(' ', '_')}.pth"
    state = a.state_dict()
    if damage == "not a tensor":
        state["head.bias"] = [0.0] * 10
    torch.save({"model": state}, path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "byte flipped":
        _flip_a_byte_inside_the_largest_tensor(path)
    expected = {"empty": "is empty", "truncated": "truncated", "byte flipped": "fails its CRC check",
                "not a tensor": "'head.bias' is a list, not a tensor"}[damage]
    with pytest.raises(ValueError, match=expected) as err:
        models.load_checkpoint(b, path)
    assert str(path) in str(err.value)
