"""``selective_scan_ref``: the position-map scan (SPEC §1) as plain torch operations.

Differentiable by autograd, on any device. It is the backend "torch" of
``bridges.selective_scan_fn`` and the twin its tests compare against. Like mamba_ssm's
``selective_scan_ref`` it computes in float32 (float64 for float64 inputs) and returns out
in the input dtype and last_state in the compute dtype (float32 for float16/bfloat16).
Arguments are checked by the reference's one validator; the gaps come from the position
map (``TorchPositionMap.coefficients``), never recomputed here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alignscan.reference.arguments import validate_scan_args
from alignscan.reference.scan import SOFTPLUS_THRESHOLD

from .dlpack import compute_dtype
from .positions import as_position_map

__all__ = ["selective_scan_ref", "effective_delta", "discretized_delta", "require_tensor", "scan_twin", "hold_sum"]


def _langevin(y):
    """coth(y) - 1/y without cancellation near 0 (reference.hold.langevin)."""
    small = y.abs() < 0.1
    ys = torch.where(small, y, torch.zeros_like(y))
    y2 = ys * ys
    series = ys * (1 / 3 + y2 * (-1 / 45 + y2 * (2 / 945 + y2 * (-1 / 4725 + y2 * (2 / 93555)))))
    yl = torch.where(small, torch.ones_like(y), y)
    return torch.where(small, series, 1 / torch.tanh(yl) - 1 / yl)


def _hold_slope(q, x):
    """T_q(x) = dS_q/dx (reference.hold): the series near 0, the quotient's derivative away
    from it, q(q-1)/2 at 0."""
    nonzero = x != 0
    xs = torch.where(nonzero, x, torch.ones_like(x))
    S = torch.where(nonzero, torch.expm1(q * xs) / torch.expm1(xs), q)
    series = S * ((q - 1) / 2 + (q * _langevin(q * xs / 2) - _langevin(xs / 2)) / 2)
    near = (q * xs).abs() < 1
    em1 = torch.expm1(xs)
    difference = (q * torch.exp(q * xs) * em1 - torch.exp(xs) * torch.expm1(q * xs)) / (em1 * em1)
    return torch.where(nonzero, torch.where(near, series, difference), q * (q - 1) / 2)


class _HoldSum(torch.autograd.Function):
    """S_q(x) = expm1(q·x)/expm1(x) (q at x = 0) with the derivative T_q(x) of reference.hold,
    which autograd through the quotient would get wrong (0/0 at x = 0, cancellation near it).

    Written for torch.func as well as autograd (``setup_context``, a ``jvp``, a generated
    vmap rule): the twin, and so backend "torch", runs under grad, jacrev, jvp, jacfwd and
    vmap for every alignment. q (a count of held steps, from the map) carries no gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, x):
        safe = torch.where(x != 0, x, torch.ones_like(x))
        return torch.where(x != 0, torch.expm1(q * safe) / torch.expm1(safe), q)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, x = inputs
        ctx.save_for_backward(q, x)
        ctx.save_for_forward(q, x)

    @staticmethod
    def backward(ctx, grad):
        q, x = ctx.saved_tensors
        return None, grad * _hold_slope(q, x)

    @staticmethod
    def jvp(ctx, q_tangent, x_tangent):
        q, x = ctx.saved_tensors
        return None if x_tangent is None else _hold_slope(q, x) * x_tangent


def hold_sum(q, x):
    """S_q(x) = Σ_{k<q} exp(k·x), differentiable in x (SPEC §1, "hold")."""
    return _HoldSum.apply(q, x)


def require_tensor(u):
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")


def discretized_delta(delta, delta_bias, delta_softplus):
    """Δ = softplus(delta + delta_bias) (threshold as the reference) or delta + delta_bias."""
    x = delta if delta_bias is None else delta + delta_bias.to(delta.dtype)[None, :, None]
    return F.softplus(x, threshold=SOFTPLUS_THRESHOLD) if delta_softplus else x


def effective_delta(Delta, coefficients):
    """E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} (SPEC §1); E = Δ without a map."""
    if coefficients is None or Delta.shape[-1] == 0:
        return Delta
    shifted = torch.cat([torch.zeros_like(Delta[..., :1]), Delta[..., :-1]], dim=-1)
    return coefficients.coef_self[:, None, :] * Delta + coefficients.coef_prev[:, None, :] * shifted


def scan_twin(args):
    """The scan on validated torch ``ScanArgs``: out (b, d, M) [, last_state (b, d, N)]."""
    dtype_in = args.u.dtype
    cdt = compute_dtype(dtype_in)
    u, delta, A, B, C = (x.to(cdt) for x in (args.u, args.delta, args.A, args.B, args.C))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    coefficients = args.coefficients(cdt)
    Delta = discretized_delta(delta, args.delta_bias, args.delta_softplus)        # (b, d, M)
    E = effective_delta(Delta, coefficients)
    B = B.repeat_interleave(dim // B.shape[1], dim=1)                              # (b, d, N, M)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)
    deltaA = torch.exp(E[..., None] * A[None, :, None, :])                         # (b, d, M, N)
    own = (Delta * u)[..., None] * B.transpose(2, 3)                               # Δ·B·u (b, d, M, N)
    deltaB_u = own
    hold = coefficients is not None and args.alignment == "hold"
    if hold and length > 1:   # w_i·Δ_{i-1}·B_{i-1}·u_{i-1}, w_i = exp(Δ_i·A)·S_q(Δ_{i-1}·A)
        x_prev = Delta[..., :-1, None] * A[None, :, None, :]
        q = coefficients.hold[:, None, 1:, None].expand_as(x_prev)
        w = torch.exp(Delta[..., 1:, None] * A[None, :, None, :]) * hold_sum(q, x_prev)
        deltaB_u = torch.cat([own[:, :, :1], own[:, :, 1:] + w * own[:, :, :-1]], dim=2)
    h = u.new_zeros(batch, dim, dstate)
    ys = []
    for i in range(length):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[:, :, :, i]))
    if ys:
        y = torch.stack(ys, dim=2)
    else:
        # An empty scan (every token pruned) still depends on its inputs, so that autograd
        # gives each an empty or zero gradient, as the kernels' backward does.
        y = (deltaA + deltaB_u).sum(-1) * C.sum(2)                                 # (b, d, 0)
    if args.D is not None:
        y = y + args.D.to(cdt)[None, :, None] * u
    out = y * F.silu(args.z.to(cdt)) if args.z is not None else y
    out = out.to(dtype_in)
    if not args.return_last_state:
        return out
    last = h
    if coefficients is not None and length:
        steps = coefficients.trailing[:, None, None]
        x_last = Delta[:, :, -1, None] * A[None]
        last = torch.exp(steps * x_last) * h
        if hold:
            last = last + hold_sum(steps.expand_as(x_last), x_last) * own[:, :, -1]
    return out, last.detach()


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
    """out (batch, dim, M) [, last_state (batch, dim, N)]: SPEC §1 in torch, autograd-friendly.

    Shapes as ``reference.selective_scan``; positions an integer tensor (batch, M) or (M,)
    with seqlen, a ``TorchPositionMap``, or None.
    """
    require_tensor(u)
    positions, seqlen = as_position_map(positions, seqlen, u)
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    return scan_twin(args)
