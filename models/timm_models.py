"""The five models in timm's registry, built by timm's ``build_model_with_cfg``, so that
``timm.create_model`` builds them, loads their released weights, and timm's own scripts
(``validate.py``, ``benchmark.py``, ``train.py``) run them, as Vim's models are used.

    import alignscan.models.timm_models          # registers the names below
    timm.create_model("vim_small", pretrained=True)                  # the released weights, from the Hub
    timm.create_model("vim_small_paper")                             # the paper's preset (align)
    timm.create_model("vim_small", pruning="relabel", backend="numba-cpu")
    timm.create_model("plainmamba_l1_paper", pretrained=True,        # a local copy, no network
                      pretrained_cfg_overlay=dict(file="l1.pth"))
    timm.create_model("vim_tiny", pretrained=True, num_classes=10, img_size=256)   # new head, resampled pos_embed

    # timm's scripts, with the names registered first:
    python -m alignscan.models.timm_models path/to/timm/validate.py --model vim_small_paper ...

Names: ``vim_tiny``, ``vim_small``, ``plainmamba_l1``, ``plainmamba_l2``, ``plainmamba_l3``
(dense unless ``pruning=`` says otherwise) and each with ``_paper`` (the paper's schedule
and keep ratio, mode align; ``pruning=`` a mode name changes the mode, a PruningConfig
replaces the preset). Every other keyword goes to ``models.create`` (``backend=``,
``img_size=``, ``num_classes=``, ``drop_path_rate=``); timm's ``in_chans`` is the models'
``channels``; ``global_pool`` is the family's own ("token": ViM's class token, "avg":
PlainMamba's mean) or None; ``drop_rate`` must be 0 (no dropout before the head).

Pretrained weights: each name's pretrained config holds the released checkpoint's Hugging
Face Hub id and file (``RELEASES``). ``pretrained=True`` fetches it with timm's own loader
(``hf_hub_download``, cached) and hands the file to the model's ``load_pretrained`` (timm's
``custom_load`` hook), which reads either official layout with ``models.load_checkpoint``:
the plain weights (``model`` / ``state_dict``, the ones the released accuracies were
measured with; timm's generic loader would prefer a ``model_ema``), the head freshly
initialised when ``num_classes`` is not 1000 (one notice in the log, as timm's), the
position embedding resampled when ``img_size`` is not 224 (ViM's class token kept in the
middle). Offline, ``pretrained_cfg_overlay=dict(file=PATH)`` reads a local copy the same
way. ``checkpoint_filter_fn`` (the same adaptation) is timm's ``pretrained_filter_fn``, for a
state dict handed over directly (``pretrained_cfg_overlay=dict(state_dict=...)``).

Each model's pretrained config is the released checkpoints' evaluation setting (224 px,
bicubic, crop 0.875, ImageNet mean and std: ``alignscan.vision.eval_transform``), so
``timm.data.resolve_data_config`` gives their transform.
"""
from __future__ import annotations

import runpy
import sys
from functools import partial

from alignscan import registry, vision

from . import _CLASSES, create
from .checkpoints import checkpoint_filter_fn
from .layers import check_global_pool
from .pruning import PruningConfig, paper_preset

__all__ = ["TIMM_NAMES", "RELEASES", "timm_name", "checkpoint_filter_fn"]

vision.timm()
from timm.models import build_model_with_cfg, register_model  # noqa: E402
from timm.models._registry import generate_default_cfgs  # noqa: E402

TIMM_NAMES = tuple(n for name in registry.NAMES for n in (name, f"{name}_paper"))

