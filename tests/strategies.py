"""Shared Hypothesis strategies: scan problems and position maps for every backend.

``scan_problems()`` draws the structure (shapes, grouped or plain B/C, which optional
arguments are present, softplus, alignment, the mask style) through Hypothesis and the
values from a seeded NumPy generator, so shrinking works on structure and examples stay
cheap. Mask styles cover random subsets, all kept, one kept, long leading and trailing
pruned runs, gaps of every size 1..M, and no map at all. ``GRAD_NAMES`` are a problem's
differentiable arguments, in the order every backward returns their gradients.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from alignscan.reference import ALIGNMENTS
from alignscan.testing import ScanProblem, make_problem  # noqa: F401 (re-exported for tests)

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
MASK_STYLES = ("random", "all", "one", "leading", "trailing", "every_gap", "none")


def row_positions(style, length, seqlen, rng):
    """Positions of one row with `length` kept tokens out of `seqlen` for a mask style."""
    if style in ("all", "none"):
        return np.arange(length)
    if style == "leading":
        return np.arange(seqlen - length, seqlen)
    if style == "trailing":
        return np.arange(length)
    if style == "every_gap":
        start = rng.integers(0, seqlen - length * (length - 1) // 2)
        return start + np.concatenate([[0], np.cumsum(np.arange(1, length))])
    return np.sort(rng.choice(seqlen, size=length, replace=False))  # "random", "one"


@st.composite
def position_maps(draw, max_length=12, max_run=20, batch=None, styles=MASK_STYLES):
    """(style, positions (batch, M) or None, seqlen) for one batch."""
    style = draw(st.sampled_from(styles))
    batch = batch if batch is not None else draw(st.integers(1, 3))
    length = 1 if style == "one" else draw(st.integers(1, max_length))
    if style in ("all", "none"):
        seqlen = length
    elif style in ("leading", "trailing"):
        seqlen = length + draw(st.integers(1, max_run))
    elif style == "every_gap":
        seqlen = length * (length - 1) // 2 + 1 + draw(st.integers(0, 3))
    else:
        seqlen = length + draw(st.integers(0, max_run))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if style == "none":
        return style, None, seqlen
    rows = [row_positions(style, length, seqlen, rng) for _ in range(batch)]
    positions = np.stack(rows).astype(np.int64)
    if draw(st.booleans()) and style in ("all", "leading", "trailing", "every_gap"):
        positions = positions[0]  # the shared (M,) form
    return style, positions, seqlen


@st.composite
def scan_problems(draw, dtype=np.float64, max_batch=2, max_dim=6, max_dstate=4, max_length=10,
                  max_run=16, alignments=ALIGNMENTS, explicit_seqlen=None):
    """A full scan problem: every optional argument, grouped or plain B/C, every mask style.

    dtype: one dtype, or a tuple of dtypes to draw from. explicit_seqlen: True always
    passes seqlen, None lets Hypothesis choose (None means each row ends at its last
    remaining token).
    """
    if isinstance(dtype, (tuple, list)):
        dtype = draw(st.sampled_from(dtype))
    batch = draw(st.integers(1, max_batch))
    groups = draw(st.sampled_from([None, 1, 2]))
    per_group = draw(st.integers(1, max(1, max_dim // (groups or 1))))
    dim = per_group * (groups or 1)
    dstate = draw(st.integers(1, max_dstate))
    style, positions, seqlen = draw(position_maps(max_length=max_length, max_run=max_run, batch=batch))
    length = positions.shape[-1] if positions is not None else seqlen
    pass_seqlen = True if explicit_seqlen else draw(st.booleans())
    flags = {name: draw(st.booleans()) for name in ("D", "z", "delta_bias", "delta_softplus", "return_last_state")}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_problem(rng, batch=batch, dim=dim, dstate=dstate, length=length, groups=groups, dtype=dtype,
                        positions=positions, seqlen=seqlen if pass_seqlen else None,
                        alignment=draw(st.sampled_from(alignments)), style=style, **flags)
