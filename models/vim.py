"""ViM (hustvl/Vim, "bimambav2 ... midclstok div2") with token pruning (SPEC §3-5).

The module tree matches the official state dict key for key (../shared/models/vim_*.json),
so the released checkpoints load with strict=True. Every scan goes through
``bridges.selective_scan_fn`` with the position map of the remaining tokens.

Shapes: b batch, L tokens (197 with the class token in the middle), D width, E = 2D inner
width, N = 16 state size, R = ceil(D / 16) dt rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignscan import registry
from alignscan.bridges import selective_scan_fn

from .layers import drop_paths
from .pruning import KeepPlan, PruningConfig, check_images
from .stages import UNPRUNED, Stages, merge_groups

__all__ = ["VisionMamba", "Prefix", "RMSNorm", "BiMambaMixer", "vim_tiny", "vim_small", "VIM_CONFIGS"]

VIM_CONFIGS = {name: registry.card(name).config for name in registry.names("vim")}   # the one table: alignscan.registry


class RMSNorm(nn.Module):
    """x / rms(x) · weight (eps 1e-5, weight only), computed in float32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def _causal_conv(x, conv, positions=None, seqlen=None):
    """Depthwise causal conv1d (width 4) + SiLU over (b, E, L).

    With ``positions`` the conv reads the original neighbours: tokens are scattered into a
    zero sequence of length ``seqlen``, convolved and gathered back (pruned neighbours read
    as zero): the position-aware option. Without, it runs over the compact sequence.
    """
    length = x.shape[-1]
    if positions is None:
        return F.silu(conv(x)[..., :length])
    idx = positions[:, None, :].expand(-1, x.shape[1], -1)
    full = x.new_zeros(x.shape[0], x.shape[1], seqlen).scatter(2, idx, x)
    return F.silu(torch.gather(conv(full)[..., :seqlen], 2, idx))


def _path_length(position_map):
    """The map's unpruned length as an int: known statically for the maps a model makes (no
    host read); a user's map with rows of different lengths cannot be convolved in one piece."""
    if position_map.seqlen is None:
        raise ValueError("positions must have one seqlen for every row for conv='position_aware'")
    return position_map.seqlen


class BiMambaMixer(nn.Module):
    """Mamba with bimamba v2: a forward and a backward branch, each with its own conv1d,
    x_proj, dt_proj, A and D; ``out_proj((y_fwd + flip(y_bwd)) / 2)``."""

    def __init__(self, d_model, d_state=16, expand=2, d_conv=4):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        E, N, Rk = self.d_inner, d_state, self.dt_rank
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = nn.Parameter(torch.log(A.clone()))
        self.D_b = nn.Parameter(torch.ones(E))
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, Rk + 2 * N, bias=False)
        self.dt_proj = nn.Linear(Rk, E)
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(E, Rk + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(Rk, E)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        with torch.no_grad():   # mamba's dt init: softplus^-1 of dt in [1e-3, 1e-1]
            for proj in (self.dt_proj, self.dt_proj_b):
                dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _branch(self, x, z, conv, x_proj, dt_proj, A_log, D, position_map, alignment, position_aware, backend,
                record):
        xc = _causal_conv(x, conv, position_map.positions if position_aware else None,
                          _path_length(position_map) if position_aware else None)            # (b, E, L)
        dbl = x_proj(xc.transpose(1, 2))                                                  # (b, L, R+2N)
        dt, B, C = torch.split(dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)                                 # (b, E, L)
        scan = (xc, delta, -torch.exp(A_log.float()), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                D.float(), z, dt_proj.bias.float(), True)
        out = selective_scan_fn(*scan, positions=position_map, alignment=alignment, backend=backend)
        if record is not None:
            record.append({"args": scan, "position_map": position_map, "alignment": alignment, "out": out})
        return out

    def forward(self, h, scan=UNPRUNED, backend=None, record=None):
        """h (b, L, D) -> (out (b, L, D), y (b, E, L) merged gated SSM output for importance).

        scan: the stage's ``StageScan`` (made with ``flipped=True``): the forward branch scans
        with its ``position_map``, the backward branch the flipped sequence with its
        ``flipped_map`` (SPEC §3), both under its ``alignment``. backend: the scan backend
        (None: the registry's default). record: a list that receives every scan's arguments."""
        if scan.position_map is not None and scan.flipped_map is None:
            raise ValueError("scan must carry the backward branch's map: make it with StageScan.of(..., flipped=True)")
        xz = self.in_proj(h).transpose(1, 2)                                              # (b, 2E, L)
        x, z = xz.chunk(2, dim=1)
        y_f = self._branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, scan.position_map,
                           scan.alignment, scan.position_aware, backend, record)
        y_b = self._branch(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                           self.D_b, scan.flipped_map, scan.alignment, scan.position_aware, backend, record)
        y = y_f + y_b.flip(-1)
        return self.out_proj((y / 2).transpose(1, 2)), y, y_b


