"""Token pruning for ViM and PlainMamba (paper Sec. 4, SPEC §3-5).

A ``PruningConfig`` says how (mode), where (after which 1-based layers), how much (keep
ratio per stage), by which importance metric and count rule. The models call
``select_kept`` after each scheduled layer with the layer's merged gated SSM output y; it
scores and selects with torch ops on y's device (no host round trip: ``token_scores`` and
``top_tokens``), and ``reference.token_importance`` / ``reference.select_tokens`` are its
NumPy twins, tested equal (ties included).

Modes:
    "dense"    no pruning
    "align"    compact tokens + position map, alignment "prev" (the paper)
    "hold"     compact tokens + position map, alignment "hold" (ours: pruned steps repeat
               the previous token's input, SPEC §1)
    "self"     compact tokens + position map, alignment "self" (ablation)
    "relabel"  compact tokens, gaps closed (alignment "none"): the ViT / EViT baseline
    "mask"     tokens stay in place, pruned ones are zeroed: no compute saved. Not a clean
               "information removed, positions kept" control: a zeroed token still gets a
               conv output from its kept neighbours and a data-dependent Δ, and layers
               with biases make it non-zero again

What becomes of the pruned tokens (``pruned_tokens``, the compact modes only; SPEC §4,
``reference.pruned_tokens``): "drop" (the paper), "fuse" (EViT's fused token: their
importance-weighted average, one extra token at a slot after the path) or "merge" (each
run of consecutive pruned tokens averaged into one token at the run's last position).
``recenter_cls`` moves ViM's class token to the middle of the kept tokens after every
stage, as the released ToP-ViM code does (with "relabel" only: the class token then has no
place on the path).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignscan import reference as R
from alignscan.registry import CARDS, CONV_MODES, MODES, PRUNED_TOKENS

__all__ = ["MODES", "PRUNED_TOKENS", "COMPACT_MODES", "PruningConfig", "paper_preset", "select_kept", "token_scores", "top_tokens", "alignment_of",
           "PAPER_PRESETS", "plan_indices", "check_images", "KeepPlan"]

_ALIGNMENT = {"dense": "none", "align": "prev", "hold": "hold", "self": "self", "relabel": "none", "mask": "none"}
COMPACT_MODES = ("align", "hold", "self", "relabel")     # the modes that remove the pruned tokens


def _is_integer(x):
    """An int or a NumPy integer, not a bool (Python counts True as 1)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x):
    """A Python or NumPy real number (np.float32 included), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def alignment_of(mode):
    """The scan alignment a pruning mode runs with."""
    return _ALIGNMENT[mode]


@dataclass(frozen=True)
class PruningConfig:
    """How a model prunes tokens.

    Args:
        mode: one of MODES.
        schedule: 1-based layer indices after which tokens are pruned ("after layer 5":
            layers 1-5 see every token).
        keep_ratio: one ratio for every stage, or one per stage.
        metric: importance metric of SPEC §4 ("clip", "raw", "l1", "l2").
        count_rule: "ceil" (SPEC §4) or "vim" (the released ViM code: ceil((n-1)·r), odd).
        conv: ViM's conv1d over the compact sequence ("compact", as the paper) or with pruned
            neighbours read as zero ("position_aware", an extension).
        pruned_tokens: what becomes of the pruned tokens: "drop", "fuse" (EViT's fused
            token) or "merge" (each run averaged in its place); ViM only, compact modes only.
        recenter_cls: move the class token to the middle of the kept tokens after every
            stage (the released code's bookkeeping); ViM, mode "relabel", compact conv.
    """

    mode: str = "dense"
    schedule: tuple = ()
    keep_ratio: object = 1.0
    metric: str = "clip"
    count_rule: str = "ceil"
    conv: str = "compact"
    pruned_tokens: str = "drop"
    recenter_cls: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.metric not in R.METRICS:
            raise ValueError(f"metric must be one of {R.METRICS}, got {self.metric!r}")
        if self.count_rule not in R.importance.COUNT_RULES:
            raise ValueError(f"count_rule must be one of {R.importance.COUNT_RULES}, got {self.count_rule!r}")
        if self.conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {CONV_MODES}, got {self.conv!r}")
        if self.pruned_tokens not in PRUNED_TOKENS:
            raise ValueError(f"pruned_tokens must be one of {PRUNED_TOKENS}, got {self.pruned_tokens!r}")
        if self.pruned_tokens != "drop" and self.mode not in COMPACT_MODES:
            raise ValueError(f"pruned_tokens={self.pruned_tokens!r} needs a mode that removes the pruned tokens "
                             f"({', '.join(COMPACT_MODES)}), got mode {self.mode!r}")
        if not isinstance(self.recenter_cls, bool):
            raise TypeError(f"recenter_cls must be True or False, got {self.recenter_cls!r}")
        if self.recenter_cls and (self.mode != "relabel" or self.conv != "compact" or self.pruned_tokens != "drop"):
            raise ValueError("recenter_cls=True (the released code's class-token placement) needs mode 'relabel', "
                             "conv 'compact' and pruned_tokens 'drop': a moved class token has no place on the scan "
                             f"path for a position map, got mode {self.mode!r}, conv {self.conv!r}, "
                             f"pruned_tokens {self.pruned_tokens!r}")
        if isinstance(self.schedule, (str, bytes)) or not hasattr(self.schedule, "__iter__"):
            raise TypeError(f"schedule must be a sequence of 1-based layer indices (e.g. (5, 10, 15)), "
                            f"got {type(self.schedule).__name__} {self.schedule!r}")
        schedule = tuple(self.schedule)
        # A bool is an int to Python (True == 1): (True, 2) would silently mean layers 1 and 2.
        if any(not _is_integer(s) or s < 1 for s in schedule) or list(schedule) != sorted(set(schedule)):
            raise ValueError(f"schedule must be strictly increasing 1-based layer indices (ints, not bools), "
                             f"got {self.schedule!r}")
        object.__setattr__(self, "schedule", tuple(int(s) for s in schedule))
        per_stage = isinstance(self.keep_ratio, (tuple, list)) or (isinstance(self.keep_ratio, np.ndarray)
                                                                   and self.keep_ratio.ndim == 1)
        ratios = tuple(self.keep_ratio) if per_stage else (self.keep_ratio,) * len(schedule)
        if len(ratios) != len(schedule):
            raise ValueError(f"keep_ratio must be one number or one per stage ({len(schedule)}), got {self.keep_ratio!r}")
        for r in ratios:
            if not _is_real(r):
                raise TypeError(f"keep_ratio must be a number in (0, 1] (or one per stage), got "
                                f"{type(r).__name__} {r!r}")
            if not 0 < r <= 1:
                raise ValueError(f"keep_ratio must be in (0, 1], got {r!r}")
        object.__setattr__(self, "keep_ratio", tuple(float(r) for r in ratios) if per_stage
                           else float(self.keep_ratio))

    @property
    def active(self):
        return self.mode != "dense" and bool(self.schedule)

    @property
    def alignment(self):
        return alignment_of(self.mode)

    def ratio(self, stage):
        return self.keep_ratio[stage] if isinstance(self.keep_ratio, tuple) else self.keep_ratio

    def check_depth(self, depth):
        """ValueError naming ``schedule`` when a stage lies beyond a model of ``depth`` layers (it
        would never run: the model would be silently dense, or less pruned than asked)."""
        if self.active and self.schedule[-1] > depth:
            beyond = [s for s in self.schedule if s > depth]
            raise ValueError(f"schedule must name layers 1..{depth} of this {depth}-layer model, got {self.schedule} "
                             f"({', '.join(map(str, beyond))} beyond its depth)")
        return self

    def check_plan(self, keep_plan):
        """ValueError naming ``keep_plan`` unless it has one entry per stage."""
        if keep_plan is None:
            return
        if isinstance(keep_plan, torch.Tensor) or not hasattr(keep_plan, "__len__"):
            raise TypeError(f"keep_plan must be a list with one (batch, K) tensor per stage, "
                            f"got {type(keep_plan).__name__}")
        stages = len(self.schedule) if self.active else 0
        if len(keep_plan) != stages:
            raise ValueError(f"keep_plan must have one entry per pruning stage ({stages}: schedule "
                             f"{self.schedule if self.active else '(none)'}), got {len(keep_plan)}")

    def stage_after(self, layer_index):
        """The stage (0-based) that prunes after 0-based layer ``layer_index``, or None."""
        if not self.active:
            return None
        return self.schedule.index(layer_index + 1) if (layer_index + 1) in self.schedule else None


# SPEC §5: schedules of the released code and keep ratios that reproduce the paper's FLOPs.
# (read from the one table, alignscan.registry).
PAPER_PRESETS = {name: c.preset for name, c in CARDS.items()}


def paper_preset(name, mode="align", **overrides):
    """The PruningConfig that reproduces the paper's Table 1 for a model name."""
    if name not in PAPER_PRESETS:
        raise ValueError(f"name must be one of {sorted(PAPER_PRESETS)}, got {name!r}")
    return PruningConfig(mode=mode, **{**PAPER_PRESETS[name], **overrides})


def token_scores(y, metric):
    """Importance s_j of every token (SPEC §4) with torch ops on y's device: (batch, L) float64,
    summed over the channels in float64 as ``reference.token_importance`` (its NumPy twin)
    does, so that both rank the same tokens (the clamp and the absolute value are exact in
    y's dtype; "l2" squares in float64)."""
    y = y.detach()
    if metric == "clip":
        return y.clamp_min(0).sum(dim=1, dtype=torch.float64)
    if metric in ("raw", "official"):          # "official": y is ViM's flipped backward output (SPEC §4)
        return y.sum(dim=1, dtype=torch.float64)
    if metric == "l1":
        return y.abs().sum(dim=1, dtype=torch.float64)
    if metric == "l2":
        return y.to(torch.float64).square().sum(dim=1).sqrt()
    raise ValueError(f"metric must be one of {R.METRICS}, got {metric!r}")


def top_tokens(scores, count, protected=None):
    """Indices (batch, count) of the ``count`` highest scores, ascending in each row, with torch
    ops on the scores' device (``reference.select_tokens``'s twin). Protected indices (batch, P)
    rank first; ties go to the lower index (a stable descending sort keeps equal scores in
    index order, as the reference's stable argsort of -s does). A NaN score ranks highest
    (torch's sort order); the reference refuses non-finite scores."""
    ranked = scores
    if protected is not None and protected.shape[1]:
        ranked = scores.scatter(1, protected, float("inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :count]
    return torch.sort(order, dim=1).values


def select_kept(y, config, stage, live=None, protected=None):
    """Indices (batch, K) into the current token axis of the tokens to keep, ascending, chosen
    on y's device with no host round trip.

    Args:
        y: (batch, dim, L) merged gated SSM output of the pruning layer (detached here).
        live: (batch, n) ascending indices of the tokens still alive ("mask" mode keeps
            pruned ones in place, zeroed); None means all.
        protected: (batch, P) indices (into the L tokens) that are always kept (ViM's class
            token); in "mask" mode they must be live.
    """
    scores = token_scores(y, config.metric)
    ratio = config.ratio(stage)
    n_protected = 0 if protected is None else protected.shape[1]
    if live is None:
        count = R.keep_count(scores.shape[1], ratio, n_protected=n_protected, rule=config.count_rule)
        return top_tokens(scores, count, protected)
    # "mask": choose among the live tokens only (the same number in every row).
    sub_scores = torch.gather(scores, 1, live)
    sub_protected = None if protected is None else torch.searchsorted(live.contiguous(), protected)
    count = R.keep_count(live.shape[1], ratio, n_protected=n_protected, rule=config.count_rule)
    return torch.gather(live, 1, top_tokens(sub_scores, count, sub_protected))


class KeepPlan:
    """A keep plan checked once, on the host, before it is used: one (batch, K_s) tensor per
    stage of the original indices to keep, integer, strictly increasing in each row, nested
    (each stage keeps a subset of the previous stage's tokens) and, with ``tokens``, below it.

    A forward given a ``KeepPlan`` reads nothing on the host (on a GPU: no synchronisation);
    one given a plain list makes it into a ``KeepPlan`` first, which reads it there once.
    ``in_every_row[s]`` is the set of indices stage s keeps in every row (ViM checks that its
    class token is among them).
    """

    def __init__(self, stages, tokens=None):
        if isinstance(stages, (torch.Tensor, np.ndarray)) or not hasattr(stages, "__len__"):
            raise TypeError(f"keep_plan must be a list with one (batch, K) tensor per stage, "
                            f"got {type(stages).__name__}")
        self.stages, self.in_every_row = [], []
        previous = None
        for s, planned in enumerate(stages):
            t = planned if isinstance(planned, torch.Tensor) else torch.as_tensor(np.asarray(planned))
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"keep_plan[{s}] must hold integer token indices, got {t.dtype}")
            host = t.detach().cpu().numpy().astype(np.int64)
            if host.ndim != 2 or (previous is not None and host.shape[0] != previous.shape[0]):
                raise ValueError(f"keep_plan[{s}] must have shape (batch{'' if previous is None else '=' + str(previous.shape[0])}"
                                 f", K), got {tuple(host.shape)}")
            if host.shape[1] > 1 and np.any(np.diff(host, axis=1) <= 0):
                raise ValueError(f"keep_plan[{s}] must be strictly increasing in each row (ascending original indices)")
            if host.size and (host.min() < 0 or (tokens is not None and host.max() >= tokens)):
                raise ValueError(f"keep_plan[{s}] must hold indices in [0, {tokens if tokens is not None else 'L'}), "
                                 f"got [{host.min()}, {host.max()}]")
            if previous is not None and not all(np.isin(row, prev).all() for row, prev in zip(host, previous)):
                raise ValueError(f"keep_plan[{s}] must keep a subset of the tokens still there at that stage "
                                 f"(plans are nested, ascending, original indices)")
            self.stages.append(t.to(torch.int64))
            self.in_every_row.append(set.intersection(*(set(row.tolist()) for row in host)) if len(host) else set())
            previous = host

    def __len__(self):
        return len(self.stages)

    def __getitem__(self, stage):
        return self.stages[stage]


def plan_indices(current, planned):
    """Indices (batch, K) into the current token axis, ascending, of the tokens a checked keep
    plan keeps.

    Args:
        current: (batch, L) positions of the current tokens (original indices): ascending,
            except for a re-centred class token (``recenter_cls``).
        planned: (batch, K) ascending positions the plan keeps at this stage: a subset of
            ``current`` (a ``KeepPlan`` is nested, so it is).
    """
    planned = planned.to(current.device).contiguous()
    order = torch.sort(current, dim=1, stable=True).indices
    found = torch.searchsorted(torch.gather(current, 1, order).contiguous(), planned).clamp(max=current.shape[1] - 1)
    return torch.sort(torch.gather(order, 1, found), dim=1).values


def check_images(images, size, channels):
    """ValueError naming ``images`` unless they are (batch, channels, size, size): a model made
    for one input size would otherwise drop the extra pixels silently (225 into 224) or fail
    deep inside (240)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (batch, {channels}, {size}, {size}), "
                        f"got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(f"images must have shape (batch, {channels}, {size}, {size}) for this model "
                         f"(img_size={size}), got {tuple(images.shape)}")
