"""Scan problems with realistic magnitudes, shared by the benchmarks and the tests.

``make_problem`` draws the arrays of one selective scan (A < 0 as in Mamba, Δ in about
(0.05, 3)); ``vim_layer_problem`` is the ViM-S layer shape the kernel targets are set at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ScanProblem", "make_problem", "random_positions", "vim_layer_problem"]


@dataclass
class ScanProblem:
    """One drawn scan: arrays in ``dtype`` plus flags; ``kwargs()`` is the call."""

    u: np.ndarray
    delta: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray | None
    z: np.ndarray | None
    delta_bias: np.ndarray | None
    delta_softplus: bool
    return_last_state: bool
    positions: np.ndarray | None
    seqlen: int | None
    alignment: str
    style: str = ""
    extra: dict = field(default_factory=dict)

    def kwargs(self, **overrides):
        kw = dict(u=self.u, delta=self.delta, A=self.A, B=self.B, C=self.C, D=self.D, z=self.z,
                  delta_bias=self.delta_bias, delta_softplus=self.delta_softplus,
                  return_last_state=self.return_last_state, positions=self.positions,
                  seqlen=self.seqlen, alignment=self.alignment)
        kw.update(overrides)
        return kw

    def dout(self, seed=1):
        return np.random.default_rng(seed).standard_normal(self.u.shape).astype(self.u.dtype)

    def __repr__(self):
        opt = [n for n in ("D", "z", "delta_bias") if getattr(self, n) is not None]
        return (f"ScanProblem(u{self.u.shape} {self.u.dtype}, B{self.B.shape}, N={self.A.shape[1]}, "
                f"style={self.style}, positions={_short(self.positions)}, "
                f"seqlen={self.seqlen}, alignment={self.alignment}, softplus={self.delta_softplus}, "
                f"last_state={self.return_last_state}, with={opt})")


def _short(positions):
    if positions is None:
        return None
    return positions.tolist() if positions.size <= 24 else f"<{positions.shape} int>"


def make_problem(rng, *, batch, dim, dstate, length, groups=None, dtype=np.float64, positions=None,
                 seqlen=None, alignment="prev", D=True, z=True, delta_bias=True, delta_softplus=True,
                 return_last_state=True, style=""):
    """Arrays for a scan with realistic magnitudes (A < 0, Δ in about (0.05, 3))."""
    dtype = np.dtype(dtype)
    param = np.float64 if dtype == np.float64 else np.float32
    def randn(*shape, scale=1.0, dt=dtype):
        return (scale * rng.standard_normal(shape)).astype(dt)
    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    if delta_softplus:
        delta = randn(batch, dim, length, scale=1.0)
    else:
        delta = rng.uniform(0.05, 1.0, (batch, dim, length)).astype(dtype)
    return ScanProblem(
        u=randn(batch, dim, length), delta=delta,
        A=(-np.exp(rng.uniform(-1.0, 1.0, (dim, dstate)))).astype(param),
        B=randn(*bc_shape), C=randn(*bc_shape),
        D=randn(dim, dt=param) if D else None,
        z=randn(batch, dim, length) if z else None,
        delta_bias=(randn(dim, scale=0.5, dt=param) if delta_softplus
                    else rng.uniform(0.0, 0.3, dim).astype(param)) if delta_bias else None,
        delta_softplus=delta_softplus, return_last_state=return_last_state,
        positions=positions, seqlen=seqlen, alignment=alignment, style=style)


def random_positions(rng, batch, seqlen, keep_ratio):
    """(batch, M) positions keeping ceil(keep_ratio·seqlen) random tokens per row."""
    m = max(1, math.ceil(keep_ratio * seqlen - 1e-9))
    return np.stack([np.sort(rng.choice(seqlen, m, replace=False)) for _ in range(batch)]).astype(np.int64)


def vim_layer_problem(batch=8, dim=768, dstate=16, seqlen=197, keep_ratio=1.0, alignment="prev",
                      dtype=np.float32, seed=0):
    """One ViM-S scan (d_inner 768, N 16, 197 tokens) with z, D, delta_bias and softplus,
    as the model calls it, pruned to keep_ratio of the tokens at random."""
    rng = np.random.default_rng(seed)
    positions = random_positions(rng, batch, seqlen, keep_ratio)
    return make_problem(rng, batch=batch, dim=dim, dstate=dstate, length=positions.shape[1], dtype=dtype,
                        positions=positions, seqlen=seqlen, alignment=alignment, return_last_state=False,
                        style=f"keep {keep_ratio}")
