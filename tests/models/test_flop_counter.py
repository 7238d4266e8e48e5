"""FLOPs counted by torch: the scan op has a FLOP formula registered with
``torch.utils.flop_counter`` (mamba_ssm's 9·B·L·D·N plus the gap terms), so
``FlopCounterMode`` counts any model that uses it; here it checks that the token counts
``models.flops`` uses are the tokens each layer of the running model really scans."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from alignscan import models, registry
from alignscan.bridges.scan_op import scan_flops
from alignscan.models.flops import token_counts


def _counted(model, images):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("name", ["vim_tiny", "plainmamba_l1"])
def test_the_counter_sees_every_scan_with_the_tokens_the_flop_recipe_counts(name, pruned):
    torch.manual_seed(0)
    model = models.create(name, pruning=models.paper_preset(name) if pruned else None, img_size=64, num_classes=10)
    counted = _counted(model.eval(), torch.randn(2, 3, 64, 64))["alignscan.selective_scan_fwd"]
    card = registry.card(name)
    E, N, depth = 2 * card.config["embed_dim"], 16, card.config["depth"]
    vim = card.family == "vim"
    tokens = 16 + (1 if vim else 0)                                        # 64 px: a 4 x 4 grid (+ class token)
    cfg = model.pruning if pruned else None
    per_layer = token_counts(depth, tokens, cfg, protected=1 if vim else 0) if pruned else [tokens] * depth
    scans_per_layer = 2 if vim else 4                                      # ViM: two directions; PlainMamba: four paths
    alignment = cfg.alignment if pruned else "none"
    expected = 0
    for layer, L in enumerate(per_layer):
        has_map = pruned and L < tokens
        expected += scans_per_layer * scan_flops(2, E, L, N, True, vim, has_map, alignment)
    assert counted == expected


def test_the_formula_is_mambas_count_plus_the_gap_terms():
    assert scan_flops(2, 8, 10, 4, False, False, False, "none") == 9 * 2 * 10 * 8 * 4
    assert scan_flops(2, 8, 10, 4, True, True, True, "prev") == 9 * 640 + 2 * 160 + 3 * 160
    assert scan_flops(2, 8, 10, 4, False, False, True, "hold") == 9 * 640 + 3 * 160 + 4 * 640
