"""The pruning controller hands each layer one immutable ``StageScan`` per stage: made once
when the stage begins, with alignment "none" while nothing is pruned, the composed map, ViM's
flipped map and PlainMamba's path plan; both models' layers receive exactly that object."""
import dataclasses

import numpy as np
import pytest
import torch

from alignscan import models
from alignscan import reference as R
from alignscan.bridges import TorchPositionMap
from alignscan.models import PruningConfig, Stages, StageScan
from alignscan.models.stages import UNPRUNED

TOKENS, BATCH = 16, 2


def _paths():
    return tuple(torch.as_tensor(np.asarray(a), dtype=torch.int64) for a in R.snake_paths(4, 4))


def test_an_unpruned_stage_scans_with_alignment_none_and_no_maps():
    orders, labels = _paths()
    stages = Stages(PruningConfig("align", (2,), 0.5, conv="position_aware"), BATCH, TOKENS, "cpu", flipped=True,
                    scan_paths=(orders, labels))
    scan = stages.scan
    assert isinstance(scan, StageScan)
    assert scan.alignment == "none" and scan.position_map is None and scan.flipped_map is None
    assert not scan.position_aware, "no neighbours are missing before pruning"
    assert torch.equal(scan.positions, torch.arange(TOKENS).expand(BATCH, TOKENS))
    assert len(scan.paths) == len(orders)
    for (index, inverse, path_map, path_labels), order, label in zip(scan.paths, orders, labels):
        assert path_map is None and torch.equal(index[0], order) and torch.equal(path_labels[0], label)
        assert torch.equal(torch.gather(index, 1, inverse)[0], torch.arange(TOKENS))
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.alignment = "prev"


@pytest.mark.parametrize("mode", ["align", "hold", "self", "relabel"])
def test_a_pruning_stage_makes_one_scan_with_the_modes_alignment_and_the_derived_maps(mode):
    orders, labels = _paths()
    cfg = PruningConfig(mode, (2, 4), 0.5, conv="position_aware" if mode != "relabel" else "compact")
    stages = Stages(cfg, BATCH, TOKENS, "cpu", flipped=True, scan_paths=(orders, labels))
    unpruned = stages.scan
    stages.after_layer(0, torch.randn(BATCH, 3, TOKENS), torch.randn(BATCH, TOKENS, 4))
    assert stages.scan is unpruned, "no stage after layer 0: the same scan"
    stages.after_layer(1, torch.randn(BATCH, 3, TOKENS), torch.randn(BATCH, TOKENS, 4))
    scan = stages.scan
    assert scan is not unpruned and scan.alignment == models.pruning.alignment_of(mode)
    assert scan.position_map is stages.position_map and scan.positions is stages.positions
    assert scan.position_aware == (mode != "relabel")
    flipped = stages.position_map.flip()
    assert torch.equal(scan.flipped_map.positions, flipped.positions)
    for (index, inverse, path_map, path_labels), order, label in zip(scan.paths, orders, labels):
        want_index, want_map = stages.position_map.path(order)
        assert torch.equal(index, want_index) and torch.equal(path_map.positions, want_map.positions)
        assert torch.equal(path_labels, label[want_map.positions])
        assert torch.equal(torch.gather(index, 1, inverse), torch.arange(index.shape[1]).expand_as(index))
    stages.after_layer(2, torch.randn(BATCH, 3, scan.positions.shape[1]), torch.randn(BATCH, scan.positions.shape[1], 4))
    assert stages.scan is scan, "the scan is made once per stage"


def test_mask_mode_keeps_the_unpruned_scan_and_a_family_gets_only_what_it_asks_for():
    stages = Stages(PruningConfig("mask", (1,), 0.5), BATCH, TOKENS, "cpu", flipped=True)
    before = stages.scan
    stages.after_layer(0, torch.randn(BATCH, 3, TOKENS), torch.randn(BATCH, TOKENS, 4))
    assert stages.scan is before and before.alignment == "none" and before.paths is None
    plain = Stages(PruningConfig("align", (1,), 0.5), BATCH, TOKENS, "cpu")
    plain.after_layer(0, torch.randn(BATCH, 3, TOKENS), torch.randn(BATCH, TOKENS, 4))
    assert plain.scan.alignment == "prev" and plain.scan.flipped_map is None and plain.scan.paths is None
    assert UNPRUNED.alignment == "none" and UNPRUNED.position_map is None


def _layer_scans(model, layers, images, **kwargs):
    """The ``scan`` argument each layer's forward received."""
    got = []
    position = 2 if isinstance(model, models.VisionMamba) else 1          # Block(hidden, residual, scan, ...)
    hooks = [layer.register_forward_pre_hook(lambda m, args: got.append(args[position])) for layer in layers]
    try:
        with torch.no_grad():
            model(images, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return got


@pytest.mark.parametrize("name", ["vim_tiny", "plainmamba_l1"])
@pytest.mark.parametrize("mode", ["dense", "align", "relabel", "mask"])
def test_both_models_hand_every_layer_the_stages_scan(name, mode):
    torch.manual_seed(0)
    cfg = None if mode == "dense" else PruningConfig(mode, (1, 3), 0.6)
    model = models.create(name, pruning=cfg, img_size=32, depth=4, num_classes=3).eval()
    layers = model.layers if name == "vim_tiny" else model.backbone.layers
    scans = _layer_scans(model, layers, torch.randn(2, 3, 32, 32))
    assert len(scans) == 4 and all(isinstance(s, StageScan) for s in scans)
    assert scans[1] is scans[2], "layers 2 and 3 share the first stage's scan"
    assert len({id(s) for s in scans}) == (1 if mode in ("dense", "mask") else 3)
    pruned = mode in ("align", "relabel")
    applied = cfg.alignment if pruned else "none"           # relabel's own alignment is "none" too
    assert [s.alignment for s in scans] == ["none", applied, applied, applied]
    assert all((s.position_map is not None) == (pruned and i > 0) for i, s in enumerate(scans))
    if name == "vim_tiny":
        assert all((s.flipped_map is not None) == (s.position_map is not None) for s in scans)
    else:
        assert all(len(s.paths) == 4 for s in scans)


def test_a_vim_mixer_refuses_a_pruned_scan_without_the_backward_branchs_map():
    mixer = models.vim.BiMambaMixer(16)
    positions = torch.tensor([[0, 2, 3]])
    scan = StageScan.of(positions, TorchPositionMap(positions, 5), "prev")              # flipped=False
    with pytest.raises(ValueError, match="flipped=True"):
        mixer(torch.randn(1, 3, 16), scan)
