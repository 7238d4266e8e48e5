"""PlainMamba (ChenhongyiYang/PlainMamba, L1/L2/L3) with token pruning (SPEC §3-5).

Built as the official code builds it, quirks included, so the released mmcls checkpoints
(keys ``backbone.*`` and ``head.fc.*``, ../shared/models/plainmamba_l*.json) load strictly:
four snake-path scans share every parameter; scan k gets u = xc permuted to path k but
delta, B and C in raster order, B plus direction_Bs[the arrival move of the path position],
and dt_proj's bias a second time as delta_bias; the four outputs are un-permuted, summed,
gated by SiLU(z) and projected. Under pruning the compact kept tokens play the raster
sequence and ``reference.path_positions`` gives each path's order and position map.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignscan import reference as R
from alignscan import registry
from alignscan.bridges import selective_scan_fn

from .layers import drop_paths
from .pruning import PruningConfig, check_images
from .stages import Stages

__all__ = ["PlainMamba", "PlainMamba2D", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3", "PLAINMAMBA_CONFIGS"]

PLAINMAMBA_CONFIGS = {name: registry.card(name).config for name in registry.names("plainmamba")}   # alignscan.registry


class PathPlan:
    """Per snake path, for the current kept tokens: the compact order along the path
    (``index``), its inverse, the path's position map (None when nothing is pruned) and the
    direction label of each path position. Made once per pruning stage."""

    def __init__(self, kept_map, orders, labels):
        """orders, labels: (4, HW) the snake paths and their direction labels (SPEC §3), tensors
        on the device (the backbone's buffers), so that making a plan reads nothing on the host."""
        self.seqlen = orders.shape[1]
        self.paths = []
        for order, label in zip(orders, labels):
            if kept_map is None:    # dense: the path visits every token, in its own order
                index = order[None]
                self.paths.append((index, torch.argsort(index, dim=1), None, label[None]))
                continue
            index, path_map = kept_map.path(order, trusted=True)     # the model's own snake path
            self.paths.append((index, torch.argsort(index, dim=1), path_map, label[path_map.positions]))


class PlainMamba2D(nn.Module):
    def __init__(self, d_model, d_state=16, expand=2, d_conv=7):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        E, N, Rk = self.d_inner, d_state, self.dt_rank
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)))
        self.D = nn.Parameter(torch.ones(E))
        self.direction_Bs = nn.Parameter(torch.zeros(5, N))
        self.in_proj = nn.Linear(d_model, 2 * E)
        self.conv2d = nn.Conv2d(E, E, d_conv, padding=d_conv // 2, groups=E)
        self.x_proj = nn.Linear(E, Rk + 2 * N, bias=False)
        self.dt_proj = nn.Linear(Rk, E)
        self.out_proj = nn.Linear(E, d_model)
        nn.init.trunc_normal_(self.direction_Bs, std=0.02)

    def forward(self, x, kept, plan, grid, alignment="none", backend=None):
        """x (b, K, D) kept tokens in raster order; kept (b, K) their raster indices; plan
        the stage's ``PathPlan``. Returns (out (b, K, D), y (b, E, K) merged gated SSM output)."""
        b, K, _ = x.shape
        H, W = grid
        E = self.d_inner
        xs, z = self.in_proj(x).chunk(2, dim=-1)                                        # (b, K, E)
        # 7x7 depthwise conv on the grid: kept tokens scattered back, pruned cells zero.
        full = xs.new_zeros(b, H * W, E).scatter(1, kept[..., None].expand(-1, -1, E), xs)
        conv = self.conv2d(full.transpose(1, 2).reshape(b, E, H, W)).flatten(2)         # (b, E, HW)
        xc = F.silu(torch.gather(conv, 2, kept[:, None, :].expand(-1, E, -1)))          # (b, E, K)
        dbl = self.x_proj(xc.transpose(1, 2))
        dt, Bm, Cm = torch.split(dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2).contiguous()                            # bias included once
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2).contiguous()                     # (b, N, K), raster order
        A = -torch.exp(self.A_log.float())
        y = 0
        for index, inverse, path_map, labels in plan.paths:
            index, inverse = index.expand(b, -1), inverse.expand(b, -1)
            u = torch.gather(xc, 2, index[:, None, :].expand(-1, E, -1))                # u in path order
            B_k = (Bm + self.direction_Bs[labels].transpose(-1, -2)).contiguous()        # quirk: B in raster order
            y_k = selective_scan_fn(u, delta, A, B_k, Cm, self.D.float(), None,
                                    self.dt_proj.bias.float(), True, positions=path_map,
                                    alignment=alignment if path_map is not None else "none", backend=backend)
            y = y + torch.gather(y_k, 2, inverse[:, None, :].expand(-1, E, -1))          # back to raster order
        y = y * F.silu(z.transpose(1, 2))
        return self.out_proj(y.transpose(1, 2)), y


class PlainMambaLayer(nn.Module):
    def __init__(self, dim, with_dw=False, drop_path=None):
        super().__init__()
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.mamba = PlainMamba2D(dim)
        if with_dw:   # PlainMamba-L1, layer 0: depthwise 3x3 + BN + GELU replaces the output
            self.dw = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim),
                                    nn.GELU())

    def forward(self, x, kept, plan, grid, alignment, backend=None):
        out, y = self.mamba(self.norm(x), kept, plan, grid, alignment, backend)
        x = x + self.drop_path(out)
        if hasattr(self, "dw"):
            b, L, D = x.shape
            x = self.dw(x.transpose(1, 2).reshape(b, D, *grid)).flatten(2).transpose(1, 2)
        return x, y


