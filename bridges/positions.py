"""``TorchPositionMap``: the torch twin of ``reference.PositionMap``, on the scan's device.

Everything a scan needs from a position map — the positions, each row's path length, the
gap coefficients of every alignment and the trailing steps (SPEC §1), and the maps that
``flip``, ``compose`` and ``path`` make (SPEC §3) — is computed here with torch ops where
the positions are: nothing goes to the host, so a pruned model's forward never waits for
it, captures in a CUDA graph, and traces whole under ``torch.compile(fullgraph=True)``.
``reference.PositionMap`` (NumPy) stays the reference; a Hypothesis test checks that both
give the same maps and coefficients.

    m = TorchPositionMap(positions, seqlen)        # a map a user passes: validated, once
    m = TorchPositionMap.trusted(kept, seqlen)     # a map a model makes (sorted top-k): no check
    m.coefficients("prev", torch.float32)          # GapCoefficients of tensors (cached)
    m.flip(); m.compose(kept); m.path(order)       # new maps, checked as reference.PositionMap's
    m.compose(kept, trusted=True)                  # a model's own sorted selection: on the device, no check

A map a user passes, and the ``kept`` or ``order`` a user composes it with, are validated by
the reference's rules and messages (the one validator): that reads them on the host, once,
at the public entry — the one synchronisation. The maps a model derives (``trusted`` maps,
``flip``, ``compose`` with its own sorted indices and ``path`` along its fixed snake paths,
both with ``trusted=True``) are correct by construction and are not checked.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from alignscan.reference.arguments import check_seqlen
from alignscan.reference.positions import ALIGNMENTS, GapCoefficients, MapShape, PositionMap, fits

__all__ = ["TorchPositionMap", "as_position_map", "map_tables"]


@torch.library.custom_op("alignscan::validate_positions", mutates_args=())
def _validate_op(positions: Tensor, seqlen: Optional[int], batch: Optional[int] = None,
                 length: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(positions (batch, M) int64, seqlen_rows (batch,) int64) of a user's map, checked by the
    reference's rules and messages (``reference.PositionMap``): the one host read of a map."""
    checked = PositionMap(positions.detach().cpu().numpy(), seqlen, batch=batch, length=length)
    return (torch.tensor(checked.positions, device=positions.device),
            torch.tensor(checked.seqlen_rows, device=positions.device))


@_validate_op.register_fake
def _validate_fake(positions, seqlen, batch=None, length=None):
    rows = batch if batch is not None else positions.shape[0] if positions.dim() == 2 else 1
    return (positions.new_empty((rows, positions.shape[-1]), dtype=torch.int64),
            positions.new_empty((rows,), dtype=torch.int64))


def _host_map(positions, seqlen_rows):
    return PositionMap.from_rows(positions.detach().cpu().numpy(), seqlen_rows.detach().cpu().numpy())


