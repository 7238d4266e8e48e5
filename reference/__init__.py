"""alignscan.reference — the truth: the position-map selective scan in float64 NumPy/SciPy.

Glossary (code name — paper / SPEC symbol — shape):

    u            x, the remaining tokens in scan order            (batch, dim, M)
    delta        raw timescale before bias/softplus               (batch, dim, M)
    Delta        Δ = softplus(delta + delta_bias)                 (batch, dim, M)
    positions    the position map: original index k_i of token i  (batch, M); a validated
                 ``PositionMap`` holds it with seqlen, gaps and coefficients
    gap          g_i = k_i - k_{i-1}, g_0 = 1; q_i = g_i - 1 pruned (batch, M)
    E            effective timescale, Eq. 5/6 fused               (batch, dim, M)
    A            continuous state matrix (diagonal per channel)   (dim, N)
    deltaA       Ā = exp(E·A)                                      (batch, dim, M, N)
    deltaB_u     B̄·x = Δ·B·u                                       (batch, dim, M, N)
    h            hidden state                                      (batch, dim, M, N)
    B, C         input / output projections                        (batch, [G,] N, M)
    D, z         skip and gate                                     (dim,), (batch, dim, M)
    seqlen       L, length of the unpruned scan path
    alignment    "prev" (the paper), "hold" (zero-order hold, SPEC §1), "self" (ablation), "none" (relabel, EViT)

SPEC.md §1 is the contract; every kernel in ``cuda_kernels`` is judged against this package.
"""
from .arguments import ALIGNMENTS, ScanArgs, compute_dtype, compute_dtype_name, validate_scan_args
from .attention import hidden_attention
from .importance import METRICS, keep_count, select_tokens, token_importance
from .oracles import delta_rewrite, expand_to_dense
from .positions import (
                        GapCoefficients,
                        PositionMap,
                        compose,
                        flip_positions,
                        gaps,
                        mask_to_positions,
                        path_positions,
                        positions_to_mask,
                        snake_paths,
                        validate_positions,
)
from .pruned_tokens import PRUNED_TOKENS, fuse_pruned, merge_runs, recentre_order
from .scan import SOFTPLUS_THRESHOLD, hidden_states, selective_scan, selective_scan_backward
from .tolerances import TOLERANCES, assert_within_tolerance, max_deviation, tolerance, within_tolerance

__all__ = [
    "ALIGNMENTS", "METRICS", "TOLERANCES", "SOFTPLUS_THRESHOLD", "ScanArgs", "PositionMap", "GapCoefficients",
    "compute_dtype", "compute_dtype_name",
    "selective_scan", "selective_scan_backward", "hidden_states", "hidden_attention",
    "validate_scan_args", "validate_positions", "mask_to_positions", "positions_to_mask",
    "gaps", "flip_positions", "compose", "snake_paths", "path_positions",
    "token_importance", "select_tokens", "keep_count",
    "PRUNED_TOKENS", "fuse_pruned", "merge_runs", "recentre_order",
    "expand_to_dense", "delta_rewrite",
    "tolerance", "max_deviation", "within_tolerance", "assert_within_tolerance",
]
