"""A task where scan distance matters, generated in code (no download).

Each 32x32 grey image is a textured background (every 4x4 patch has content: no blank
tokens) with two identical marks, a bright cross filling one patch each, at random patches
p1 < p2 of the 8x8 grid. The label is whether their distance along the raster scan path,
p2 - p1, exceeds THRESHOLD (balanced; distances within MARGIN of it are not drawn). The
placement is uniform, so no absolute position answers alone: the model must relate the two
marks, which a scan does by the decay of the state one mark leaves until the other (it also
has learned position embeddings; without them the small ViM did not learn the task in 10
epochs: 49 % test accuracy, measured). If the paper's alignment matters anywhere, it is
here: pruning background tokens between the marks shortens the path under "relabel" and
keeps it under "align".

Pruning in the experiment removes background tokens only, the same ones for every mode
(``background_plan``): the marks and ViM's class token always stay.
"""
from __future__ import annotations

import numpy as np

__all__ = ["GRID", "PATCH", "THRESHOLD", "MARGIN", "make_images", "load_distance_split", "mark_tokens",
           "background_plan", "pair_pools", "span", "span_plans", "pair_overlap", "TEST_PAIR_SHARE", "distance_marks",
           "redrawn_test_split"]

GRID = 8            # 8 x 8 patches of 4 x 4 pixels: a 32 x 32 image
PATCH = 4
THRESHOLD = 19      # label 1: p2 - p1 > 19 (half of the uniform pairs' distances lie above)
MARGIN = 3          # distances within 3 of the threshold (16..22) are not drawn: the labels are unambiguous
TRAIN, TEST = 8000, 1000
TEST_PAIR_SHARE = 0.2   # the held-out variant: a fifth of the mark pairs (p1, p2) appear only at test time


def _distances(rng, n):
    """Distances d = p2 - p1, half above THRESHOLD + MARGIN, half below THRESHOLD - MARGIN,
    each drawn as uniform pairs on the path would give them (P(d) ∝ 64 - d)."""
    cells = GRID * GRID
    near = np.arange(1, THRESHOLD - MARGIN)                  # |d - THRESHOLD| > MARGIN on both sides
    far = np.arange(THRESHOLD + MARGIN + 1, cells)
    labels = rng.integers(0, 2, n)
    out = np.empty(n, dtype=np.int64)
    for label, support in ((0, near), (1, far)):
        weights = (cells - support).astype(float)
        idx = labels == label
        out[idx] = rng.choice(support, size=int(idx.sum()), p=weights / weights.sum())
    return out, labels


def pair_pools(split_seed):
    """(train pairs, test pairs): every mark pair (p1 < p2) the task draws (distance not
    within MARGIN of THRESHOLD), split once by a seeded draw so that TEST_PAIR_SHARE of them
    appear only in test images: a model that memorised pairs (p1, p2) -> label cannot answer
    those."""
    cells = GRID * GRID
    pairs = np.array([(a, b) for a in range(cells) for b in range(a + 1, cells) if abs(b - a - THRESHOLD) > MARGIN])
    held = np.random.default_rng(5000 + split_seed).random(len(pairs)) < TEST_PAIR_SHARE
    return pairs[~held], pairs[held]


def _pairs_from(pool, rng, n):
    """n pairs drawn from ``pool``, balanced between near and far, uniform within each."""
    far = pool[:, 1] - pool[:, 0] > THRESHOLD
    labels = rng.integers(0, 2, n)
    marks = np.empty((n, 2), dtype=np.int64)
    for label, members in ((0, pool[~far]), (1, pool[far])):
        idx = labels == label
        marks[idx] = members[rng.integers(0, len(members), int(idx.sum()))]
    return marks[:, 1] - marks[:, 0], labels, marks


