"""alignscan.models — ViM and PlainMamba with token pruning, checkpoint-compatible.

    from alignscan import models
    m = models.create("vim_small", pruning=models.paper_preset("vim_small"))
    models.load_checkpoint(m, "vim_s_midclstok_80p5acc.pth")
    logits, kept = m(images, return_kept=True)
    models.flops("vim_small", models.paper_preset("vim_small"))      # 3.612 GFLOPs

Every scan runs through ``bridges.selective_scan_fn`` with the remaining tokens' position
map; the pruning modes, schedules and presets are in ``models.pruning``.
"""
from alignscan import registry

from .checkpoints import load_checkpoint
from .flops import PAPER_GFLOPS, flops
from .plainmamba import PlainMamba, plainmamba_l1, plainmamba_l2, plainmamba_l3
from .pruning import MODES, PruningConfig, paper_preset
from .stages import Recorder, Stages
from .vim import VisionMamba, vim_small, vim_tiny

__all__ = ["create", "NAMES", "vim_tiny", "vim_small", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3",
           "VisionMamba", "PlainMamba", "PruningConfig", "paper_preset", "MODES", "flops", "PAPER_GFLOPS",
           "load_checkpoint", "Recorder", "Stages"]

_BUILDERS = {"vim_tiny": vim_tiny, "vim_small": vim_small, "plainmamba_l1": plainmamba_l1,
             "plainmamba_l2": plainmamba_l2, "plainmamba_l3": plainmamba_l3}
NAMES = registry.NAMES
assert set(_BUILDERS) == set(NAMES), "every registry row has a builder"


def create(name, **kwargs):
    """Build a model by name (``NAMES``); kwargs go to its builder (pruning=, num_classes=, ...)."""
    registry.card(name)          # ValueError naming ``name`` and the known names
    model = _BUILDERS[name](**kwargs)
    model.arch_name = name
    return model
