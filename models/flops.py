"""FLOPs (multiply-accumulates) as the paper counts them, with real per-layer token counts.

ViM: the LocalMamba ``VisionMamba.flops()`` recipe (SPEC §5), L = tokens entering a layer
(that recipe counts 196 for a dense model, without the class token; pruned models count
197 -> 157 -> ... as the released code's rule gives):
    patch embed 196·3·16·16·D; per layer in_proj L·D·2E, conv1d (L+3)·E·4, x_proj L·E·(R+2N),
    dt_proj L·R·E (each once, not per direction), scan 2·(5·E·L·N + 2·E·L), out_proj L·E·D,
    norm L·D; head D·1000.
PlainMamba: what mmcv's counter sees over the backbone (convolutions with their bias, linear
layers without, BatchNorm/LayerNorm 2 per element, ReLU 1 per element) plus the authors'
analytic SSM term 9·E·N·L·4 + E·L·4 per layer. The 7x7 conv runs on the full grid (pruned
cells are zeros), so it does not shrink with pruning; the snake-path scans do.
"""
from __future__ import annotations

import math

import torch

from alignscan import reference as R
from alignscan.registry import CARDS

from .plainmamba import PLAINMAMBA_CONFIGS
from .pruning import PruningConfig
from .vim import VIM_CONFIGS

__all__ = ["flops", "counted", "token_counts", "PAPER_GFLOPS"]

# Paper Table 1 (and Table 4): dense and pruned GFLOPs.
PAPER_GFLOPS = {name: c.paper_gflops for name, c in CARDS.items()}


def token_counts(depth, tokens, pruning, protected=0):
    """Tokens entering each of the ``depth`` layers under a pruning config."""
    counts, n = [], tokens
    for i in range(depth):
        counts.append(n)
        stage = pruning.stage_after(i) if pruning is not None and pruning.mode != "mask" else None
        if stage is not None:
            kept = R.keep_count(n, pruning.ratio(stage), n_protected=protected, rule=pruning.count_rule)
            n = kept + (pruning.pruned_tokens == "fuse" and kept < n)     # EViT's fused token
    return counts


def _effective(pruning, depth, tokens, protected=0):
    """The pruning config, or None when no stage removes a token (keep 1.0, or no stage): the
    recipe is then the dense one exactly (the pruned ViM recipe counts the class token, the
    dense one does not, so "pruned" would otherwise cost more than dense)."""
    if pruning is None or not pruning.active or pruning.mode == "mask":
        return None
    pruning.check_depth(depth)
    n = tokens
    for stage in range(len(pruning.schedule)):
        n = R.keep_count(n, pruning.ratio(stage), n_protected=protected, rule=pruning.count_rule)
    return pruning if n < tokens else None


def _vim_flops(dim, depth, pruning, num_classes=1000, patches=196, patch=16, N=16):
    E, Rk = 2 * dim, math.ceil(dim / 16)
    total = patches * 3 * patch * patch * dim + dim * num_classes
    pruning = _effective(pruning, depth, patches + 1, protected=1)
    counts = token_counts(depth, patches + 1, pruning, protected=1) if pruning is not None else [patches] * depth
    for L in counts:
        total += (L * dim * 2 * E + (L + 3) * E * 4 + L * E * (Rk + 2 * N) + L * Rk * E
                  + 2 * (5 * E * L * N + 2 * E * L) + L * E * dim + L * dim)
    return total


