"""Calling the torch op on a drawn problem and reading results back as NumPy."""
import torch

from tests.strategies import GRAD_NAMES


def tensors(p, requires_grad=True, dtype=None):
    """The problem's arrays as leaf tensors (None stays None)."""
    out = {}
    for name in GRAD_NAMES:
        x = getattr(p, name)
        if x is None:
            out[name] = None
            continue
        t = torch.tensor(x, dtype=dtype) if dtype is not None else torch.tensor(x)
        out[name] = t.requires_grad_(requires_grad)
    return out


def run(fn, p, ts, dout=None, **extra):
    """out, last_state and the gradients of sum(dout · out) for the tensors that want them."""
    kw = dict(delta_softplus=p.delta_softplus, return_last_state=True,
              positions=None if p.positions is None else torch.tensor(p.positions), seqlen=p.seqlen,
              alignment=p.alignment, **extra)
    out, last = fn(*(ts[n] for n in GRAD_NAMES), **kw)
    want = [n for n in GRAD_NAMES if ts[n] is not None and ts[n].requires_grad]
    dout = torch.tensor(p.dout() if dout is None else dout, dtype=out.dtype)
    grads = torch.autograd.grad(out, [ts[n] for n in want], dout, allow_unused=True) if want else []
    return out.detach().double().numpy(), last.double().numpy(), dict(zip(want, grads))
