"""The pruning stages of one forward pass, in one place for both models.

A ``Stages`` object carries what pruning has done so far — the positions of the current
tokens on the unpruned path, their ``TorchPositionMap``, the live mask of the "mask" mode,
where the protected tokens (ViM's class token) now sit, the kept positions of each stage —
and after each scheduled layer chooses the kept tokens (by importance, or from a keep plan),
then zeroes (mode "mask") or gathers the token streams and composes the map (SPEC §3).
ViM and PlainMamba keep only what differs: the class token, the scan paths.

A ``Recorder`` collects what a forward did, for experiments and tests: per layer the
residual stream (``trace``) and the merged SSM output the importance is computed from
(``mixer_outputs``), and every scan's arguments, map and output (``scans``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignscan.bridges import TorchPositionMap

from .pruning import KeepPlan, plan_indices, select_kept

__all__ = ["Stages", "Recorder"]


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
    """

    def __init__(self, config, batch, tokens, device, keep_plan=None, protected=None):
        config.check_plan(keep_plan)
        if keep_plan is not None and not isinstance(keep_plan, KeepPlan):
            keep_plan = KeepPlan(keep_plan, tokens)          # a plain list: checked here, on the host
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

    @property
    def alignment(self):
        """The alignment of the next layer's scans: none until a stage has pruned."""
        return self.config.alignment if self.position_map is not None else "none"

    @property
    def pruned(self):
        return self.position_map is not None

    def _kept(self, stage, y):
        """Indices (b, K) into the current token axis of the tokens this stage keeps."""
        cfg = self.config
        if self.keep_plan is None:
            return select_kept(y, cfg, stage, live=self.live, protected=self.protected_at)
        if cfg.mode == "mask":
            full = torch.arange(self.tokens, device=self.positions.device).expand_as(self.positions)
            return plan_indices(full, self.keep_plan[stage])
        if self.protected is not None and self.protected not in self.keep_plan.in_every_row[stage]:
            raise ValueError(f"keep_plan[{stage}] must keep the class token (index {self.protected})")
        return plan_indices(self.positions, self.keep_plan[stage])

    def after_layer(self, index, y, *streams):
        """After 0-based layer ``index``: prune if a stage is scheduled there. ``y`` (b, E, L) is
        the layer's merged SSM output; ``streams`` are the (b, L, D) token tensors to prune
        alike (ViM: hidden and residual). Returns the streams, pruned or not."""
        stage = self.config.stage_after(index)
        if stage is None:
            return streams
        kept = self._kept(stage, y)
        if self.config.mode == "mask":
            self.live = kept
            alive = torch.zeros(self.positions.shape, dtype=torch.bool, device=kept.device).scatter(1, kept, True)
            self.kept_per_stage.append(kept)
            return tuple(t * alive[..., None].to(t.dtype) for t in streams)
        streams = tuple(torch.gather(t, 1, kept[..., None].expand(-1, -1, t.shape[-1])) for t in streams)
        # SPEC §3: positions compose; the map is made once per stage and handed to every scan.
        # The model's own sorted indices: a map correct by construction, made on the device.
        self.position_map = TorchPositionMap.trusted(kept, self.tokens) if self.position_map is None \
            else self.position_map.compose(kept)
        self.positions = self.position_map.positions
        if self.protected_at is not None:
            self.protected_at = (kept == self.protected_at).long().argmax(dim=1, keepdim=True)
        self.kept_per_stage.append(self.positions)
        return streams