class PatchEmbed(nn.Module):
    def __init__(self, dim, stem_convs, channels=3, mid=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, mid, 7, 2, 3, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        convs = []
        for _ in range(stem_convs):
            convs += [nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.projection = nn.Conv2d(mid, dim, 8, 8)

    def forward(self, x):
        return self.projection(self.convs(self.stem(x)))                                 # (b, D, H, W)


class Backbone(nn.Module):
    def __init__(self, embed_dim, depth, stem_convs, dw_after_first, img_size=224, channels=3, drop_path_rate=0.0):
        super().__init__()
        self.grid = (img_size // 16, img_size // 16)
        self.patch_embed = PatchEmbed(embed_dim, stem_convs, channels)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        paths = drop_paths(drop_path_rate, depth)
        self.layers = nn.ModuleList(PlainMambaLayer(embed_dim, with_dw=(dw_after_first and i == 0), drop_path=paths[i])
                                    for i in range(depth))
        self.ln1 = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        orders, labels = R.snake_paths(*self.grid)
        # The four snake paths on the module's device (not in the state dict: derived, not learned).
        self.register_buffer("path_orders", torch.as_tensor(np.asarray(orders), dtype=torch.int64), persistent=False)
        self.register_buffer("path_labels", torch.as_tensor(np.asarray(labels), dtype=torch.int64), persistent=False)


class Head(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)


class PlainMamba(nn.Module):
    """PlainMamba backbone + linear head on the mean token, with token pruning."""

    def __init__(self, embed_dim=192, depth=24, stem_convs=1, dw_after_first=True, num_classes=1000, img_size=224,
                 channels=3, pruning=None, backend=None, drop_path_rate=0.0):
        super().__init__()
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 16 or img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (the patch grid), got {img_size!r}")
        self.backend = backend        # every scan's backend (None: the registry's default for the device)
        self.embed_dim = embed_dim
        self.pruning = (pruning if pruning is not None else PruningConfig()).check_depth(depth)
        if self.pruning.metric == "official":
            raise ValueError("metric 'official' (the released ViM code's selector, SPEC §4) needs ViM's backward "
                             "branch: PlainMamba has none; use clip, raw, l1 or l2")
        if self.pruning.pruned_tokens != "drop" or self.pruning.recenter_cls:
            raise ValueError(f"pruned_tokens={self.pruning.pruned_tokens!r}, recenter_cls={self.pruning.recenter_cls} "
                             "are ViM's (a fused or merged token has no cell on PlainMamba's grid, and PlainMamba "
                             "has no class token): use pruned_tokens='drop', recenter_cls=False")
        self.img_size = img_size
        self.num_classes = num_classes
        self.backbone = Backbone(embed_dim, depth, stem_convs, dw_after_first, img_size, channels, drop_path_rate)
        self.head = Head(embed_dim, num_classes)

    @property
    def grid(self):
        return self.backbone.grid

    def forward(self, images, return_kept=False, keep_plan=None, record=None):
        """logits (b, classes); with return_kept also the kept raster indices (b, K) after
        each pruning stage. keep_plan: optional list, one (b, K) tensor per stage of the
        raster indices to keep (ascending, nested) instead of choosing them by importance.
        record: a ``Recorder`` that receives, per layer, the kept raster indices with the
        layer output (``trace``) and with the merged SSM output (``mixer_outputs``)."""
        cfg = self.pruning
        bb = self.backbone
        check_images(images, self.img_size, bb.patch_embed.stem[0].in_channels)
        x = bb.patch_embed(images).flatten(2).transpose(1, 2) + bb.pos_embed               # (b, HW, D)
        b, L, _ = x.shape
        stages = Stages(cfg, b, L, x.device, keep_plan=keep_plan)
        plan = PathPlan(None, bb.path_orders, bb.path_labels)
        for i, layer in enumerate(bb.layers):
            x, y = layer(x, stages.positions, plan, self.grid, stages.alignment, self.backend)
            if record is not None:
                record.layer(stages.positions, x, y)
            was = stages.position_map
            (x,) = stages.after_layer(i, y, x)
            if stages.position_map is not was:
                plan = PathPlan(stages.position_map, bb.path_orders, bb.path_labels)   # each path's map (SPEC §3)
        logits = self.head.fc(bb.ln1(x).mean(dim=1))
        return (logits, stages.kept_per_stage) if return_kept else logits


def _make(name):
    def build(pruning=None, num_classes=1000, **kwargs):
        model = PlainMamba(**{**PLAINMAMBA_CONFIGS[name], **kwargs}, num_classes=num_classes, pruning=pruning)
        model.arch_name = name
        return model
    build.__name__ = name
    build.__doc__ = f"PlainMamba-{name[-2:].upper()} as the official code builds it (SPEC §5)."
    return build


plainmamba_l1 = _make("plainmamba_l1")
plainmamba_l2 = _make("plainmamba_l2")
plainmamba_l3 = _make("plainmamba_l3")
