"""Token importance and selection (paper Sec. 4.2, SPEC §4).

y is the mixer's gated SSM output before out_proj, both directions merged in token order,
shape (batch, dim, L). Scores are (batch, L); selection returns kept indices, ascending.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["METRICS", "COUNT_RULES", "token_importance", "keep_count", "select_tokens"]

METRICS = ("clip", "raw", "l1", "l2", "official")
COUNT_RULES = ("ceil", "vim")

# Guards ceil() against float error: ceil(0.8 * 125) must be 100, not 101.
_CEIL_SLACK = 1e-9


def token_importance(y, metric="clip"):
    """s_j over channels: "clip" Σ max(y, 0) (Eq. 9), "raw" Σ y, "l1" Σ |y|, "l2" sqrt(Σ y²);
    "official" Σ y of what the released ToP-ViM code scores (SPEC §4): there y is ViM's
    backward branch's gated output alone, in flipped order and not flipped back, so token j
    is scored by the output at index j of the flipped sequence.

    Args:
        y: (batch, dim, L) floats (for "official": the backward branch's output, flipped).
    Returns:
        (batch, L) float64 scores.
    """
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        raise TypeError(f"y must be a float array, got dtype {y.dtype}")
    if y.ndim != 3:
        raise ValueError(f"y must have shape (batch, dim, L), got ndim {y.ndim}")
    y = y.astype(np.float64, copy=False)
    if metric == "clip":
        return np.maximum(y, 0.0).sum(axis=1)
    if metric in ("raw", "official"):
        return y.sum(axis=1)
    if metric == "l1":
        return np.abs(y).sum(axis=1)
    if metric == "l2":
        return np.sqrt((y * y).sum(axis=1))
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_keep_ratio(keep_ratio):
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float, np.floating, np.integer)):
        raise TypeError(f"keep_ratio must be a number in (0, 1], got {type(keep_ratio).__name__}")
    if not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


def keep_count(n_tokens, keep_ratio, n_protected=0, rule="ceil"):
    """How many tokens a pruning step keeps, protected ones included.

    "ceil" (SPEC §4): n_protected + ceil(r · (n_tokens - n_protected)).
    "vim": the released ViM code, k = ceil((n_tokens - 1) · r) made odd (k + 1 if even),
    class token included; 197 -> 157 -> 125 -> 101 at r = 0.8.
    """
    r = _check_keep_ratio(keep_ratio)
    if rule == "ceil":
        unprotected = n_tokens - n_protected
        return n_protected + math.ceil(r * unprotected - _CEIL_SLACK)
    if rule == "vim":
        k = math.ceil((n_tokens - 1) * r - _CEIL_SLACK)
        k = k + 1 if k % 2 == 0 else k
        return min(max(k, n_protected), n_tokens)
    raise ValueError(f"rule must be one of {COUNT_RULES}, got {rule!r}")


def select_tokens(scores, keep_ratio, protected=None, rule="ceil"):
    """Keep the highest-scoring tokens; protected ones always stay (SPEC §4).

    Args:
        scores: (batch, L) importance scores.
        keep_ratio: r in (0, 1].
        protected: None, (P,) token indices protected in every row, or (batch, P).
        rule: "ceil" keeps #protected + ceil(r · #unprotected); "vim" the released ViM count.

    Returns:
        (batch, K) int64 kept indices, ascending in each row. Ties go to the lower index.
    """
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise TypeError(f"scores must be a numeric array, got dtype {scores.dtype}")
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (batch, L), got ndim {scores.ndim}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    batch, n = scores.shape
    if protected is None:
        protected = np.zeros((batch, 0), dtype=np.int64)
    else:
        protected = np.asarray(protected)
        if not np.issubdtype(protected.dtype, np.integer):
            raise TypeError(f"protected must hold integer token indices, got dtype {protected.dtype}")
        if protected.ndim == 1:
            protected = np.broadcast_to(protected, (batch, protected.shape[0]))
        if protected.ndim != 2 or protected.shape[0] != batch:
            raise ValueError(f"protected must have shape (P,) or (batch={batch}, P), got {protected.shape}")
        if protected.size and (protected.min() < 0 or protected.max() >= n):
            raise ValueError(f"protected must index the {n} tokens")
        if any(len(set(row.tolist())) != len(row) for row in protected):
            raise ValueError("protected must not repeat an index within a row")
    k = keep_count(n, keep_ratio, protected.shape[1], rule)
    # Protected tokens first (score +inf); then descending score, ties to the lower index.
    ranked = scores.astype(np.float64, copy=True)
    np.put_along_axis(ranked, protected.astype(np.int64), np.inf, axis=1)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1).astype(np.int64)