class Block(nn.Module):
    """``residual = residual + hidden`` (hidden alone at the first block), then
    ``hidden = mixer(norm(residual))``; the residual stream is kept in float32."""

    def __init__(self, dim, drop_path=None):
        super().__init__()
        self.mixer = BiMambaMixer(dim)
        self.norm = RMSNorm(dim)
        self.drop_path = drop_path if drop_path is not None else nn.Identity()   # on the incoming hidden

    def forward(self, hidden, residual, scan=UNPRUNED, backend=None, record=None):
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        out, y, y_b = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), scan, backend, record)
        return out, residual, y, y_b


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch=16, channels=3):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                                   # (b, HW, D)


@dataclass(frozen=True)
class Prefix:
    """What a ViM's first ``layers`` layers give a batch of images before any pruning stage,
    the same for every pruning mode and keep ratio whose first stage comes after them
    (``VisionMamba.prefix``): the block outputs ``hidden`` and ``residual`` (b, L, D) and the
    last layer's merged SSM output ``y`` and backward-branch output ``y_b`` (b, E, L), on
    which that stage scores the tokens. Rows index like the images (``prefix[rows]``)."""

    layers: int
    hidden: torch.Tensor
    residual: torch.Tensor
    y: torch.Tensor
    y_b: torch.Tensor

    def __len__(self):
        return self.hidden.shape[0]

    def __getitem__(self, rows):
        return Prefix(self.layers, self.hidden[rows], self.residual[rows], self.y[rows], self.y_b[rows])


