"""The digits data path and the weights cache: corrupt or mismatched files are retrained,
never used."""
from pathlib import Path

import torch

from alignscan.science.digits import load_digits_split, trained_model, weights_digest
from tests.science.helpers import TINY


def test_digits_split_is_fixed_and_well_formed():
    x_tr, y_tr, x_te, y_te = load_digits_split(32, 0)
    assert x_tr.shape == (1437, 1, 32, 32) and x_te.shape == (360, 1, 32, 32)
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    assert sorted(set(y_te.tolist())) == list(range(10))
    again = load_digits_split(32, 0)
    assert torch.equal(again[3], y_te)


def test_weights_are_cached_and_reused(tmp_path):
    model, info = trained_model(TINY, tmp_path, log=lambda *_: None)
    assert info["source"] == "trained" and Path(info["path"]).exists()
    again, info2 = trained_model(TINY, tmp_path, log=lambda *_: None)
    assert info2["source"] == "cache"
    assert weights_digest(again.state_dict()) == weights_digest(model.state_dict())


def test_corrupt_or_mismatched_cache_is_retrained_not_used(tmp_path):
    _, info = trained_model(TINY, tmp_path, log=lambda *_: None)
    path = Path(info["path"])
    messages = []
    path.write_bytes(path.read_bytes()[:200])                     # truncated file
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "unreadable" in info["reason"] and messages
    blob = torch.load(path, weights_only=True)                    # tampered weights, digest kept
    blob["state_dict"]["head.bias"] += 1.0
    torch.save(blob, path)
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "digest" in info["reason"]
    blob = torch.load(path, weights_only=True)                    # another configuration under this name
    blob["config"]["epochs"] = 99
    torch.save(blob, path)
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "configuration" in info["reason"]
    blob = torch.load(path, weights_only=True)                    # same config, digest consistent, but the
    blob["state_dict"]["head.extra"] = torch.zeros(2)             # model changed since: the weights do not fit
    blob["digest"] = weights_digest(blob["state_dict"])
    torch.save(blob, path)
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "no longer fit" in info["reason"]
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "cache"                              # the retrained weights replaced it


def test_a_cache_that_cannot_be_written_warns_and_keeps_the_trained_model(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    messages = []
    model, info = trained_model(TINY, tmp_path / "a_file" / "cache", log=messages.append)
    assert info["source"] == "trained" and "cache_error" in info and model is not None
    assert any("could not cache" in m for m in messages)
