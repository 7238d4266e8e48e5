"""The five models in timm's registry, so that ``timm.create_model`` builds them and timm's
own scripts (``validate.py``, ``benchmark.py``, ``train.py``) run them, as Vim's models are
used.

    import alignscan.models.timm_models          # registers the names below
    timm.create_model("vim_small")                                   # dense
    timm.create_model("vim_small_paper")                             # the paper's preset (align)
    timm.create_model("vim_small", pruning="relabel", backend="numba-cpu")
    timm.create_model("plainmamba_l1_paper", pretrained=True,
                      pretrained_cfg_overlay=dict(file="plainmamba_l1.pth"))

    # timm's scripts, with the names registered first:
    python -m alignscan.models.timm_models path/to/timm/validate.py --model vim_small_paper ...

Names: ``vim_tiny``, ``vim_small``, ``plainmamba_l1``, ``plainmamba_l2``, ``plainmamba_l3``
(dense unless ``pruning=`` says otherwise) and each with ``_paper`` (the paper's schedule
and keep ratio, mode align; ``pruning=`` a mode name changes the mode, a PruningConfig
replaces the preset). Every other keyword goes to ``models.create`` (``backend=``,
``img_size=``, ``num_classes=``, ``drop_path_rate=``); timm's ``in_chans`` is the models'
``channels``. ``pretrained=True`` reads a local file (``pretrained_cfg_overlay=dict(file=
...)``) in either official layout with ``models.load_checkpoint``: nothing is downloaded;
the released checkpoints' addresses are in ``alignscan.registry``.

Each model's pretrained config is the released checkpoints' evaluation setting (224 px,
bicubic, crop 0.875, ImageNet mean and std), so ``timm.data.resolve_data_config`` gives
their transform.
"""
from __future__ import annotations

import runpy
import sys

from alignscan import registry, vision

from . import create
from .pruning import PruningConfig, paper_preset

__all__ = ["TIMM_NAMES", "timm_name"]

vision.timm()
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models._registry import generate_default_cfgs  # noqa: E402

TIMM_NAMES = tuple(n for name in registry.NAMES for n in (name, f"{name}_paper"))


def timm_name(name, preset=False):
    """The timm name of a model (``preset``: its paper preset)."""
    registry.card(name)
    return f"{name}_paper" if preset else name


def _cfg(name):
    card = registry.card(name)
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="patch_embed.proj" if card.family == "vim" else "backbone.patch_embed.stem.0",
                classifier="head" if card.family == "vim" else "head.fc", license="see the model's own release",
                notes=(f"released checkpoint: {card.checkpoint}",))


default_cfgs = generate_default_cfgs({n: _cfg(n.removesuffix("_paper")) for n in TIMM_NAMES})


def _pruning(name, preset, pruning):
    if isinstance(pruning, PruningConfig) or (pruning is None and not preset):
        return pruning
    if pruning is None or isinstance(pruning, str):
        return paper_preset(name, mode=pruning or "align")
    raise TypeError(f"pruning must be None, a mode name or a PruningConfig, got {type(pruning).__name__}")


def _build(name, preset, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
           in_chans=3, pruning=None, drop_rate=0.0, global_pool=None, **kwargs):
    from alignscan import models
    if kwargs.get("num_classes", 0) is None:        # timm's scripts pass None for "the model's default"
        del kwargs["num_classes"]
    if drop_rate:
        raise ValueError(f"drop_rate must be 0 for {name}: the official models have no dropout before the head")
    if global_pool not in (None, ""):
        raise ValueError(f"global_pool is fixed for {name} (ViM: the class token; PlainMamba: the mean)")
    model = create(name, pruning=_pruning(name, preset, pruning), channels=in_chans, **kwargs)
    cfg = default_cfgs[timm_name(name, preset)].default.to_dict()
    cfg.update(pretrained_cfg_overlay or {})
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        if not cfg.get("file"):
            raise ValueError(f"pretrained=True for {timm_name(name, preset)} reads a local checkpoint: pass "
                             f"pretrained_cfg_overlay=dict(file=PATH) (nothing is downloaded here; the released "
                             f"one: {registry.card(name).checkpoint})")
        models.load_checkpoint(model, cfg["file"])
    return model


def _entrypoint(name, preset):
    def entry(pretrained=False, **kwargs):
        return _build(name, preset, pretrained=pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = timm_name(name, preset)
    entry.__module__ = __name__
    entry.__doc__ = (f"{registry.card(name).family} {name}" + (" with the paper's pruning preset" if preset else "")
                     + " (alignscan; see the module docstring)")
    return entry


for _name in registry.NAMES:
    for _preset in (False, True):
        globals()[timm_name(_name, _preset)] = register_model(_entrypoint(_name, _preset))


def main(argv=None):
    """Run a timm script (validate.py, benchmark.py, train.py) with these names registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m alignscan.models.timm_models SCRIPT.py [its arguments]\n"
              f"runs a timm script with these models registered: {', '.join(TIMM_NAMES)}")
        return 0
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
