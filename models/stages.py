"""The pruning stages of one forward pass, in one place for both models.

A ``Stages`` object carries what pruning has done so far — the positions of the current
tokens on the unpruned path, their ``TorchPositionMap``, the live mask of the "mask" mode,
where the protected tokens (ViM's class token) now sit, the kept positions of each stage —
and after each scheduled layer chooses the kept tokens (by importance, or from a keep plan),
then zeroes (mode "mask") or gathers the token streams and composes the map (SPEC §3).
ViM and PlainMamba keep only what differs: the class token, the scan paths.

What the layers of a stage scan with is one immutable ``StageScan`` (``Stages.scan``), made
once when the stage begins: the map, the alignment that applies ("none" until a stage has
pruned), ViM's flipped map or PlainMamba's snake-path plan. Every layer reads it and derives
nothing, so the rule "no alignment without pruning" and each map transform live here alone.

A ``Recorder`` collects what a forward did, for experiments and tests: per layer the
residual stream (``trace``) and the merged SSM output the importance is computed from
(``mixer_outputs``), and every scan's arguments, map and output (``scans``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from alignscan import reference as R
from alignscan.bridges import TorchPositionMap

from .pruning import KeepPlan, plan_indices, select_kept, token_scores

__all__ = ["Stages", "StageScan", "UNPRUNED", "snake_path_plan", "Recorder", "fuse_pruned", "merge_runs", "merge_groups", "recentre_order"]


def _gather_tokens(streams, index):
    """Each (b, n, D) stream at the token indices ``index`` (b, K) -> (b, K, D)."""
    return tuple(torch.gather(t, 1, index[..., None].expand(-1, -1, t.shape[-1])) for t in streams)


def _kept_mask(kept, n):
    return torch.zeros(kept.shape[0], n, dtype=torch.bool, device=kept.device).scatter(1, kept, True)


def fusion_weights(scores, kept):
    """(batch, n) weights of the pruned tokens (0 for the kept ones): importance clipped at
    zero, normalised per row, uniform where every clipped score is 0
    (``reference.pruned_tokens.fusion_weights``)."""
    pruned = ~_kept_mask(kept, scores.shape[1])
    clipped = scores.clamp_min(0) * pruned
    total = clipped.sum(dim=1, keepdim=True)
    uniform = pruned.to(scores.dtype) / pruned.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, clipped / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def fuse_pruned(streams, kept, scores):
    """EViT's fused token (``reference.fuse_pruned``): each (b, n, D) stream becomes its kept
    tokens followed by the pruned tokens' weighted average, (b, K + 1, D)."""
    weights = fusion_weights(scores, kept)
    return tuple(torch.cat([k, torch.einsum("bn,bnd->bd", weights.to(t.dtype), t)[:, None]], dim=1)
                 for t, k in zip(streams, _gather_tokens(streams, kept)))


def merge_runs(streams, kept, positions):
    """Each run of consecutive pruned tokens averaged into one token in its place, at the
    position of the run's last token (``reference.merge_runs``). Returns (streams (b, T, D),
    positions (b, T), group (b, n): the output token each input token went to). Every row
    must come out with the same T (one image at a time does); T is read on the host."""
    b, n = positions.shape
    is_kept = _kept_mask(kept, n)
    after_kept = torch.cat([torch.ones_like(is_kept[:, :1]), is_kept[:, :-1]], dim=1)
    group = torch.cumsum((is_kept | after_kept).long(), dim=1) - 1    # kept: its own; a run: one
    sizes = group[:, -1] + 1
    T = int(sizes.max())
    if int(sizes.min()) != T:
        raise ValueError("pruned_tokens='merge' left the images of this batch with different token counts; "
                         "run them one image at a time (the models do so themselves)")
    count = torch.zeros(b, T, dtype=torch.float64, device=positions.device).scatter_add(
        1, group, torch.ones(b, n, dtype=torch.float64, device=positions.device))
    out = []
    for t in streams:
        index = group[..., None].expand(-1, -1, t.shape[-1])
        total = torch.zeros(b, T, t.shape[-1], dtype=torch.float64, device=t.device).scatter_add(1, index, t.double())
        out.append((total / count[..., None]).to(t.dtype))
    merged = torch.zeros(b, T, dtype=positions.dtype, device=positions.device).scatter_reduce(
        1, group, positions, "amax", include_self=False)
    return tuple(out), merged, group


def merge_groups(keep_plan, tokens):
    """The rows of a checked ``KeepPlan`` grouped so that "merge" leaves every row of a group
    with the same token count after each stage (lists of row indices, in order of their
    first row): the counts follow from the plan alone (``reference.merge_runs`` on the
    positions, on the host, where the plan was checked)."""
    stages = [stage.detach().cpu().numpy() for stage in keep_plan.stages]
    groups = {}
    for r in range(stages[0].shape[0] if stages else 0):
        current, counts = np.arange(tokens), []
        for stage in stages:
            kept = np.flatnonzero(np.isin(current, stage[r]))
            _, current = R.merge_runs(np.zeros((len(current), 0)), kept, current)
            counts.append(len(current))
        groups.setdefault(tuple(counts), []).append(r)
    return list(groups.values())


