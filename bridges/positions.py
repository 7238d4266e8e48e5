"""``TorchPositionMap``: the torch twin of ``reference.PositionMap``, on the scan's device.

A map is made once per pruning stage: one custom op (``alignscan::position_map``) reads the
positions on the host, builds and checks a ``reference.PositionMap`` (the one set of rules
and messages), and returns everything a scan needs as tensors on the positions' device:
the positions, each row's path length, and the gap coefficients of every alignment. Every
scan of the stage then reads those tensors: no host round trip per call, and under
``torch.compile`` the op is one opaque node with a fake implementation.

    m = TorchPositionMap(positions, seqlen)        # validated here, once
    m.coefficients("prev", torch.float32)          # GapCoefficients of tensors (cached)
    m.flip(); m.compose(kept); m.path(order)       # new maps, made by the same op
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from alignscan.reference.arguments import check_seqlen
from alignscan.reference.positions import ALIGNMENTS, GapCoefficients, PositionMap

__all__ = ["TorchPositionMap", "as_position_map"]

_TRANSFORMS = ("none", "flip", "compose", "path")


@torch.library.custom_op("alignscan::position_map", mutates_args=())
def _position_map_op(positions: Tensor, seqlen: Optional[int], seqlen_rows: Optional[Tensor], transform: str,
                     extra: Optional[Tensor], batch: Optional[int] = None,
                     length: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(index, positions, seqlen_rows, coefficients (len(ALIGNMENTS), 3, b, M) float64,
    trailing (len(ALIGNMENTS), b) float64) of the map ``transform`` makes. ``batch`` and
    ``length``: the scan the map must fit, when known (checked by the reference)."""
    host = positions.detach().cpu().numpy()
    if seqlen_rows is None:
        source = PositionMap(host, seqlen, batch=batch, length=length)
    else:
        source = PositionMap.from_rows(host, seqlen_rows.detach().cpu().numpy())
    index = None
    if transform == "flip":
        result = source.flip()
    elif transform == "compose":
        result = source.compose(extra.detach().cpu().numpy())
    elif transform == "path":
        index, result = source.path(extra.detach().cpu().numpy())
    else:
        result = source
    if index is None:
        index = np.broadcast_to(np.arange(result.length), result.positions.shape)
    device = positions.device
    as_tensor = lambda a, dt: torch.tensor(np.asarray(a), dtype=dt, device=device)
    coefs = [result.coefficients(a) for a in ALIGNMENTS]
    table = np.stack([np.stack([c.coef_self, c.coef_prev, c.hold]) for c in coefs])
    trailing = np.stack([c.trailing for c in coefs])
    return (as_tensor(index, torch.int64), as_tensor(result.positions, torch.int64),
            as_tensor(result.seqlen_rows, torch.int64), as_tensor(table, torch.float64),
            as_tensor(trailing, torch.float64))


@_position_map_op.register_fake
def _position_map_fake(positions, seqlen, seqlen_rows, transform, extra, batch=None, length=None):
    batch = batch if batch is not None else positions.shape[0] if positions.dim() == 2 else 1
    length = positions.shape[-1]
    if transform == "compose":
        batch, length = (extra.shape[0] if extra.dim() == 2 else batch), extra.shape[-1]
    new = positions.new_empty
    return (new((batch, length), dtype=torch.int64), new((batch, length), dtype=torch.int64),
            new((batch,), dtype=torch.int64), new((len(ALIGNMENTS), 3, batch, length), dtype=torch.float64),
            new((len(ALIGNMENTS), batch), dtype=torch.float64))


class TorchPositionMap:
    """A validated position map held as tensors on the scan's device (see the module doc).

    Args:
        positions: an integer tensor (batch, M) or (M,), or anything ``torch.as_tensor``
            takes; ``device`` puts it there.
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
        self._set(*_position_map_op(positions, seqlen, None, "none", None, batch, length))

    @classmethod
    def _made(cls, outputs):
        obj = cls.__new__(cls)
        obj._set(*outputs)
        return obj

    def _set(self, index, positions, seqlen_rows, table, trailing):
        self.index, self.positions, self.seqlen_rows = index, positions, seqlen_rows
        self._table, self._trailing = table, trailing
        self._cache = {}

    @classmethod
    def from_numpy(cls, position_map, device):
        """A ``reference.PositionMap`` (validated already) copied to ``device``."""
        return cls._made(_position_map_op(torch.tensor(position_map.positions, device=device), None,
                                          torch.tensor(position_map.seqlen_rows, device=device), "none", None))

    @property
    def batch(self):
        return self.positions.shape[0]

    @property
    def length(self):
        return self.positions.shape[1]

    @property
    def device(self):
        return self.positions.device

    def __repr__(self):
        return f"TorchPositionMap(batch={self.batch}, M={self.length}, device={self.device})"

    def fit(self, batch, length, name="positions"):
        """This map for a scan of (batch, M) tokens: a one-row map broadcasts over the batch."""
        if self.length != length:
            raise ValueError(f"{name} must have M={length} entries per row (one per remaining token), "
                             f"got a map with M={self.length}")
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"{name} must have batch={batch} rows, got a map with {self.batch}")
        expand = lambda t, dim: t.expand(*t.shape[:dim], batch, *t.shape[dim + 1:]).contiguous()
        return TorchPositionMap._made((expand(self.index, 0), expand(self.positions, 0), expand(self.seqlen_rows, 0),
                                       expand(self._table, 2), expand(self._trailing, 1)))

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
        """The map of the flipped sequence (ViM's backward branch, SPEC §3)."""
        return TorchPositionMap._made(_position_map_op(self.positions, None, self.seqlen_rows, "flip", None))

    def compose(self, kept):
        """The map after a further pruning step keeping ``kept`` (batch, K), ascending."""
        return TorchPositionMap._made(_position_map_op(self.positions, None, self.seqlen_rows, "compose", kept))

    def path(self, order):
        """``(index, map)``: this map's positions (raster indices) along the path ``order``."""
        made = TorchPositionMap._made(_position_map_op(self.positions, None, self.seqlen_rows, "path",
                                                       torch.as_tensor(order, device=self.device)))
        return made.index, made


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
    batch, length = (like.shape[0], like.shape[2]) if like.dim() == 3 else (None, None)
    return TorchPositionMap(positions, seqlen, device=like.device, batch=batch, length=length), None