def _plainmamba_flops(dim, depth, stem_convs, dw_after_first, pruning, mid=64, N=16, img=224):
    E, Rk = 2 * dim, math.ceil(dim / 16)
    s = img // 2                                    # stem output side
    grid = img // 16
    pruning = _effective(pruning, depth, grid * grid)
    total = s * s * mid * (3 * 49) + s * s * mid * 3          # stem conv; BN (2) + ReLU (1) per element
    total += stem_convs * (s * s * mid * (mid * 9) + s * s * mid * 3)
    total += grid * grid * dim * (mid * 64 + 1)               # 8x8 projection with bias
    for i, L in enumerate(token_counts(depth, grid * grid, pruning)):
        total += 2 * L * dim                                   # LayerNorm
        total += L * dim * 2 * E                               # in_proj
        total += grid * grid * E * (49 + 1)                    # 7x7 depthwise conv on the full grid
        total += L * E * (Rk + 2 * N) + L * Rk * E + L * E * dim   # x_proj, dt_proj, out_proj
        total += 9 * E * N * L * 4 + E * L * 4                 # the authors' SSM term (4 paths)
        if i == 0 and dw_after_first:
            total += grid * grid * dim * 9 + 2 * grid * grid * dim
    total += 2 * (grid * grid if not pruning or not pruning.active else L) * dim   # ln1
    return total


def flops(name_or_model, pruning=None):
    """GFLOPs (MACs, as the paper counts them) of a model name or model, with its (or the
    given) pruning config."""
    if pruning is not None and not isinstance(pruning, PruningConfig):
        raise TypeError(f"pruning must be a PruningConfig or None, got {type(pruning).__name__}")
    effective = pruning if pruning is not None else getattr(name_or_model, "pruning", None)
    if effective is not None and effective.active and effective.pruned_tokens == "merge":
        raise ValueError("pruned_tokens='merge' gives every image its own token count, so no recipe can count it: "
                         "count one image's forward with models.flops.counted(model, image)")
    if not isinstance(name_or_model, str):
        return _model_flops(name_or_model, pruning)
    name = name_or_model
    if pruning is not None and not pruning.active:
        pruning = None
    if name in VIM_CONFIGS:
        c = VIM_CONFIGS[name]
        return _vim_flops(c["embed_dim"], c["depth"], pruning) / 1e9
    if name in PLAINMAMBA_CONFIGS:
        c = PLAINMAMBA_CONFIGS[name]
        return _plainmamba_flops(c["embed_dim"], c["depth"], c["stem_convs"], c["dw_after_first"], pruning) / 1e9
    raise ValueError(f"unknown model {name!r}; known: {sorted(VIM_CONFIGS) + sorted(PLAINMAMBA_CONFIGS)}")


def _model_flops(model, pruning):
    """The same recipes, read off a built model (its width, depth, head and pruning)."""
    from .plainmamba import PlainMamba
    from .vim import VisionMamba
    pruning = pruning if pruning is not None else getattr(model, "pruning", None)
    if pruning is not None and not pruning.active:
        pruning = None
    if isinstance(model, VisionMamba):
        patch = model.patch_embed.proj.kernel_size[0]
        return _vim_flops(model.embed_dim, len(model.layers), pruning, model.head.out_features,
                          model.num_patches, patch) / 1e9
    if isinstance(model, PlainMamba):
        bb = model.backbone
        stem_convs = sum(isinstance(m, torch.nn.Conv2d) for m in bb.patch_embed.convs)
        return _plainmamba_flops(model.embed_dim, len(bb.layers), stem_convs, hasattr(bb.layers[0], "dw"), pruning,
                                 img=bb.grid[0] * 16) / 1e9
    raise TypeError(f"name_or_model must be a model name or a VisionMamba/PlainMamba, got {type(model).__name__}")


LINEAR_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution")
SCAN_OP = "alignscan.selective_scan_fwd"


def counted(model, images):
    """What torch's ``FlopCounterMode`` counts over one no-grad forward of ``model`` on
    ``images``: (multiply-accumulates of the matmuls and convolutions, the scan op's count by
    its registered formula ``bridges.scan_op.scan_flops``, every operator's raw count). The
    counter counts a multiply-accumulate as 2 FLOPs; the first number is halved back to MACs,
    the unit of ``flops``; the scan's formula is mamba_ssm's count and is left as it is."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    counts = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return sum(v for k, v in counts.items() if k in LINEAR_OPS) // 2, counts.get(SCAN_OP, 0), counts