# The released checkpoints: (Hugging Face Hub repository, file), in their official layouts.
RELEASES = {
    "vim_tiny": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "plainmamba_l1": ("ChenhongyiYang/PlainMamba", "l1.pth"),
    "plainmamba_l2": ("ChenhongyiYang/PlainMamba", "l2.pth"),
    "plainmamba_l3": ("ChenhongyiYang/PlainMamba", "l3.pth"),
}
assert set(RELEASES) == set(registry.NAMES), "every model name has its release"
assert all(registry.card(n).checkpoint in (None, f) for n, (_, f) in RELEASES.items()), "the cards name the same files"
_ORIGINS = {"vim": "https://github.com/hustvl/Vim", "plainmamba": "https://github.com/ChenhongyiYang/PlainMamba"}


def timm_name(name, preset=False):
    """The timm name of a model (``preset``: its paper preset)."""
    registry.card(name)
    return f"{name}_paper" if preset else name


def _cfg(name):
    card = registry.card(name)
    cls = _CLASSES[card.family]
    hub, file = RELEASES[name]
    # custom_load="hf": timm downloads the file and calls model.load_pretrained on it (the official layouts).
    return dict(hf_hub_id=hub, hf_hub_filename=file, custom_load="hf", num_classes=1000, input_size=(3, 224, 224),
                pool_size=None, crop_pct=vision.CROP_RATIO, interpolation="bicubic", fixed_input_size=True,
                mean=vision.MEAN, std=vision.STD, first_conv=cls.first_conv, classifier=cls.classifier_name,
                license="see the model's own release", origin_url=_ORIGINS[card.family],
                notes=(f"released checkpoint: {hub}/{file} ({card.checkpoint_layout!r} layout)",))


default_cfgs = generate_default_cfgs({n: _cfg(n.removesuffix("_paper")) for n in TIMM_NAMES})


def _pruning(name, preset, pruning):
    if isinstance(pruning, PruningConfig) or (pruning is None and not preset):
        return pruning
    if pruning is None or isinstance(pruning, str):
        return paper_preset(name, mode=pruning or "align")
    raise TypeError(f"pruning must be None, a mode name or a PruningConfig, got {type(pruning).__name__}")


def _square(img_size, name):
    """timm's img_size (an int, or (h, w) from the pretrained config) as the models' int side."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"img_size must be square for {name} (one side, or (side, side)), got {img_size!r}")
        img_size = img_size[0]
    return img_size


def _model(name, pruning, in_chans=3, img_size=224, drop_rate=0.0, global_pool=None, num_classes=None, **kwargs):
    """``models.create`` with timm's keywords (``build_model_with_cfg``'s ``model_cls``)."""
    if drop_rate:
        raise ValueError(f"drop_rate must be 0 for {name}: the official models have no dropout before the head")
    check_global_pool(global_pool, _CLASSES[registry.family(name)].global_pool, name)
    if num_classes is not None:                     # timm's scripts pass None for "the model's default"
        kwargs["num_classes"] = num_classes
    return create(name, pruning=pruning, channels=in_chans, img_size=_square(img_size, name), **kwargs)


def _build(name, preset, pretrained=False, pruning=None, **kwargs):
    variant = timm_name(name, preset)
    if kwargs.get("features_only"):
        raise ValueError(f"features_only is not supported for {variant}: use forward_features (the pooled feature)")
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if overlay.get("file"):
        # A local copy is read by the model's load_pretrained, as a downloaded one (timm resets custom_load
        # whenever the overlay names a source).
        overlay.setdefault("custom_load", True)
    hub = pretrained and not any(overlay.get(k) for k in ("file", "url", "state_dict"))
    try:
        return build_model_with_cfg(partial(_model, name, _pruning(name, preset, pruning)), variant, pretrained,
                                    pretrained_cfg_overlay=overlay, pretrained_filter_fn=checkpoint_filter_fn,
                                    **kwargs)
    except OSError as exc:
        if not hub:
            raise
        repo, file = RELEASES[name]
        raise OSError(f"pretrained=True for {variant} fetches {file} from the Hugging Face Hub ({repo}), which "
                      f"failed: {exc}. Offline, pass a local copy: pretrained_cfg_overlay=dict(file=PATH)") from exc


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
