"""alignscan.models — ViM and PlainMamba with token pruning, checkpoint-compatible.

    from alignscan import models
    m = models.create("vim_small", pruning=models.paper_preset("vim_small"))
    models.load_checkpoint(m, "vim_s_midclstok_80p5acc.pth")
    logits, kept = m(images, return_kept=True)
    models.flops("vim_small", models.paper_preset("vim_small"))      # 3.612 GFLOPs

Every scan runs through ``bridges.selective_scan_fn`` with the remaining tokens' position
map; the pruning modes, schedules and presets are in ``models.pruning``. Both classes have
timm's model API (``forward_features``, ``forward_head``, ``reset_classifier``,
``no_weight_decay``, ``set_grad_checkpointing``, ...); ``models.timm_models`` registers the
names with timm, released weights included. ``load_checkpoint(m, path, ema=...)`` reads the
plain weights (default), the ``model_ema`` beside them (True) or whichever is there ("auto").
"""
from alignscan import registry

from .checkpoints import load_checkpoint
from .flops import PAPER_GFLOPS, flops
from .plainmamba import PlainMamba, plainmamba_l1, plainmamba_l2, plainmamba_l3
from .pruning import MODES, PruningConfig, paper_preset
from .stages import Recorder, Stages, StageScan
from .vim import VisionMamba, vim_small, vim_tiny

__all__ = ["create", "NAMES", "vim_tiny", "vim_small", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3",
           "VisionMamba", "PlainMamba", "PruningConfig", "paper_preset", "MODES", "flops", "PAPER_GFLOPS",
           "load_checkpoint", "Recorder", "Stages", "StageScan"]

NAMES = registry.NAMES
# The class of each family of registry cards: the one place a name becomes a model.
_CLASSES = {"vim": VisionMamba, "plainmamba": PlainMamba}
assert set(_CLASSES) == set(registry.FAMILIES), "every registry family has a class"


def create(name, **kwargs):
    """The model called ``name`` (``NAMES``): its family's class (``VisionMamba`` or
    ``PlainMamba``) built with the registry card's ``config`` (width, depth, stem) and then
    ``kwargs`` (pruning=, num_classes=, img_size=, backend=, drop_path_rate=, ...; a kwarg
    overrides the card), ``arch_name`` set to ``name``. ``vim_tiny(...)`` and the other
    per-model functions, and timm's entry points, are this call.

    Raises:
        ValueError: an unknown ``name`` (naming the argument and the known names).
    """
    card = registry.card(name)
    model = _CLASSES[card.family](**{**card.config, **kwargs})
    model.arch_name = name
    return model