class VisionMamba(nn.Module):
    """ViM with the class token in the middle and token pruning (``pruning=``)."""

    def __init__(self, embed_dim=192, depth=24, img_size=224, patch_size=16, num_classes=1000, channels=3,
                 pruning=None, backend=None, drop_path_rate=0.0):
        super().__init__()
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 16 or img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (the patch grid), got {img_size!r}")
        self.backend = backend        # every scan's backend (None: the registry's default for the device)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.cls_index = self.num_patches // 2
        self.num_tokens = self.num_patches + 1
        self.pruning = (pruning if pruning is not None else PruningConfig()).check_depth(depth)
        self.img_size = img_size
        self.patch_embed = PatchEmbed(embed_dim, patch_size, channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        # Block i drops the output of block i - 1 (the official [0] + linspace(0, rate, depth) schedule).
        paths = [nn.Identity()] + drop_paths(drop_path_rate, depth)[:-1]
        self.layers = nn.ModuleList(Block(embed_dim, paths[i]) for i in range(depth))
        self.norm_f = RMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, images):
        check_images(images, self.img_size, self.patch_embed.proj.in_channels)
        x = self.patch_embed(images)
        b = x.shape[0]
        c = self.cls_index
        x = torch.cat([x[:, :c], self.cls_token.expand(b, -1, -1), x[:, c:]], dim=1)
        return x + self.pos_embed

    def forward(self, images, return_kept=False, keep_plan=None, record=None, prefix=None):
        """logits (b, classes); with return_kept also the kept positions (b, K) after each
        pruning stage (indices into the 197 tokens, the class token at index 98; with
        pruned_tokens "fuse" the fused token's slot 197 + stage; with "merge" and more than
        one image, per stage a list of each image's (K_i,) positions).

        keep_plan: optional list, one (b, K) tensor per stage of the original indices to keep
            (ascending, nested, the class token included): the tokens are then not chosen
            by importance, so several modes can be run on exactly the same tokens.
        record: a ``Recorder`` that receives, per layer, the positions with the residual
            stream (``trace``) and with the merged SSM output (``mixer_outputs``), and every
            scan's arguments, map and output (``scans``).
        prefix: the images' ``Prefix`` (``self.prefix(images, layers)`` of a model with these
            weights): its layers are not run again, the rest is. Many modes, ratios and plans
            on the same images share it; the first stage must not come before its end.
        """
        cfg = self.pruning
        if prefix is not None:
            self._check_prefix(prefix, images, record)
        if cfg.active and cfg.pruned_tokens == "merge" and images.shape[0] > 1:
            return self._merged_in_groups(images, return_kept, keep_plan, record, prefix)
        return self._forward(images, return_kept, keep_plan, record, prefix)

    def _check_prefix(self, prefix, images, record):
        if not isinstance(prefix, Prefix):
            raise TypeError(f"prefix must be a Prefix (VisionMamba.prefix), got {type(prefix).__name__}")
        first = self.pruning.schedule[0] if self.pruning.active else len(self.layers)
        if not 1 <= prefix.layers <= first:
            raise ValueError(f"prefix must end at or before the first pruning stage (after layer {first}), "
                             f"got one of {prefix.layers} layers")
        if len(prefix) != images.shape[0] or prefix.hidden.shape[1:] != (self.num_tokens, self.embed_dim):
            raise ValueError(f"prefix must be of these {images.shape[0]} images ({self.num_tokens} tokens of width "
                             f"{self.embed_dim}), got {len(prefix)} rows of {tuple(prefix.hidden.shape[1:])}")
        if record is not None:
            raise ValueError("record= cannot be given with prefix= (the prefix's layers are not run)")

    def prefix(self, images, layers):
        """The ``Prefix`` of ``images``: their first ``layers`` layers, unpruned."""
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= len(self.layers):
            raise ValueError(f"layers must be an int in [1, {len(self.layers)}], got {layers!r}")
        hidden, residual = self.embed(images), None
        for layer in self.layers[:layers]:
            hidden, residual, y, y_b = layer(hidden, residual, backend=self.backend)
        return Prefix(layers, hidden, residual, y, y_b)

    def _forward(self, images, return_kept, keep_plan, record, prefix=None):
        cfg = self.pruning
        hidden, residual, start = (self.embed(images), None, 0) if prefix is None else \
            (prefix.hidden, prefix.residual, prefix.layers)
        b, L, _ = hidden.shape
        # Each stage's scan (maps, the flipped map of the backward branch, the alignment) is
        # made once by the controller and read by every layer of the stage.
        stages = Stages(cfg, b, L, hidden.device, keep_plan=keep_plan, protected=self.cls_index, flipped=True)
        # The released code's selector scores the backward branch alone, unflipped (SPEC §4).
        scored = lambda y, y_b: y_b if cfg.metric == "official" else y
        if prefix is not None:              # the stage (if any) after the prefix's last layer
            hidden, residual = stages.after_layer(start - 1, scored(prefix.y, prefix.y_b), hidden, residual)
        for i in range(start, len(self.layers)):
            hidden, residual, y, y_b = self.layers[i](hidden, residual, stages.scan, self.backend,
                                                      None if record is None else record.scans)
            if record is not None:
                record.layer(stages.positions, residual + hidden.float(), y)
            hidden, residual = stages.after_layer(i, scored(y, y_b), hidden, residual)
        final = self.norm_f((residual + hidden.float()).to(self.norm_f.weight.dtype))
        cls_at = stages.protected_at
        logits = self.head(torch.gather(final, 1, cls_at[..., None].expand(-1, -1, final.shape[-1]))[:, 0])
        return (logits, stages.kept_per_stage) if return_kept else logits


    def _merged_in_groups(self, images, return_kept, keep_plan, record, prefix=None):
        """pruned_tokens="merge": each image has its own number of runs, so its own token count
        after a stage. With a keep plan the counts are known beforehand and the images that
        share them run together (``stages.merge_groups``); without one, one image at a time.
        Each image gets the result it gets alone."""
        if record is not None:
            raise ValueError("record= with pruned_tokens='merge' takes one image per call (each image has its own "
                             f"token count), got a batch of {images.shape[0]}")
        b = images.shape[0]
        if keep_plan is not None:
            if not isinstance(keep_plan, KeepPlan):
                self.pruning.check_plan(keep_plan)
                keep_plan = KeepPlan(keep_plan, self.num_tokens)
            groups = merge_groups(keep_plan, self.num_tokens)
        else:
            groups = [[r] for r in range(b)]
        logits, kept = [None] * b, [[None] * b for _ in self.pruning.schedule]
        for rows in groups:
            index = torch.as_tensor(rows, device=images.device)
            plan = None if keep_plan is None else [stage[index.to(stage.device)] for stage in keep_plan.stages]
            out, positions = self._forward(images[index], True, plan, None, None if prefix is None else prefix[index])
            for j, r in enumerate(rows):
                logits[r] = out[j]
                for s, stage in enumerate(positions):
                    kept[s][r] = stage[j]
        logits = torch.stack(logits)
        return (logits, kept) if return_kept else logits


def vim_tiny(pruning=None, num_classes=1000, **kwargs):
    """ViM-T (dim 192, depth 24) as the official code builds it (SPEC §5): ``models.create("vim_tiny", ...)``;
    kwargs as ``VisionMamba`` (backend=, img_size=, ...)."""
    from . import create  # the package's one builder (it imports this module: not at the top)
    return create("vim_tiny", pruning=pruning, num_classes=num_classes, **kwargs)


def vim_small(pruning=None, num_classes=1000, **kwargs):
    """ViM-S (dim 384, depth 24) as the official code builds it (SPEC §5): ``models.create("vim_small", ...)``;
    kwargs as ``VisionMamba`` (backend=, img_size=, ...)."""
    from . import create  # the package's one builder (it imports this module: not at the top)
    return create("vim_small", pruning=pruning, num_classes=num_classes, **kwargs)
