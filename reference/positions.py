"""Position maps: where the remaining tokens sit on the unpruned scan path (SPEC §1, §3).

A position map is an integer array ``positions`` of shape (batch, M) or (M,): entry i is
the original index, along the scan path, of the i-th remaining token. It is strictly
increasing in each row and 0 <= positions < seqlen, where seqlen (L) is the length of
the unpruned path. ``validate_positions`` is the one validator every backend calls.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ALIGNMENTS",
    "PositionMap",
    "GapCoefficients",
    "check_seqlen",
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

# The alignments of SPEC §1: how the gaps that pruned tokens leave are filled.
ALIGNMENTS = ("prev", "self", "none", "hold")

# Direction labels of a path position: the move that arrived there (SPEC §3).
MOVE_START, MOVE_RIGHT, MOVE_LEFT, MOVE_UP, MOVE_DOWN = 0, 1, 2, 3, 4


# seqlen is stored as int64 and positions are compared with it: keep it well inside that type.
MAX_SEQLEN = 2 ** 62


def _as_integer_array(x, name):
    arr = np.asarray(x)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def check_seqlen(seqlen, name="seqlen"):
    """seqlen as a Python int: an int (not a bool), 0 <= seqlen < 2**62."""
    if isinstance(seqlen, (bool, np.bool_)) or not isinstance(seqlen, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {type(seqlen).__name__}")
    if seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {seqlen}")
    if seqlen >= MAX_SEQLEN:
        raise ValueError(f"{name} must be < 2**62, got {seqlen}")
    return int(seqlen)


def _check_rows(positions, seqlen_rows, name):
    """The rules of a position map (SPEC §1), checked on (batch, M) int64 positions."""
    if positions.size == 0:
        return
    if positions.min() < 0:
        raise ValueError(f"{name} must be >= 0, got min {positions.min()}")
    if positions.shape[1] > 1 and np.any(np.diff(positions, axis=1) <= 0):
        raise ValueError(f"{name} must be strictly increasing along each row")
    beyond = positions[:, -1] >= seqlen_rows
    if np.any(beyond):
        row = int(np.flatnonzero(beyond)[0])
        raise ValueError(f"{name} must be < seqlen={int(seqlen_rows[row])}, got max {positions[row, -1]}"
                         f"{f' in row {row}' if positions.shape[0] > 1 else ''}")


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
            >= seqlen; seqlen below M when positions is None.
    """
    if seqlen is not None:
        seqlen = check_seqlen(seqlen)
    if positions is None:
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)))
        if seqlen is not None and seqlen < length:
            raise ValueError(
                f"seqlen must be >= the number of tokens M={length} when positions is None, got {seqlen}")
    else:
        positions = _as_integer_array(positions, name)
        # (M,) and (1, M) cover every row, as a one-row map does (``fits``).
        if positions.ndim == 1 or (positions.ndim == 2 and positions.shape[0] == 1):
            positions = np.broadcast_to(positions, (batch, positions.shape[-1]))
        elif positions.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, M) or (M,), got ndim {positions.ndim}")
        if positions.shape[1] != length:
            raise ValueError(
                f"{name} must have M={length} entries per row (one per remaining token), "
                f"got shape {tuple(positions.shape)}")
        if positions.shape[0] != batch:
            raise ValueError(f"{name} must have batch={batch} rows (or one), got shape {tuple(positions.shape)}")
        positions = np.ascontiguousarray(positions, dtype=np.int64)
    if seqlen is not None:
        seqlen_rows = np.full(batch, seqlen, dtype=np.int64)
    elif length:
        seqlen_rows = positions[:, -1] + 1
    else:
        seqlen_rows = np.zeros(batch, dtype=np.int64)
    _check_rows(positions, seqlen_rows, name)
    return positions, seqlen_rows


class GapCoefficients(NamedTuple):
    """What a position map means for one alignment, as per-token arrays (SPEC §1).

    With these every alignment is one fused recurrence, at the cost of a dense scan:

        E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1}          (the timescale of token i)
        hold_i = q_i = g_i - 1 under "hold", else 0           (pruned steps that repeat
                                                               token i-1's input)
        trailing = seqlen - 1 - positions_{M-1}, 0 under "none" (pruned steps after the
                                                               last token, for last_state)
    """

    coef_self: Any   # (batch, M)
    coef_prev: Any   # (batch, M)
    hold: Any        # (batch, M)
    trailing: Any    # (batch,)