def recentre_order(n, cls_at):
    """(b, n) orders that move the class token (at ``cls_at`` (b, 1)) to index n // 2 and keep
    the other tokens' order (``reference.recentre_order``)."""
    index = torch.arange(n, device=cls_at.device).expand(cls_at.shape[0], n)
    others = index[index != cls_at].view(cls_at.shape[0], n - 1)
    middle = n // 2
    return torch.cat([others[:, :middle], cls_at, others[:, middle:]], dim=1)


def snake_path_plan(position_map, orders, labels):
    """Per scan path, for the current tokens: ``(index, inverse, path_map, path_labels)``, the
    compact order along the path, its inverse, the path's position map (None when nothing is
    pruned) and the direction label of each path position (SPEC §3). ``orders``, ``labels``:
    (paths, HW) the paths over the unpruned grid and their labels, tensors on the device (a
    model's buffers), so that a plan reads nothing on the host."""
    plan = []
    for order, label in zip(orders, labels):
        if position_map is None:    # unpruned: the path visits every token, in its own order
            index = order[None]
            plan.append((index, torch.argsort(index, dim=1), None, label[None]))
            continue
        index, path_map = position_map.path(order, trusted=True)     # the model's own snake path
        plan.append((index, torch.argsort(index, dim=1), path_map, label[path_map.positions]))
    return tuple(plan)


@dataclass(frozen=True)
class StageScan:
    """What every scan of one pruning stage runs with: made once per stage (``Stages.scan``,
    or ``StageScan.of``) and read by each layer of the stage, which derives nothing from it.
    Tensors stay on the model's device; nothing here reads the host.

    Attributes:
        positions: (b, L) the current tokens' indices on the unpruned path (PlainMamba: their
            raster indices, where its conv scatters them); None in ``UNPRUNED``.
        position_map: their ``TorchPositionMap``; None while nothing is pruned.
        alignment: the scans' alignment: the pruning mode's once a stage has pruned, "none"
            before (an unpruned scan has no gaps to align).
        position_aware: ViM's conv1d reads the original neighbours (``conv="position_aware"``,
            once pruned).
        flipped_map: ViM's backward-branch map, ``position_map.flip()`` (SPEC §3); None when
            unpruned or not asked for.
        paths: PlainMamba's ``snake_path_plan`` for these tokens; None when not asked for.
    """

    positions: torch.Tensor | None = None
    position_map: TorchPositionMap | None = None
    alignment: str = "none"
    position_aware: bool = False
    flipped_map: TorchPositionMap | None = None
    paths: tuple | None = None

    @classmethod
    def of(cls, positions, position_map, alignment, conv="compact", flipped=False, scan_paths=None):
        """The scan of tokens at ``positions`` with ``position_map`` (None: unpruned) under a
        mode's ``alignment`` and ViM's ``conv`` setting; ``flipped``: with the backward
        branch's map (ViM); ``scan_paths``: (orders, labels) of the snake paths to plan
        (PlainMamba)."""
        pruned = position_map is not None
        return cls(positions, position_map, alignment if pruned else "none", pruned and conv == "position_aware",
                   position_map.flip() if flipped and pruned else None,
                   None if scan_paths is None else snake_path_plan(position_map, *scan_paths))


# The scan of layers that run before any pruning stage and read no positions (ViM's prefix).
UNPRUNED = StageScan()


@dataclass
class Recorder:
    """What one forward did. Pass ``record=Recorder()`` to a model's forward.

    Attributes:
        trace: per layer, (positions (b, L), the layer's output stream (b, L, D)).
        mixer_outputs: per layer, (positions (b, L), y (b, E, L)), the merged gated SSM output.
        scans: every scan, {"args", "position_map", "alignment", "out"} (ViM: forward branch,
            then backward branch, layer by layer).
    """

    trace: list = field(default_factory=list)
    mixer_outputs: list = field(default_factory=list)
    scans: list = field(default_factory=list)

    def layer(self, positions, stream, y):
        self.trace.append((positions, stream))
        self.mixer_outputs.append((positions, y))


