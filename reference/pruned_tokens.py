"""What becomes of the pruned tokens, and where the class token goes (SPEC §4), for one image.

The models do this with batched torch ops (``models.stages``); these loops are their
reference, tested equal. ``x`` is one image's current token stream (n, D), ``kept`` the
ascending indices (into those n tokens) a stage keeps, ``positions`` the tokens' places on
the unpruned path (n,).

    "drop"   x[kept]                                   (the paper: the pruned tokens are gone)
    "fuse"   x[kept], then one token: the pruned tokens' importance-weighted average
             (EViT's fused token), at a slot after the whole path (none if nothing was
             pruned)
    "merge"  x[kept] with each run of consecutive pruned tokens averaged into one token
             in its place, at the position of the run's last token (so under "align" the
             run's length is the merged token's step from the kept token before it)
"""
from __future__ import annotations

import numpy as np

__all__ = ["PRUNED_TOKENS", "fusion_weights", "fuse_pruned", "merge_runs", "recentre_order"]

# The three rules above, by name; the models and the command line offer these (via alignscan.registry).
PRUNED_TOKENS = ("drop", "fuse", "merge")


def _pruned(n, kept):
    is_kept = np.zeros(n, dtype=bool)
    is_kept[np.asarray(kept, dtype=np.int64)] = True
    return np.flatnonzero(~is_kept)


def fusion_weights(scores, pruned):
    """w_j for the pruned tokens j: their importance clipped at zero, normalised to sum 1;
    uniform when every clipped score is zero. (EViT weights by the class token's attention,
    a probability; importance scores are not, so they are normalised.)"""
    clipped = np.maximum(np.asarray(scores, np.float64)[pruned], 0.0)
    total = clipped.sum()
    if total > 0:
        return clipped / total
    return np.full(len(pruned), 1.0 / len(pruned)) if len(pruned) else clipped


def fuse_pruned(x, kept, scores):
    """(K + 1, D): the kept tokens in order, then the fused token Σ_j w_j·x_j over the pruned
    tokens j (``fusion_weights``); just the K kept tokens when nothing was pruned."""
    x = np.asarray(x, np.float64)
    pruned = _pruned(len(x), kept)
    if len(pruned) == 0:
        return x[np.asarray(kept, dtype=np.int64)]
    fused = np.zeros(x.shape[1])
    for weight, j in zip(fusion_weights(scores, pruned), pruned):
        fused += weight * x[j]
    return np.concatenate([x[np.asarray(kept, dtype=np.int64)], fused[None]])


def merge_runs(x, kept, positions):
    """(tokens (T, D), positions (T,)): walking the n tokens in order, a kept token stays as
    it is; a maximal run of consecutive pruned tokens becomes one token, their mean, at the
    position of the run's last token."""
    x = np.asarray(x, np.float64)
    positions = np.asarray(positions, np.int64)
    is_kept = np.zeros(len(x), dtype=bool)
    is_kept[np.asarray(kept, dtype=np.int64)] = True
    tokens, places = [], []
    j = 0
    while j < len(x):
        if is_kept[j]:
            tokens.append(x[j])
            places.append(positions[j])
            j += 1
            continue
        end = j
        while end + 1 < len(x) and not is_kept[end + 1]:
            end += 1
        tokens.append(x[j:end + 1].mean(axis=0))
        places.append(positions[end])
        j = end + 1
    return np.array(tokens).reshape(len(tokens), x.shape[1]), np.array(places, dtype=np.int64)


def recentre_order(n, cls_at):
    """The order that moves the class token (at index ``cls_at`` of n tokens) to index n // 2
    and keeps every other token's order: what the released ViM code does after every stage."""
    others = [i for i in range(n) if i != cls_at]
    middle = n // 2
    return np.array(others[:middle] + [cls_at] + others[middle:], dtype=np.int64)