def fits(position_map, batch, length, name="positions"):
    """Whether a map (NumPy or torch) must be broadcast to fit a (batch, M) scan: False when it
    fits as it is, True for a one-row map; ValueError naming ``name`` otherwise."""
    if position_map.length != length:
        raise ValueError(f"{name} must have M={length} entries per row (one per remaining token), "
                         f"got a map with M={position_map.length}")
    if position_map.batch == batch:
        return False
    if position_map.batch != 1:
        raise ValueError(f"{name} must have batch={batch} rows (or one), got a map with {position_map.batch}")
    return True


def _owned(array):
    """A read-only copy that belongs to the map: a caller who changes the array they built the
    map from cannot change a validated map (or disagree with its cached coefficients)."""
    owned = np.array(array, copy=True, order="C")
    owned.setflags(write=False)
    return owned


class MapShape:
    """(batch, M) of a map's ``positions``: shared by ``PositionMap`` and its torch twin."""

    @property
    def batch(self):
        return self.positions.shape[0]

    @property
    def length(self):
        return self.positions.shape[1]


class PositionMap(MapShape):
    """A validated position map: where the M remaining tokens of each row sit on the
    unpruned scan path, and everything a scan derives from that (SPEC §1, §3).

    Made once per pruning stage and handed to every scan of that stage: the gaps, the
    per-alignment coefficients and the trailing steps are computed here, once, and cached.

        m = PositionMap(positions, seqlen)        # (batch, M) or (M,); seqlen int or None
        m.gaps, m.trailing, m.coefficients("prev", np.float32)
        m.flip()            # ViM's backward branch
        m.compose(kept)     # the next pruning stage
        m.path(order)       # PlainMamba: (index, map along a snake path)

    ``bridges.TorchPositionMap`` is its twin on torch tensors (same methods, arrays on the
    scan's device, built through this class so the rules stay here).

    Attributes:
        positions: (batch, M) int64, strictly increasing in each row.
        seqlen_rows: (batch,) int64, the unpruned path length of each row.
    """

    is_position_map = True

    def __init__(self, positions=None, seqlen=None, *, batch=None, length=None, name="positions"):
        if positions is not None and batch is None:
            arr = np.asarray(positions)
            batch = arr.shape[0] if arr.ndim == 2 else 1
            length = arr.shape[-1] if arr.ndim else 0
        if batch is None or length is None:
            raise ValueError("a PositionMap without positions needs batch and length")
        positions, seqlen_rows = validate_positions(positions, batch=batch, length=length, seqlen=seqlen, name=name)
        self.positions, self.seqlen_rows = _owned(positions), _owned(seqlen_rows)
        self._coefficients = {}
        self.device_cache = {}   # per backend: coefficients already copied to its device

    @classmethod
    def from_rows(cls, positions, seqlen_rows, name="positions"):
        """A map with one path length per row (what flip and compose produce); checked."""
        obj = cls.__new__(cls)
        obj.positions = _owned(_as_integer_array(positions, name))
        if obj.positions.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, M), got ndim {obj.positions.ndim}")
        obj.seqlen_rows = _owned(_as_integer_array(seqlen_rows, "seqlen_rows"))
        if obj.seqlen_rows.shape != (obj.positions.shape[0],):
            raise ValueError(f"seqlen_rows must have shape (batch,) = ({obj.positions.shape[0]},), "
                             f"got {obj.seqlen_rows.shape}")
        _check_rows(obj.positions, obj.seqlen_rows, name)
        obj._coefficients = {}
        obj.device_cache = {}
        return obj

    def __repr__(self):
        return f"PositionMap(batch={self.batch}, M={self.length}, seqlen={np.unique(self.seqlen_rows).tolist()})"

    def fit(self, batch, length, name="positions"):
        """This map for a scan of (batch, M) tokens: a one-row map broadcasts over the batch."""
        if not fits(self, batch, length, name):
            return self
        return PositionMap.from_rows(np.broadcast_to(self.positions, (batch, length)),
                                     np.broadcast_to(self.seqlen_rows, (batch,)), name)

    @cached_property
    def gaps(self):
        """g_i = positions_i - positions_{i-1}, g_0 = 1 (SPEC §1); (batch, M) int64."""
        return gaps(self.positions)

    @cached_property
    def trailing(self):
        """Pruned steps after the last remaining token: seqlen - 1 - positions_{M-1}; (batch,)."""
        if self.length == 0:
            return np.zeros(self.batch, dtype=np.int64)
        return self.seqlen_rows - 1 - self.positions[:, -1]

    def coefficients(self, alignment, dtype=np.float64):
        """``GapCoefficients`` of this map under an alignment, arrays of ``dtype`` (SPEC §1):

            "prev", "hold": (coef_self, coef_prev) = (1, g_i - 1)
            "self":         (g_i, 0)
            "none":         (1, 0), no trailing steps
            token 0:        (1, 0) always (g_0 = 1)
            hold:           g_i - 1 under "hold", 0 otherwise
        """
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        key = (alignment, np.dtype(dtype))
        if key not in self._coefficients:
            g = self.gaps.astype(dtype)
            ones, zeros = np.ones_like(g), np.zeros_like(g)
            coef_self = g if alignment == "self" else ones
            coef_prev = g - 1 if alignment in ("prev", "hold") else zeros
            hold = g - 1 if alignment == "hold" else zeros
            trailing = np.zeros(self.batch, dtype) if alignment == "none" else self.trailing.astype(dtype)
            self._coefficients[key] = GapCoefficients(coef_self, coef_prev, hold, trailing)
        return self._coefficients[key]

    def is_dense(self):
        """True when nothing is pruned: positions = arange(M) and no trailing steps."""
        return bool(np.all(self.gaps == 1) and np.all(self.trailing == 0) and
                    (self.length == 0 or np.all(self.positions[:, 0] == 0)))

    def flip(self):
        """The map of the flipped sequence (ViM's backward branch, SPEC §3)."""
        return PositionMap.from_rows(flip_positions(self.positions, self.seqlen_rows[:, None]), self.seqlen_rows)

    def compose(self, kept):
        """The map after a further pruning step keeping ``kept`` (batch, K), (1, K) or (K,) of
        the current tokens, ascending (SPEC §3: ``positions[kept]``); a one-row map or a
        one-row ``kept`` covers every row of the other."""
        positions = compose(self.positions, kept)
        return PositionMap.from_rows(positions, np.broadcast_to(self.seqlen_rows, positions.shape[:1]))

    def path(self, order):
        """This map's positions read as raster indices, ordered along the scan path ``order``
        (a permutation of range(L), L = seqlen): ``(index, map)`` with ``index`` the compact
        order along the path and ``map`` the tokens' ranks on it (SPEC §3, PlainMamba)."""
        order = _as_integer_array(order, "order")
        if np.any(self.seqlen_rows != order.size):
            raise ValueError(f"order must have seqlen={int(self.seqlen_rows[0])} entries, got {order.size}")
        index, positions = path_positions(self.positions, order)
        return index, PositionMap.from_rows(positions, self.seqlen_rows)


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
    seqlen = check_seqlen(seqlen)
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
    ``seqlen``: an int, or integers broadcasting against ``positions`` (one per row).
    Flipping twice is the identity. The one place this rule is written.
    """
    positions = _as_integer_array(positions, "positions")
    seqlen = check_seqlen(seqlen) if np.ndim(seqlen) == 0 else _as_integer_array(seqlen, "seqlen")
    return seqlen - 1 - positions[..., ::-1]


def compose(positions, kept):
    """Positions after a further pruning step (SPEC §3: ``positions[kept]``).

    Args:
        positions: (batch, M) or (M,) positions before the step.
        kept: (batch, K) or (K,) indices into the current compact sequence, strictly
            increasing in each row.
    """
    positions = _as_integer_array(positions, "positions")
    kept = _as_integer_array(kept, "kept")
    if positions.ndim not in (1, 2):
        raise ValueError(f"positions must have shape (batch, M) or (M,), got ndim {positions.ndim}")
    if kept.ndim not in (1, 2):
        raise ValueError(f"kept must have shape (batch, K) or (K,), got ndim {kept.ndim}")
    rows = positions.shape[0] if positions.ndim == 2 else 1
    if kept.ndim == 2 and kept.shape[0] not in (1, rows) and rows != 1:
        raise ValueError(f"kept must have batch={rows} rows (or one), got shape {tuple(kept.shape)}")
    if kept.size and (kept.min() < 0 or kept.max() >= positions.shape[-1]):
        raise ValueError(f"kept must index the {positions.shape[-1]} current tokens")
    if kept.shape[-1] > 1 and np.any(np.diff(kept, axis=-1) <= 0):
        raise ValueError("kept must be strictly increasing along each row")
    if positions.ndim == 1 and kept.ndim == 1:
        return positions[kept]
    positions2, kept2 = np.atleast_2d(positions), np.atleast_2d(kept)
    batch = max(positions2.shape[0], kept2.shape[0])     # one row of either covers every row of the other
    positions2 = np.broadcast_to(positions2, (batch, positions2.shape[1]))
    kept2 = np.broadcast_to(kept2, (batch, kept2.shape[1]))
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
