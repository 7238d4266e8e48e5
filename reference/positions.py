"""Position maps: where the remaining tokens sit on the unpruned scan path (SPEC §1, §3).

A position map is an integer array ``positions`` of shape (batch, M) or (M,): entry i is
the original index, along the scan path, of the i-th remaining token. It is strictly
increasing in each row and 0 <= positions < seqlen, where seqlen (L) is the length of
the unpruned path. ``validate_positions`` is the one validator every backend calls.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "validate_positions",
    "mask_to_positions",
    "positions_to_mask",
    "gaps",
    "flip_positions",
    "compose",
    "snake_paths",
    "path_positions",
    "MOVE_START",
    "MOVE_RIGHT",
    "MOVE_LEFT",
    "MOVE_UP",
    "MOVE_DOWN",
]

# Direction labels of a path position: the move that arrived there (SPEC §3).
MOVE_START, MOVE_RIGHT, MOVE_LEFT, MOVE_UP, MOVE_DOWN = 0, 1, 2, 3, 4


def _as_integer_array(x, name):
    arr = np.asarray(x)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_seqlen(seqlen, name="seqlen"):
    if isinstance(seqlen, (bool, np.bool_)) or not isinstance(seqlen, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {type(seqlen).__name__}")
    if seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {seqlen}")
    return int(seqlen)


def validate_positions(positions, *, batch, length, seqlen=None, name="positions"):
    """Check a position map and return it in the one layout every kernel takes.

    Args:
        positions: (batch, M) or (M,) integers, or None (no pruning: ``arange(M)``).
        batch: the batch size the map must fit.
        length: M, the number of remaining tokens the map must describe.
        seqlen: length L of the unpruned path, or None (each row ends at its last
            remaining token, ``positions[..., -1] + 1``).

    Returns:
        ``(positions, seqlen_rows)``: a C-contiguous int64 array (batch, M) and an int64
        array (batch,) with the path length of each row.

    Raises:
        TypeError: positions is not integer, or seqlen not an int.
        ValueError: wrong ndim, length or batch; not strictly increasing; negative;
            >= seqlen.
    """
    if seqlen is not None:
        seqlen = _check_seqlen(seqlen)
    if positions is None:
        rows = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        positions = np.ascontiguousarray(rows)
        if seqlen is not None and seqlen < length:
            raise ValueError(
                f"seqlen must be >= the number of tokens M={length} when positions is None, got {seqlen}")
    else:
        positions = _as_integer_array(positions, name)
        if positions.ndim == 1:
            positions = np.broadcast_to(positions, (batch, positions.shape[0]))
        elif positions.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, M) or (M,), got ndim {positions.ndim}")
        if positions.shape[1] != length:
            raise ValueError(
                f"{name} must have M={length} entries per row (one per remaining token), "
                f"got shape {tuple(positions.shape)}")
        if positions.shape[0] != batch:
            raise ValueError(f"{name} must have batch={batch} rows, got shape {tuple(positions.shape)}")
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if length and positions.min() < 0:
            raise ValueError(f"{name} must be >= 0, got min {positions.min()}")
        if length > 1 and np.any(np.diff(positions, axis=1) <= 0):
            raise ValueError(f"{name} must be strictly increasing along each row")
        if seqlen is not None and length and positions.max() >= seqlen:
            raise ValueError(f"{name} must be < seqlen={seqlen}, got max {positions.max()}")
    if seqlen is not None:
        seqlen_rows = np.full(batch, seqlen, dtype=np.int64)
    elif length:
        seqlen_rows = positions[:, -1] + 1
    else:
        seqlen_rows = np.zeros(batch, dtype=np.int64)
    return positions, seqlen_rows


def mask_to_positions(mask):
    """Keep-mask (batch, L) or (L,) of bools -> positions (batch, M) or (M,).

    Every row must keep the same number of tokens (the scan takes a dense (batch, M) block).
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.ndim == 1:
        return np.flatnonzero(mask).astype(np.int64)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (batch, L) or (L,), got ndim {mask.ndim}")
    counts = mask.sum(axis=1)
    if mask.shape[0] and np.any(counts != counts[0]):
        raise ValueError(f"mask must keep the same number of tokens in every row, got counts {counts.tolist()}")
    m = int(counts[0]) if mask.shape[0] else 0
    return np.nonzero(mask)[1].reshape(mask.shape[0], m).astype(np.int64)


def positions_to_mask(positions, seqlen):
    """Positions (batch, M) or (M,) -> keep-mask of shape (batch, seqlen) or (seqlen,)."""
    seqlen = _check_seqlen(seqlen)
    positions = np.asarray(positions)
    one_row = positions.ndim == 1
    rows, _ = validate_positions(positions, batch=1 if one_row else positions.shape[0],
                                 length=positions.shape[-1], seqlen=seqlen)
    mask = np.zeros((rows.shape[0], seqlen), dtype=bool)
    np.put_along_axis(mask, rows, True, axis=1)
    return mask[0] if one_row else mask


