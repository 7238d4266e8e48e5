"""Which weights a checkpoint gives: the plain ones by default, model_ema on request or when
present ("auto", which says so), a clear error when asked for an EMA the file lacks, and the
entry read recorded on the model. Training scripts' argparse.Namespace does not stop the read."""
import argparse
import logging

import pytest
import torch

from alignscan import models
from alignscan.models.checkpoints import EMA_CHOICES, WHOLE_FILE, read_checkpoint, select_weights

TINY = dict(embed_dim=32, depth=2, img_size=64, num_classes=10)


def _three(name):
    """A model to load into and two sets of weights: the plain ones and their EMA."""
    out = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        out.append(models.create(name, **TINY).eval())
    return out


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name,layout", [("vim_tiny", "model"), ("plainmamba_l1", "state_dict")])
def test_plain_by_default_ema_on_request_auto_when_present(tmp_path, name, layout, caplog):
    target, plain, ema = _three(name)
    path = tmp_path / "both.pth"
    torch.save({layout: plain.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
                "args": argparse.Namespace(lr=1e-5)}, path)          # as Vim's and timm's training scripts save
    assert models.load_checkpoint(target, path) is target
    assert target.checkpoint_weights == layout and _equal(target, plain)
    models.load_checkpoint(target, path, ema=True)
    assert target.checkpoint_weights == "model_ema" and _equal(target, ema)
    models.load_checkpoint(target, path, ema=False)
    with caplog.at_level(logging.INFO, logger="alignscan.models.checkpoints"):
        models.load_checkpoint(target, path, ema="auto")
    assert target.checkpoint_weights == "model_ema" and _equal(target, ema)
    assert any("ema='auto' loaded model_ema" in r.getMessage() for r in caplog.records)


def test_auto_without_an_ema_reads_the_plain_weights_and_says_so(tmp_path, caplog):
    target, plain, _ = _three("vim_tiny")
    path = tmp_path / "plain.pth"
    torch.save({"model": plain.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="alignscan.models.checkpoints"):
        models.load_checkpoint(target, path, ema="auto")
    assert target.checkpoint_weights == "model" and _equal(target, plain)
    assert any("holds no model_ema" in r.getMessage() for r in caplog.records)
    torch.save(plain.state_dict(), tmp_path / "bare.pth")
    models.load_checkpoint(target, tmp_path / "bare.pth", ema="auto")
    assert target.checkpoint_weights == WHOLE_FILE


def test_ema_true_without_model_ema_is_a_value_error_naming_it(tmp_path):
    target, plain, _ = _three("plainmamba_l1")
    path = tmp_path / "plain.pth"
    state = dict(plain.state_dict(), ema_backbone_pos_embed=torch.zeros(1))    # mmcv EMAHook entries are not an EMA
    torch.save({"state_dict": state, "meta": {}}, path)
    with pytest.raises(ValueError, match=r"ema=True but checkpoint .*plain\.pth holds no 'model_ema'"):
        models.load_checkpoint(target, path, ema=True)
    with pytest.raises(ValueError, match="ema must be False, True or 'auto'"):
        models.load_checkpoint(target, path, ema="yes")
    assert EMA_CHOICES == (False, True, "auto")
    assert set(read_checkpoint(path)) == set(plain.state_dict())
    assert select_weights({"state_dict": state}, "x", ema="auto")[1] == "state_dict"