def make_images(n, seed, pool=None):
    """(images (n, 1, 32, 32) float32 in [0, 1], labels (n,) int64, marks (n, 2) patch indices).
    pool: draw the mark pairs from these (``pair_pools``) instead of from every pair."""
    rng = np.random.default_rng(seed)
    if pool is None:
        d, labels = _distances(rng, n)
        p1 = rng.integers(0, GRID * GRID - d)
        marks = np.stack([p1, p1 + d], axis=1)
    else:
        d, labels, marks = _pairs_from(np.asarray(pool), rng, n)
    # Texture: a level per patch plus pixel noise, so every token carries something.
    levels = rng.uniform(0.15, 0.55, (n, GRID, GRID))
    images = np.repeat(np.repeat(levels, PATCH, axis=1), PATCH, axis=2)
    images += rng.normal(0.0, 0.06, images.shape)
    cross = np.zeros((PATCH, PATCH))
    cross[PATCH // 2 - 1:PATCH // 2 + 1, :] = 1.0
    cross[:, PATCH // 2 - 1:PATCH // 2 + 1] = 1.0
    for k in range(n):
        for p in marks[k]:
            r, c = divmod(int(p), GRID)
            block = images[k, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            images[k, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = np.where(cross > 0, 0.95, block * 0.5)
    images = np.clip(images, 0.0, 1.0).astype(np.float32)[:, None]
    return images, labels.astype(np.int64), marks


def distance_marks(split, seed=0, held_out=False, n=None):
    """The marks of a split ("train", "test" or "validation") as ``load_distance_split`` draws
    them (validation: images like the training ones, for the training bar)."""
    return _draw(split, seed, held_out, n)[2]


def _draw(split, seed, held_out, n=None, images_seed=None):
    """A split's (images, labels, marks): mark pairs from ``seed``'s pools, images from
    ``offset + seed``, or from ``images_seed`` where given (a fresh draw of the same split)."""
    offset, size = {"train": (1000, TRAIN), "test": (2000, TEST), "validation": (3000, TEST)}[split]
    pool = None
    if held_out:
        train_pairs, test_pairs = pair_pools(seed)
        pool = test_pairs if split == "test" else train_pairs
    return make_images(size if n is None else n, seed=offset + seed if images_seed is None else images_seed, pool=pool)


def redrawn_test_split(images_seed, split_seed=0, held_out=True, n=None):
    """(x, y tensors, marks): the test split (its mark pairs: with ``held_out``, the test pairs
    of ``pair_pools(split_seed)``) with its images drawn from ``images_seed`` instead of the
    offset every other run uses, so that none of them was seen before (``n``: the first n)."""
    import torch
    x, y, marks = _draw("test", split_seed, held_out, images_seed=images_seed)
    n = len(y) if n is None else n
    return torch.from_numpy(x[:n]), torch.from_numpy(y[:n]), marks[:n]


def load_distance_split(seed=0, held_out=False, split=("train", "test")):
    """(x, y) tensors of each split named, in order (default: x_train, y_train, x_test,
    y_test); the sets are drawn from fixed seeds. held_out: the test images' mark pairs
    never occur in training (``pair_pools``)."""
    import torch
    out = []
    for name in split:
        x, y, _ = _draw(name, seed, held_out)
        out += [torch.from_numpy(x), torch.from_numpy(y)]
    return tuple(out)


def mark_tokens(marks, cls_index=GRID * GRID // 2):
    """ViM token indices of the marks (the class token sits at cls_index, after the first
    cls_index patches)."""
    marks = np.asarray(marks)
    return np.where(marks < cls_index, marks, marks + 1)


def background_plan(marks, keep_ratios, seed, tokens=GRID * GRID + 1, cls_index=GRID * GRID // 2, rule="ceil"):
    """A keep plan (one (n, K) int64 tensor per stage) that prunes background tokens only:
    the class token and the two marks stay; the background kept at each stage is a seeded
    random subset of the last stage's, of keep_count(n, r, protected=3) tokens in all."""
    import torch

    from alignscan import reference as R
    rng = np.random.default_rng(seed)
    protected = np.concatenate([np.full((len(marks), 1), cls_index), mark_tokens(marks, cls_index)], axis=1)
    current = [np.arange(tokens) for _ in range(len(marks))]
    plan = []
    for ratio in keep_ratios:
        rows = []
        for row, prot in zip(current, protected):
            k = R.keep_count(len(row), ratio, n_protected=3, rule=rule)
            background = np.setdiff1d(row, prot)
            chosen = rng.choice(background, size=k - 3, replace=False)
            rows.append(np.sort(np.concatenate([prot, chosen])))
        current = rows
        plan.append(torch.as_tensor(np.stack(rows), dtype=torch.int64))
    return plan


def span(marks, cls_index=GRID * GRID // 2):
    """(first, last) ViM token index of the scan span that joins the two marks and the class
    token (the head reads the class token, so what a mark leaves must travel to it)."""
    special = np.concatenate([mark_tokens(marks, cls_index), np.full((len(marks), 1), cls_index)], axis=1)
    return special.min(axis=1), special.max(axis=1)


def span_plans(marks, remove, seed, tokens=GRID * GRID + 1, cls_index=GRID * GRID // 2):
    """Two keep plans that remove the *same number* (``remove``) of background tokens from
    each image, once, before the first pruning stage and no more after it:

    (a) "inside": all removed tokens lie strictly inside the span joining the marks and the
        class token, so that the scan distance between them shrinks under "relabel";
    (b) "outside": all lie outside it, so that no distance between them changes.

    Returns (plan_a, plan_b, eligible): each plan a (n_eligible, tokens - remove) int64 array
    of kept token indices (ascending), for the images that have at least ``remove``
    background tokens on both sides (``eligible``: their indices into ``marks``). The draw is
    seeded; the marks and the class token are never removed."""
    marks = np.asarray(marks)
    first, last = span(marks, cls_index)
    protected = np.concatenate([mark_tokens(marks, cls_index), np.full((len(marks), 1), cls_index)], axis=1)
    rng = np.random.default_rng(seed)
    plan_a, plan_b, eligible = [], [], []
    every = np.arange(tokens)
    for i in range(len(marks)):
        background = np.setdiff1d(every, protected[i])
        inside = background[(background > first[i]) & (background < last[i])]
        outside = background[(background < first[i]) | (background > last[i])]
        if len(inside) < remove or len(outside) < remove:
            continue
        eligible.append(i)
        for pool, plan in ((inside, plan_a), (outside, plan_b)):
            plan.append(np.setdiff1d(every, rng.choice(pool, size=remove, replace=False)))
    shape = (0, tokens - remove)
    return (np.stack(plan_a) if plan_a else np.empty(shape, np.int64),
            np.stack(plan_b) if plan_b else np.empty(shape, np.int64), np.asarray(eligible, dtype=np.int64))


def pair_overlap(train_marks, test_marks):
    """Share of test images whose mark pair (p1, p2) also occurs in the training set."""
    seen = {tuple(p) for p in np.asarray(train_marks).tolist()}
    return float(np.mean([tuple(p) in seen for p in np.asarray(test_marks).tolist()])) if len(test_marks) else 0.0
