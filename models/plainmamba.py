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
from torch.utils.checkpoint import checkpoint

from alignscan import reference as R
from alignscan import registry
from alignscan.bridges import selective_scan_fn

from .layers import check_global_pool, check_num_classes, classifier, drop_paths, resample_pos_embed
from .pruning import PruningConfig, check_images
from .stages import Stages

__all__ = ["PlainMamba", "PlainMamba2D", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3", "PLAINMAMBA_CONFIGS"]

PLAINMAMBA_CONFIGS = {name: registry.card(name).config for name in registry.names("plainmamba")}   # alignscan.registry


class PlainMamba2D(nn.Module):
    no_weight_decay_names = ("A_log", "D")       # the SSM's A and D

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
        for name in self.no_weight_decay_names:
            getattr(self, name)._no_weight_decay = True      # mamba's mark on the SSM's A and D

    def forward(self, x, scan, grid, backend=None):
        """x (b, K, D) kept tokens in raster order; scan the stage's ``StageScan`` (made with
        ``scan_paths``): its ``positions`` (b, K) the tokens' raster indices, its ``paths``
        each snake path's plan, its ``alignment`` that of every path's scan. Returns
        (out (b, K, D), y (b, E, K) merged gated SSM output)."""
        kept = scan.positions
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
        for index, inverse, path_map, labels in scan.paths:
            index, inverse = index.expand(b, -1), inverse.expand(b, -1)
            u = torch.gather(xc, 2, index[:, None, :].expand(-1, E, -1))                # u in path order
            B_k = (Bm + self.direction_Bs[labels].transpose(-1, -2)).contiguous()        # quirk: B in raster order
            y_k = selective_scan_fn(u, delta, A, B_k, Cm, self.D.float(), None,
                                    self.dt_proj.bias.float(), True, positions=path_map, alignment=scan.alignment,
                                    backend=backend)
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

    def forward(self, x, scan, grid, backend=None):
        out, y = self.mamba(self.norm(x), scan, grid, backend)
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
        self.fc = classifier(dim, num_classes)


class PlainMamba(nn.Module):
    """PlainMamba backbone + linear head on the mean token, with token pruning.

    timm's model API: ``forward_features`` (the mean token's feature), ``forward_head``,
    ``get_classifier``, ``reset_classifier``, ``no_weight_decay``, ``set_grad_checkpointing``,
    ``group_matcher`` and ``load_pretrained`` (the official layouts, for timm's loader)."""

    global_pool = "avg"                       # timm's name for the mean over tokens
    pos_embed_name = "backbone.pos_embed"     # the state-dict key resampled for another img_size
    first_conv = "backbone.patch_embed.stem.0"
    classifier_name = "head.fc"

    def __init__(self, embed_dim=192, depth=24, stem_convs=1, dw_after_first=True, num_classes=1000, img_size=224,
                 channels=3, pruning=None, backend=None, drop_path_rate=0.0):
        super().__init__()
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 16 or img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (the patch grid), got {img_size!r}")
        self.backend = backend        # every scan's backend (None: the registry's default for the device)
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False
        self.pruning = (pruning if pruning is not None else PruningConfig()).check_depth(depth)
        if self.pruning.metric == "official":
            raise ValueError("metric 'official' (the released ViM code's selector, SPEC §4) needs ViM's backward "
                             "branch: PlainMamba has none; use clip, raw, l1 or l2")
        if self.pruning.pruned_tokens != "drop" or self.pruning.recenter_cls:
            raise ValueError(f"pruned_tokens={self.pruning.pruned_tokens!r}, recenter_cls={self.pruning.recenter_cls} "
                             "are ViM's (a fused or merged token has no cell on PlainMamba's grid, and PlainMamba "
                             "has no class token): use pruned_tokens='drop', recenter_cls=False")
        self.img_size = img_size
        self.num_classes = check_num_classes(num_classes)
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
        layer output (``trace``) and with the merged SSM output (``mixer_outputs``).
        With ``num_classes=0`` (no head) the logits are ``forward_features``' features."""
        feature, kept = self._features(images, keep_plan, record)
        logits = self.forward_head(feature)
        return (logits, kept) if return_kept else logits

    def forward_features(self, images):
        """timm's ``forward_features``: the mean token's feature (b, embed_dim), the head's
        input: the final LayerNorm (``ln1``) of the tokens left after the model's pruning
        stages (they run here, as in ``forward``), averaged. As PlainMamba's own classifier
        pools it, the pooled feature rather than the token grid: pruning changes the number of
        tokens. ``forward_head(forward_features(x))`` is ``forward(x)``."""
        return self._features(images, None, None)[0]

    def forward_head(self, x, pre_logits=False):
        """timm's ``forward_head``: the logits (b, num_classes) of ``forward_features``' (b,
        embed_dim), or (``pre_logits``) those features themselves (the mean is taken in
        ``forward_features``; there is no dropout before the head)."""
        return x if pre_logits else self.head.fc(x)

    def get_classifier(self):
        """The head's linear layer (``head.fc``): nn.Linear(embed_dim, num_classes), or nn.Identity."""
        return self.head.fc

    def reset_classifier(self, num_classes, global_pool=None):
        """A freshly initialised head for ``num_classes`` (0: nn.Identity, the model then gives
        its features), on the old head's device and dtype. ``global_pool``: None or "avg"
        (the mean over tokens; anything else is a ValueError naming the argument)."""
        check_global_pool(global_pool, self.global_pool, type(self).__name__)
        like = next(iter(self.head.fc.parameters()), self.backbone.pos_embed)
        self.head.fc = classifier(self.embed_dim, num_classes, like=like)
        self.num_classes = num_classes

    def no_weight_decay(self):
        """The parameters timm's optimizer factories keep out of weight decay, ViM's choice in
        PlainMamba's names: the position embedding (``backbone.pos_embed``; PlainMamba has no
        class token) and the SSM's A_log and D of every layer, which its mixer marks
        ``_no_weight_decay`` as mamba does. (direction_Bs is decayed, as any 2-D weight.)"""
        return {"backbone.pos_embed"} | {f"{path}.{name}" for path, module in self.named_modules()
                                         if isinstance(module, PlainMamba2D) for name in module.no_weight_decay_names}

    def set_grad_checkpointing(self, enable=True):
        """Recompute each layer in the backward pass instead of keeping its activations
        (``torch.utils.checkpoint``, non-reentrant; stochastic depth replays its draws).
        Gradients are those without it; layers run whole when gradients are off, and so does
        L1's first layer (its BatchNorm's running statistics must be updated once)."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse=False):
        """timm's parameter groups (layer-wise learning-rate decay): the embedding, each layer,
        the final norm."""
        return dict(stem=r"^backbone\.pos_embed|^backbone\.patch_embed",
                    blocks=[(r"^backbone\.layers\.(\d+)", None), (r"^backbone\.ln1", (99999,))])

    def resample_pos_embed(self, posemb):
        """A checkpoint's pos_embed (1, g*g, D) for this model's grid (``layers.resample_pos_embed``;
        the same grid: unchanged). The snake paths are derived from the grid, not stored."""
        return resample_pos_embed(posemb, self.grid[0], name=self.pos_embed_name)

    def load_pretrained(self, checkpoint_path, prefix=""):
        """timm's hook for a model's own checkpoint format: the file in either official layout,
        its plain weights (``state_dict``), the head freshly initialised when the classes
        differ, pos_embed resampled to this img_size (``checkpoints.load_checkpoint(adapt=True)``)."""
        from .checkpoints import load_checkpoint
        if prefix:
            raise ValueError(f"prefix must be empty: the official layouts have none, got {prefix!r}")
        load_checkpoint(self, checkpoint_path, adapt=True)

    def _features(self, images, keep_plan, record):
        """(the pooled feature (b, D), the kept raster indices per stage)."""
        cfg = self.pruning
        bb = self.backbone
        check_images(images, self.img_size, bb.patch_embed.stem[0].in_channels)
        x = bb.patch_embed(images).flatten(2).transpose(1, 2) + bb.pos_embed               # (b, HW, D)
        b, L, _ = x.shape
        # Each stage's scan (the kept tokens, each snake path's order and map, the alignment) is
        # made once by the controller and read by every layer of the stage (SPEC §3).
        stages = Stages(cfg, b, L, x.device, keep_plan=keep_plan, scan_paths=(bb.path_orders, bb.path_labels))
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(bb.layers):
            # L1's first layer runs whole: its BatchNorm would update its running statistics again
            # when recomputed.
            if recompute and not hasattr(layer, "dw"):
                x, y = checkpoint(layer, x, stages.scan, self.grid, self.backend, use_reentrant=False)
            else:
                x, y = layer(x, stages.scan, self.grid, self.backend)
            if record is not None:
                record.layer(stages.positions, x, y)
            (x,) = stages.after_layer(i, y, x)
        return bb.ln1(x).mean(dim=1), stages.kept_per_stage


def plainmamba_l1(pruning=None, num_classes=1000, **kwargs):
    """PlainMamba-L1 as the official code builds it (SPEC §5): ``models.create("plainmamba_l1", ...)``;
    kwargs as ``PlainMamba`` (backend=, img_size=, ...)."""
    from . import create  # the package's one builder (it imports this module: not at the top)
    return create("plainmamba_l1", pruning=pruning, num_classes=num_classes, **kwargs)


def plainmamba_l2(pruning=None, num_classes=1000, **kwargs):
    """PlainMamba-L2 as the official code builds it (SPEC §5): ``models.create("plainmamba_l2", ...)``;
    kwargs as ``PlainMamba`` (backend=, img_size=, ...)."""
    from . import create  # the package's one builder (it imports this module: not at the top)
    return create("plainmamba_l2", pruning=pruning, num_classes=num_classes, **kwargs)


def plainmamba_l3(pruning=None, num_classes=1000, **kwargs):
    """PlainMamba-L3 as the official code builds it (SPEC §5): ``models.create("plainmamba_l3", ...)``;
    kwargs as ``PlainMamba`` (backend=, img_size=, ...)."""
    from . import create  # the package's one builder (it imports this module: not at the top)
    return create("plainmamba_l3", pruning=pruning, num_classes=num_classes, **kwargs)
