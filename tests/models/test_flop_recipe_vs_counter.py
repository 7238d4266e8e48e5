"""``models.flops`` (the paper's recipes) checked against torch's ``FlopCounterMode`` for all
five models, dense and pruned. The two do not count the same things, so the check is exact
in two steps:

1. what the counter measures over the matmuls and convolutions of a real forward equals,
   to the multiply-accumulate, the closed form of the model's own layers (every token the
   model really runs, both ViM directions, the bias-free convolutions); and
2. the recipe equals that plus named differences, each of which is a choice of the recipe
   (SPEC §5), not of the model:
   ViM: the dense recipe counts 196 tokens (no class token), the model runs 197; conv1d,
   x_proj and dt_proj are counted once, the model runs them per direction; the recipe adds
   its scan term 2·(5·E·L·N + 2·E·L) and the norm L·D.
   PlainMamba: the recipe adds the convolutions' biases, BatchNorm (2 per element), ReLU
   (1), the LayerNorms (2) and the authors' SSM term 4·(9·E·N·L + E·L), and leaves out the
   head (mmcv's counter ran over the backbone).
Convolutions and matmuls are counted by the counter as 2 FLOPs per multiply-accumulate."""
import math

import pytest
import torch

from alignscan import models, registry
from alignscan.models.flops import LINEAR_OPS, SCAN_OP, counted, token_counts

IMG, CLASSES, N = 64, 10, 16


def _measure(model):
    linear, scan, counts = counted(model, torch.randn(1, 3, IMG, IMG))
    assert sum(v for k, v in counts.items() if k in LINEAR_OPS) % 2 == 0 and scan == counts[SCAN_OP] > 0
    return linear, counts


def _vim(card, tokens):
    D = card.config["embed_dim"]
    E, R, patches = 2 * D, math.ceil(D / 16), (IMG // 16) ** 2
    fixed = patches * 3 * 16 * 16 * D + D * CLASSES                     # patch embed, head
    counted = fixed + sum(L * D * 2 * E + 2 * (L + 3) * E * 4 + 2 * L * E * (R + 2 * N) + 2 * L * R * E + L * E * D
                          for L in tokens)
    return counted


def _vim_differences(card, tokens, recipe_tokens):
    D = card.config["embed_dim"]
    E, R = 2 * D, math.ceil(D / 16)
    total = 0
    for L, Lr in zip(tokens, recipe_tokens):
        total += (Lr - L) * (D * 2 * E + E * 4 + E * (R + 2 * N) + R * E + E * D)   # 196 vs 197 tokens (dense)
        total -= (L + 3) * E * 4 + L * E * (R + 2 * N) + L * R * E            # counted once, run per direction
        total += 2 * (5 * E * Lr * N + 2 * E * Lr) + Lr * D                  # the recipe's scan term and norm
    return total


def _plainmamba(card, tokens):
    c = card.config
    D, E, R = c["embed_dim"], 2 * c["embed_dim"], math.ceil(c["embed_dim"] / 16)
    s, grid, mid = IMG // 2, (IMG // 16) ** 2, 64
    counted = s * s * mid * 3 * 49 + c["stem_convs"] * s * s * mid * mid * 9 + grid * D * mid * 64 + D * CLASSES
    for i, L in enumerate(tokens):
        counted += L * D * 2 * E + grid * E * 49 + L * E * (R + 2 * N) + L * R * E + L * E * D
        if i == 0 and c["dw_after_first"]:
            counted += grid * D * 9
    return counted


def _plainmamba_differences(card, tokens):
    c = card.config
    D, E = c["embed_dim"], 2 * c["embed_dim"]
    s, grid, mid = IMG // 2, (IMG // 16) ** 2, 64
    total = (1 + c["stem_convs"]) * s * s * mid * 3 + grid * D - D * CLASSES     # BN + ReLU, projection bias; no head
    for i, L in enumerate(tokens):
        total += 2 * L * D + grid * E + 4 * (9 * E * N * L + E * L)            # LayerNorm, conv bias, SSM term
        if i == 0 and c["dw_after_first"]:
            total += 2 * grid * D                                              # BN after the 3x3
    return total + 2 * tokens[-1] * D                                          # ln1 on the last layer's tokens


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "paper preset"])
@pytest.mark.parametrize("name", registry.NAMES)
def test_the_recipe_is_the_counted_work_plus_its_named_differences(name, pruned):
    torch.manual_seed(0)
    card = registry.card(name)
    depth = card.config["depth"]
    cfg = models.paper_preset(name, keep_ratio=0.7) if pruned else None
    model = models.create(name, pruning=cfg, img_size=IMG, num_classes=CLASSES).eval()
    measured, counts = _measure(model)
    vim = card.family == "vim"
    grid = (IMG // 16) ** 2
    tokens = token_counts(depth, grid + vim, model.pruning if pruned else None, protected=int(vim))
    assert "alignscan.selective_scan_fwd" in counts                         # every scan counted by the op's formula
    recipe = round(models.flops(model) * 1e9)
    if vim:
        assert measured == _vim(card, tokens)
        recipe_tokens = tokens if pruned else [grid] * depth
        assert recipe == measured + _vim_differences(card, tokens, recipe_tokens)
    else:
        assert measured == _plainmamba(card, tokens)
        assert recipe == measured + _plainmamba_differences(card, tokens)
