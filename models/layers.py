"""Stochastic depth (drop-path) for the residual branches, as the official models use it:
timm's ``DropPath`` with rates rising linearly from 0 at the first layer to the model's
``drop_path_rate`` at the last. A rate of 0 (inference, and the released fine-tuning
recipe) is an identity and needs no timm."""
from __future__ import annotations

from torch import nn

__all__ = ["drop_paths"]


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