@torch.library.custom_op("alignscan::compose_positions", mutates_args=())
def _compose_op(positions: Tensor, seqlen_rows: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """(positions, seqlen_rows) of a map composed with a user's ``kept``, by the reference's
    ``PositionMap.compose`` (its rules and messages): one host read."""
    composed = _host_map(positions, seqlen_rows).compose(kept.detach().cpu().numpy())
    return (torch.tensor(composed.positions, device=positions.device),
            torch.tensor(composed.seqlen_rows, device=positions.device))


@_compose_op.register_fake
def _compose_fake(positions, seqlen_rows, kept):
    rows = max(positions.shape[0], kept.shape[0]) if kept.dim() == 2 else positions.shape[0]
    return (positions.new_empty((rows, kept.shape[-1]), dtype=torch.int64),
            positions.new_empty((rows,), dtype=torch.int64))


@torch.library.custom_op("alignscan::check_path_order", mutates_args=())
def _check_order_op(positions: Tensor, seqlen_rows: Tensor, order: Tensor) -> Tensor:
    """A user's path ``order`` as int64, checked by the reference's ``PositionMap.path`` (a
    permutation of range(seqlen), its rules and messages): one host read."""
    _host_map(positions, seqlen_rows).path(order.detach().cpu().numpy())
    return order.to(torch.int64).clone()


@_check_order_op.register_fake
def _check_order_fake(positions, seqlen_rows, order):
    return order.new_empty(order.shape, dtype=torch.int64)


def _as_index_tensor(x, device):
    """A user's index argument as a tensor on the map's device, dtype kept (the reference
    judges it: floats and bools are refused by name there)."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x.to(device)


def map_tables(positions, seqlen_rows):
    """The coefficients of every alignment for a (batch, M) int64 map on its device:
    ``(table, trailing)``, table (len(ALIGNMENTS), 3, batch, M) float64 with rows coef_self,
    coef_prev, hold, and trailing (len(ALIGNMENTS), batch) float64 (SPEC §1):

        "prev", "hold": (coef_self, coef_prev) = (1, g_i - 1);  "self": (g_i, 0);  "none": (1, 0)
        hold = g_i - 1 under "hold", else 0; trailing = seqlen - 1 - positions_{M-1}, 0 under "none"
    """
    batch, length = positions.shape
    g = torch.ones((batch, length), dtype=torch.float64, device=positions.device)
    if length > 1:
        g = torch.cat([g[:, :1], (positions[:, 1:] - positions[:, :-1]).to(torch.float64)], dim=1)
    ones, zeros = torch.ones_like(g), torch.zeros_like(g)
    if length:
        trailing = (seqlen_rows - 1 - positions[:, -1]).to(torch.float64)
    else:
        trailing = torch.zeros(batch, dtype=torch.float64, device=positions.device)
    rows = {"prev": (ones, g - 1, zeros, trailing), "self": (g, zeros, zeros, trailing),
            "none": (ones, zeros, zeros, torch.zeros_like(trailing)), "hold": (ones, g - 1, g - 1, trailing)}
    table = torch.stack([torch.stack(rows[a][:3]) for a in ALIGNMENTS])
    return table, torch.stack([rows[a][3] for a in ALIGNMENTS])


class TorchPositionMap(MapShape):
    """A position map held as tensors on the scan's device (see the module doc).

    Args:
        positions: an integer tensor (batch, M) or (M,), or anything ``torch.as_tensor``
            takes; ``device`` puts it there. Validated by the reference's rules.
        seqlen: the unpruned path length (int), or None: each row ends at its last token.
        batch, length: the (batch, M) of the scans it is for, when known (a (M,) map then
            covers every row).
    """

    is_position_map = True

    def __init__(self, positions, seqlen=None, device=None, batch=None, length=None):
        if seqlen is not None:
            seqlen = check_seqlen(seqlen)
        if not isinstance(positions, Tensor):
            positions = torch.tensor(np.asarray(positions))          # a copy: the map owns its positions
        if device is not None:
            positions = positions.to(device)
        # The one host read of a user's map (an opaque op under torch.compile).
        checked, rows = _validate_op(positions, seqlen, batch, length)
        self._set(checked, rows, seqlen=seqlen)

    @classmethod
    def trusted(cls, positions, seqlen):
        """A map a model makes itself: ``positions`` (batch, M) int64 strictly increasing rows
        in [0, seqlen) by construction (sorted top-k indices), ``seqlen`` an int or a (batch,)
        tensor. Not checked: nothing is read on the host."""
        positions = positions.to(torch.int64)
        static = None
        if isinstance(seqlen, Tensor):
            seqlen_rows = seqlen.to(device=positions.device, dtype=torch.int64)
        else:
            static = check_seqlen(seqlen)
            seqlen_rows = torch.full((positions.shape[0],), static, dtype=torch.int64, device=positions.device)
        obj = cls.__new__(cls)
        obj._set(positions, seqlen_rows, seqlen=static)
        return obj

    def _derived(self, positions, index=None):
        """A map this one makes (flip, compose, path): same path lengths, not checked."""
        obj = TorchPositionMap.__new__(TorchPositionMap)
        obj._set(positions, self.seqlen_rows, index, self.seqlen)
        return obj

    def _set(self, positions, seqlen_rows, index=None, seqlen=None):
        self.positions, self.seqlen_rows = positions, seqlen_rows
        self.seqlen = seqlen          # the path length as an int when every row has the same one (else None)
        self.index = index if index is not None else \
            torch.arange(positions.shape[1], device=positions.device).expand(positions.shape)
        self._table, self._trailing = map_tables(positions, seqlen_rows)
        self._cache = {}

    @classmethod
    def from_numpy(cls, position_map, device):
        """A ``reference.PositionMap`` (validated already) copied to ``device``."""
        rows = position_map.seqlen_rows
        uniform = rows.size and (rows == rows[0]).all()
        return cls.trusted(torch.tensor(position_map.positions, device=device),
                           int(rows[0]) if uniform else torch.tensor(rows, device=device))

    @property
    def device(self):
        return self.positions.device

    def __repr__(self):
        return f"TorchPositionMap(batch={self.batch}, M={self.length}, device={self.device})"

    def fit(self, batch, length, name="positions"):
        """This map for a scan of (batch, M) tokens: a one-row map broadcasts over the batch."""
        if not fits(self, batch, length, name):
            return self
        obj = TorchPositionMap.__new__(TorchPositionMap)
        obj._set(self.positions.expand(batch, length).contiguous(), self.seqlen_rows.expand(batch).contiguous(),
                 seqlen=self.seqlen)
        return obj

    def coefficients(self, alignment, dtype=torch.float64):
        """``GapCoefficients`` of tensors in ``dtype`` on the map's device (cached)."""
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        key = (alignment, dtype)
        if key not in self._cache:
            k = ALIGNMENTS.index(alignment)
            table = self._table[k].to(dtype)
            self._cache[key] = GapCoefficients(table[0], table[1], table[2], self._trailing[k].to(dtype))
        return self._cache[key]

    def flip(self):
        """The map of the flipped sequence (ViM's backward branch, SPEC §3):
        seqlen - 1 - flip(positions)."""
        return self._derived(self.seqlen_rows[:, None] - 1 - self.positions.flip(1))

    def compose(self, kept, *, trusted=False):
        """The map after a further pruning step keeping ``kept`` (batch, K), (1, K) or (K,) of
        the current tokens, ascending (SPEC §3: ``positions[kept]``).

        ``kept`` is checked by ``reference.PositionMap.compose``'s rules (integer, in range,
        strictly increasing, one row or one per row), reading it on the host once.
        ``trusted=True``: a model's own selection (sorted top-k indices, (batch, K) on the
        map's device), correct by construction: not checked, nothing read on the host."""
        if not trusted:
            positions, rows = _compose_op(self.positions, self.seqlen_rows, _as_index_tensor(kept, self.device))
            obj = TorchPositionMap.__new__(TorchPositionMap)
            obj._set(positions, rows, seqlen=self.seqlen)
            return obj
        kept = torch.as_tensor(kept, device=self.device).to(torch.int64)
        if kept.dim() == 1:
            kept = kept.expand(self.batch, kept.shape[0])
        return self._derived(torch.gather(self.positions, 1, kept))

    def path(self, order, *, trusted=False):
        """``(index, map)``: this map's positions read as raster indices, ordered along the
        path ``order`` (a permutation of range(seqlen), SPEC §3): ``index`` the compact order
        along the path, ``map`` the tokens' ranks on it.

        ``order`` is checked by ``reference.PositionMap.path``'s rules (an integer
        permutation of range(seqlen)), reading it on the host once. ``trusted=True``: a
        model's fixed scan path (``reference.snake_paths``, made with the model): not
        checked, nothing read on the host."""
        if trusted:
            order = torch.as_tensor(order, device=self.device).to(torch.int64)
        else:
            order = _check_order_op(self.positions, self.seqlen_rows, _as_index_tensor(order, self.device))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=self.device)
        ranks = rank[self.positions]
        index = torch.sort(ranks, dim=1, stable=True).indices
        return index, self._derived(torch.gather(ranks, 1, index), index)


def as_position_map(positions, seqlen, like):
    """``(positions, seqlen)`` as a torch scan hands them to the validator: a
    ``TorchPositionMap`` made (and validated) from raw positions and seqlen on ``like``'s
    device, or from a ``reference.PositionMap``; a map given or None (no pruning, no seqlen)
    passes through, with seqlen left for the validator to judge."""
    if isinstance(positions, TorchPositionMap) or (positions is None and seqlen is None):
        return positions, seqlen
    if isinstance(positions, PositionMap):
        return (TorchPositionMap.from_numpy(positions, like.device) if seqlen is None else positions), seqlen
    if positions is None:
        positions = torch.arange(like.shape[-1], device=like.device)
    elif isinstance(positions, Tensor) and positions.device != like.device:
        raise ValueError(f"positions is on {positions.device} but u is on {like.device}: every tensor must be on "
                         f"one device")
    batch, length = (like.shape[0], like.shape[2]) if like.dim() == 3 else (None, None)
    return TorchPositionMap(positions, seqlen, device=like.device, batch=batch, length=length), None
