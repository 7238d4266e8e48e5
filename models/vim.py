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
from torch.utils.checkpoint import checkpoint

from alignscan import registry
from alignscan.bridges import selective_scan_fn

from .layers import check_global_pool, check_num_classes, classifier, drop_paths, resample_pos_embed
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

    no_weight_decay_names = ("A_log", "D", "A_b_log", "D_b")     # the SSM's A and D, both branches

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
        for name in self.no_weight_decay_names:
            getattr(self, name)._no_weight_decay = True      # mamba's mark, as Vim's mixer sets it
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
    """ViM with the class token in the middle and token pruning (``pruning=``).

    timm's model API: ``forward_features`` (the class token's feature), ``forward_head``,
    ``get_classifier``, ``reset_classifier``, ``no_weight_decay``, ``set_grad_checkpointing``,
    ``group_matcher`` and ``load_pretrained`` (the official layouts, for timm's loader)."""

    global_pool = "token"            # timm's name for reading the class token
    pos_embed_name = "pos_embed"     # the state-dict key resampled for another img_size
    first_conv = "patch_embed.proj"
    classifier_name = "head"

    def __init__(self, embed_dim=192, depth=24, img_size=224, patch_size=16, num_classes=1000, channels=3,
                 pruning=None, backend=None, drop_path_rate=0.0):
        super().__init__()
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 16 or img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (the patch grid), got {img_size!r}")
        self.backend = backend        # every scan's backend (None: the registry's default for the device)
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_classes = check_num_classes(num_classes)
        self.grad_checkpointing = False
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
        self.head = classifier(embed_dim, num_classes)
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

        With ``num_classes=0`` (no head) the logits are ``forward_features``' features.
        """
        return self._run(images, return_kept, keep_plan, record, prefix, pre_logits=False)

    def forward_features(self, images):
        """timm's ``forward_features``: the class token's feature (b, embed_dim), the head's
        input: ``norm_f`` of the last layer's output, read where the class token stands after
        the model's pruning stages (they run here, as in ``forward``). As Vim's own
        ``forward_features``, the pooled token rather than timm ViTs' token sequence: pruning
        changes the sequence's length. ``forward_head(forward_features(x))`` is ``forward(x)``."""
        return self._run(images, False, None, None, None, pre_logits=True)

    def forward_head(self, x, pre_logits=False):
        """timm's ``forward_head``: the logits (b, num_classes) of ``forward_features``' (b,
        embed_dim), or (``pre_logits``) those features themselves (ViM has no pooling or
        dropout between them and the head)."""
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        """The head: nn.Linear(embed_dim, num_classes), or nn.Identity with no classes."""
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """A freshly initialised head for ``num_classes`` (0: nn.Identity, the model then gives
        its features), on the old head's device and dtype. ``global_pool``: None or "token"
        (ViM reads its class token; anything else is a ValueError naming the argument)."""
        check_global_pool(global_pool, self.global_pool, type(self).__name__)
        like = next(iter(self.head.parameters()), self.pos_embed)
        self.head = classifier(self.embed_dim, num_classes, like=like)
        self.num_classes = num_classes

    def no_weight_decay(self):
        """The parameters timm's optimizer factories keep out of weight decay: Vim's own
        ``no_weight_decay`` (pos_embed, cls_token; its dist_token, cls_token_head and
        cls_token_tail do not exist in the midclstok models) and the SSM's A_log, A_b_log, D
        and D_b of every layer, which Vim's mixer marks ``_no_weight_decay`` (mamba's
        convention, which timm's factories do not read: they read this list)."""
        return {"pos_embed", "cls_token"} | {f"{path}.{name}" for path, module in self.named_modules()
                                              if isinstance(module, BiMambaMixer)
                                              for name in module.no_weight_decay_names}

    def set_grad_checkpointing(self, enable=True):
        """Recompute each layer in the backward pass instead of keeping its activations
        (``torch.utils.checkpoint``, non-reentrant; stochastic depth replays its draws).
        Gradients are those without it. Layers run whole when gradients are off or with
        ``record=`` (a recomputed layer would record its scans twice)."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse=False):
        """timm's parameter groups (layer-wise learning-rate decay): the embedding, each layer,
        the final norm."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None),
                                                                        (r"^norm_f", (99999,))])

    def resample_pos_embed(self, posemb):
        """A checkpoint's pos_embed (1, g*g + 1, D), class token in the middle, for this model's
        grid (``layers.resample_pos_embed``; the same grid: unchanged)."""
        return resample_pos_embed(posemb, self.grid, middle_token=True, name=self.pos_embed_name)

    def load_pretrained(self, checkpoint_path, prefix=""):
        """timm's hook for a model's own checkpoint format: the file in either official layout,
        its plain weights (``model``), the head freshly initialised when the classes differ,
        pos_embed resampled to this img_size (``checkpoints.load_checkpoint(adapt=True)``)."""
        from .checkpoints import load_checkpoint
        if prefix:
            raise ValueError(f"prefix must be empty: the official layouts have none, got {prefix!r}")
        load_checkpoint(self, checkpoint_path, adapt=True)

    def _run(self, images, return_kept, keep_plan, record, prefix, pre_logits):
        cfg = self.pruning
        if prefix is not None:
            self._check_prefix(prefix, images, record)
        if cfg.active and cfg.pruned_tokens == "merge" and images.shape[0] > 1:
            return self._merged_in_groups(images, return_kept, keep_plan, record, prefix, pre_logits)
        return self._forward(images, return_kept, keep_plan, record, prefix, pre_logits)

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

    def _forward(self, images, return_kept, keep_plan, record, prefix=None, pre_logits=False):
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
        recompute = self.grad_checkpointing and record is None and torch.is_grad_enabled()
        for i in range(start, len(self.layers)):
            if recompute:
                hidden, residual, y, y_b = checkpoint(self.layers[i], hidden, residual, stages.scan, self.backend,
                                                      None, use_reentrant=False)
            else:
                hidden, residual, y, y_b = self.layers[i](hidden, residual, stages.scan, self.backend,
                                                          None if record is None else record.scans)
            if record is not None:
                record.layer(stages.positions, residual + hidden.float(), y)
            hidden, residual = stages.after_layer(i, scored(y, y_b), hidden, residual)
        final = self.norm_f((residual + hidden.float()).to(self.norm_f.weight.dtype))
        cls_at = stages.protected_at
        feature = torch.gather(final, 1, cls_at[..., None].expand(-1, -1, final.shape[-1]))[:, 0]
        out = self.forward_head(feature, pre_logits=pre_logits)
        return (out, stages.kept_per_stage) if return_kept else out


    def _merged_in_groups(self, images, return_kept, keep_plan, record, prefix=None, pre_logits=False):
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
        outputs, kept = [None] * b, [[None] * b for _ in self.pruning.schedule]
        for rows in groups:
            index = torch.as_tensor(rows, device=images.device)
            plan = None if keep_plan is None else [stage[index.to(stage.device)] for stage in keep_plan.stages]
            out, positions = self._forward(images[index], True, plan, None, None if prefix is None else prefix[index],
                                           pre_logits)
            for j, r in enumerate(rows):
                outputs[r] = out[j]
                for s, stage in enumerate(positions):
                    kept[s][r] = stage[j]
        outputs = torch.stack(outputs)
        return (outputs, kept) if return_kept else outputs


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