class Stages:
    """The pruning state of one forward pass through a model's layers.

    Args:
        config: the model's ``PruningConfig``.
        batch, tokens, device: the token grid before any pruning.
        keep_plan: optional ``KeepPlan`` (or a list it is made from), one (batch, K) tensor per
            stage of the original indices to keep (ascending, nested), instead of choosing
            them by importance.
        protected: optional index (into the unpruned tokens) that every stage keeps and a
            keep plan must keep (ViM's class token).
        flipped: the layers also scan the flipped sequence (ViM's backward branch): each
            stage's ``scan`` carries its map.
        scan_paths: optional (orders, labels) of the snake paths over the unpruned grid
            (PlainMamba): each stage's ``scan`` carries their plan for its tokens.

    ``scan`` is the current stage's ``StageScan``, made anew when a stage changes the tokens.
    """

    def __init__(self, config, batch, tokens, device, keep_plan=None, protected=None, flipped=False,
                 scan_paths=None):
        config.check_plan(keep_plan)
        if keep_plan is not None and not isinstance(keep_plan, KeepPlan):
            keep_plan = KeepPlan(keep_plan, tokens)          # a plain list: checked here, on the host
        if keep_plan is not None and protected is not None:
            # One rule for every mode: "mask" zeroes what a plan drops, so a plan without the
            # class token would have the head read a zeroed token.
            for stage, kept in enumerate(keep_plan.in_every_row):
                if protected not in kept:
                    raise ValueError(f"keep_plan[{stage}] must keep the class token (index {protected}) in every row")
        self.config = config
        self.tokens = tokens
        self.keep_plan = keep_plan
        self.protected = protected
        self.positions = torch.arange(tokens, device=device).expand(batch, tokens)   # original indices, (b, L)
        self.position_map = None                      # TorchPositionMap of the current tokens, once pruned
        # "mask": the live tokens' indices (the pruned ones stay in place, zeroed).
        self.live = self.positions if config.mode == "mask" else None
        # Where the protected token sits in the current (compact) token axis.
        self.protected_at = None if protected is None else torch.full((batch, 1), protected, device=device,
                                                                      dtype=torch.long)
        self.kept_per_stage = []
        self.flipped = flipped
        self.scan_paths = scan_paths
        self.scan = self._scan()

    def _scan(self):
        return StageScan.of(self.positions, self.position_map, self.config.alignment, self.config.conv,
                            self.flipped, self.scan_paths)

    def _kept(self, stage, y):
        """Indices (b, K) into the current token axis of the tokens this stage keeps."""
        cfg = self.config
        if self.keep_plan is None:
            return select_kept(y, cfg, stage, live=self.live, protected=self.protected_at)
        if cfg.mode == "mask":
            full = torch.arange(self.tokens, device=self.positions.device).expand_as(self.positions)
            return plan_indices(full, self.keep_plan[stage])
        return plan_indices(self.positions, self.keep_plan[stage])

    def after_layer(self, index, y, *streams):
        """After 0-based layer ``index``: prune if a stage is scheduled there. ``y`` (b, E, L) is
        the layer's merged SSM output; ``streams`` are the (b, L, D) token tensors to prune
        alike (ViM: hidden and residual). Returns the streams, pruned or not."""
        stage = self.config.stage_after(index)
        if stage is None:
            return streams
        cfg = self.config
        kept = self._kept(stage, y)
        if cfg.mode == "mask":
            self.live = kept
            alive = torch.zeros(self.positions.shape, dtype=torch.bool, device=kept.device).scatter(1, kept, True)
            self.kept_per_stage.append(kept)
            return tuple(t * alive[..., None].to(t.dtype) for t in streams)
        # Where the protected token sits among the kept ones (fused tokens come after them).
        cls_at = None if self.protected_at is None else (kept == self.protected_at).long().argmax(dim=1, keepdim=True)
        if cfg.pruned_tokens == "merge":
            streams, self.positions, group = merge_runs(streams, kept, self.positions)
            self.position_map = TorchPositionMap.trusted(self.positions, self.tokens)
            if self.protected_at is not None:
                self.protected_at = torch.gather(group, 1, self.protected_at)
        elif cfg.pruned_tokens == "fuse":
            # EViT: the kept tokens, then the pruned ones fused into one, at slot L + stage (after
            # the whole path; the map's path is L + stages long); nothing pruned, nothing fused.
            self.positions = torch.gather(self.positions, 1, kept)
            if kept.shape[1] < streams[0].shape[1]:
                streams = fuse_pruned(streams, kept, token_scores(y, cfg.metric))
                slot = torch.full((kept.shape[0], 1), self.tokens + stage, dtype=torch.int64, device=kept.device)
                self.positions = torch.cat([self.positions, slot], dim=1)
            else:
                streams = _gather_tokens(streams, kept)
            self.position_map = TorchPositionMap.trusted(self.positions, self.tokens + len(cfg.schedule))
            self.protected_at = cls_at
        elif cfg.recenter_cls:
            # The released code's bookkeeping: the class token to the middle of the kept tokens,
            # scanned in that order with the gaps closed ("relabel").
            order = recentre_order(kept.shape[1], cls_at)
            streams = _gather_tokens(_gather_tokens(streams, kept), order)
            self.positions = torch.gather(torch.gather(self.positions, 1, kept), 1, order)
            self.protected_at = torch.full_like(cls_at, kept.shape[1] // 2)
            b, K = self.positions.shape
            self.position_map = TorchPositionMap.trusted(torch.arange(K, device=kept.device).expand(b, K), K)
        else:
            # SPEC §3: positions compose; the map is made once per stage and handed to every scan.
            # The model's own sorted indices: a map correct by construction, made on the device.
            streams = _gather_tokens(streams, kept)
            self.position_map = TorchPositionMap.trusted(kept, self.tokens) if self.position_map is None \
                else self.position_map.compose(kept, trusted=True)
            self.positions = self.position_map.positions
            self.protected_at = cls_at
        self.kept_per_stage.append(self.positions)
        self.scan = self._scan()          # the next layers' scan, made once for the stage
        return streams