def gaps(positions):
    """g_i = positions_i - positions_{i-1} for i >= 1 and g_0 = 1 (SPEC §1); same shape."""
    positions = _as_integer_array(positions, "positions")
    g = np.ones_like(positions)
    g[..., 1:] = np.diff(positions, axis=-1)
    return g


def flip_positions(positions, seqlen):
    """Positions of the flipped sequence, for ViM's backward branch (SPEC §3).

    The backward branch scans ``x.flip(-1)``; token i of the flipped compact sequence is
    token M-1-i of the original one, at path index seqlen-1-positions[M-1-i].
    Flipping twice is the identity.
    """
    seqlen = _check_seqlen(seqlen)
    positions = _as_integer_array(positions, "positions")
    return seqlen - 1 - positions[..., ::-1]


def compose(positions, kept):
    """Positions after a further pruning step (SPEC §3: ``positions[kept]``).

    Args:
        positions: (batch, M) or (M,) positions before the step.
        kept: (batch, K) or (K,) indices into the current compact sequence, ascending.
    """
    positions = _as_integer_array(positions, "positions")
    kept = _as_integer_array(kept, "kept")
    if kept.size and (kept.min() < 0 or kept.max() >= positions.shape[-1]):
        raise ValueError(f"kept must index the {positions.shape[-1]} current tokens")
    if positions.ndim == 1 and kept.ndim == 1:
        return positions[kept]
    positions2, kept2 = np.atleast_2d(positions), np.atleast_2d(kept)
    if positions2.shape[0] != kept2.shape[0]:
        positions2 = np.broadcast_to(positions2, (kept2.shape[0], positions2.shape[1]))
    return np.take_along_axis(positions2, kept2, axis=1)


def _move_label(prev, cur, width):
    """The move that goes from raster cell prev to raster cell cur on a grid of this width."""
    dr, dc = cur // width - prev // width, cur % width - prev % width
    if (dr, dc) == (0, 1):
        return MOVE_RIGHT
    if (dr, dc) == (0, -1):
        return MOVE_LEFT
    if (dr, dc) == (-1, 0):
        return MOVE_UP
    if (dr, dc) == (1, 0):
        return MOVE_DOWN
    raise AssertionError(f"cells {prev} and {cur} are not grid neighbours")


def snake_paths(height, width):
    """The four PlainMamba scan paths on an H x W grid and their direction labels (SPEC §3).

    Returns:
        ``(orders, labels)``, both int64 (4, H*W). ``orders[k][t]`` is the raster index of
        the t-th token on path k: o1 snakes the rows (row 0 left to right, row 1 right to
        left, ...), o2 = reverse(o1), o3 snakes the columns (column 0 top to bottom,
        column 1 bottom to top, ...), o4 = reverse(o3). ``labels[k][t]`` is the move that
        arrived at path position t: 0 start, 1 right, 2 left, 3 up, 4 down.
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    rows = [grid[r] if r % 2 == 0 else grid[r, ::-1] for r in range(height)]
    o1 = np.concatenate(rows)
    cols = [grid[:, c] if c % 2 == 0 else grid[::-1, c] for c in range(width)]
    o3 = np.concatenate(cols)
    orders = np.stack([o1, o1[::-1], o3, o3[::-1]])
    labels = np.zeros_like(orders)
    for k in range(4):
        for t in range(1, orders.shape[1]):
            labels[k, t] = _move_label(orders[k, t - 1], orders[k, t], width)
    return orders, labels


def path_positions(kept, order):
    """Kept raster tokens in the order of one scan path, and their positions on it (SPEC §3).

    Args:
        kept: (batch, K) or (K,) raster indices of the kept tokens, ascending.
        order: (L,) a path order, e.g. one row of ``snake_paths``.

    Returns:
        ``(index, positions)``, shaped like ``kept``: ``kept[..., index]`` are the kept
        tokens in path order (the compact sequence the path's scan reads), and
        ``positions`` their ranks on the path, strictly increasing.
    """
    order = _as_integer_array(order, "order")
    kept = _as_integer_array(kept, "kept")
    if order.ndim != 1 or not np.array_equal(np.sort(order), np.arange(order.size)):
        raise ValueError("order must be a permutation of range(L)")
    if kept.size and (kept.min() < 0 or kept.max() >= order.size):
        raise ValueError(f"kept must hold raster indices in [0, {order.size})")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ranks = rank[kept]
    index = np.argsort(ranks, axis=-1, kind="stable")
    return index, np.take_along_axis(ranks, index, axis=-1)
