"""Layers both families share: stochastic depth (drop-path) for the residual branches, the
resampling of a learned position embedding to another patch grid, and the classifier head
as timm's API resets it.

Drop-path is as the official models use it: timm's ``DropPath`` with rates rising linearly
from 0 at the first layer to the model's ``drop_path_rate`` at the last. A rate of 0
(inference, and the released fine-tuning recipe) is an identity and needs no timm.

Position embeddings are resampled as timm resamples a ViT's (``resample_abs_pos_embed``:
bicubic with antialiasing over the patch grid), except that ViM's class token sits in the
middle of the sequence (after ``num_patches // 2`` patches, SPEC §5), not in front: its row is
taken out from there, the patch rows resampled, and the row put back in the middle of the
new grid.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["drop_paths", "resample_pos_embed", "classifier", "check_num_classes", "check_global_pool"]


def drop_paths(rate, depth):
    """One module per layer: timm's DropPath(r) with r = linspace(0, rate, depth), or
    nn.Identity where r is 0."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")
    if rate == 0:
        return [nn.Identity() for _ in range(depth)]
    from alignscan import vision
    vision.timm()
    from timm.layers import DropPath
    rates = [rate * i / max(1, depth - 1) for i in range(depth)]
    return [DropPath(r) if r > 0 else nn.Identity() for r in rates]


def resample_pos_embed(posemb, grid, middle_token=False, name="pos_embed"):
    """A position embedding (1, T, D) of a square patch grid, resampled to ``grid`` x ``grid``
    patches. ``middle_token``: one more row, the class token's, after the first half of the
    patches (ViM's midclstok: index num_patches // 2), kept as it is and put back after the
    first half of the new patches. The same grid gives ``posemb`` itself.

    Raises:
        ValueError: naming ``name``, when the rows are not a square grid (plus the class token).
    """
    import torch
    patches = posemb.shape[1] - (1 if middle_token else 0)
    old = math.isqrt(patches)
    if posemb.ndim != 3 or posemb.shape[0] != 1 or old * old != patches or old < 1:
        raise ValueError(f"{name} must be (1, tokens, width) over a square patch grid"
                         f"{' plus the class token' if middle_token else ''}, got {tuple(posemb.shape)}")
    if old == grid:
        return posemb
    from alignscan import vision
    vision.timm()
    from timm.layers import resample_abs_pos_embed
    if not middle_token:
        return resample_abs_pos_embed(posemb, [grid, grid], [old, old], num_prefix_tokens=0)
    c = patches // 2
    cls = posemb[:, c:c + 1]
    rest = resample_abs_pos_embed(torch.cat([posemb[:, :c], posemb[:, c + 1:]], dim=1), [grid, grid], [old, old],
                                  num_prefix_tokens=0)
    c = grid * grid // 2
    return torch.cat([rest[:, :c], cls, rest[:, c:]], dim=1)


def check_num_classes(num_classes):
    """``num_classes`` as an int >= 0 (0: no head, the model gives its features), else ValueError naming it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
    return num_classes


def classifier(width, num_classes, like=None):
    """The linear head of ``num_classes`` classes (nn.Identity for 0, as timm's models), freshly
    initialised; ``like``: a tensor whose device and dtype it takes (the old head's)."""
    if check_num_classes(num_classes) == 0:
        return nn.Identity()
    head = nn.Linear(width, num_classes)
    return head if like is None else head.to(device=like.device, dtype=like.dtype)


def check_global_pool(global_pool, fixed, model):
    """timm's ``global_pool`` argument: the family's one pooling (``fixed``), or None / "" for it."""
    if global_pool not in (None, "", fixed):
        raise ValueError(f"global_pool is fixed for {model} ({fixed!r}: the released models' pooling), "
                         f"got {global_pool!r}")
