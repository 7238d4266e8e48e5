"""The fine-tuning recipes, built from timm's parts: Mixup/CutMix with label smoothing,
``ModelEmaV3``, and the optimizer and scheduler factories (``create_optimizer_v2``,
``create_scheduler_v2``), as Vim's DeiT-based training script uses them.

Two presets, one per family, every entry overridable on the command line (``--<key>``,
dashes for underscores) and written to the run record:

- ``vim``: the released fine-tuning logs of the paper's code (ZLKong/ToP-ViM, an earlier
  commit, ``vim/ft_log/mamba_small_progressive_start_5_gap_10_ratio_0.8_new.txt``, its
  printed arguments): AdamW (eps 1e-8), weight decay 1e-8, 30 epochs, batch 64 per GPU on 8
  GPUs, a cosine schedule stepped once per epoch with 5 warm-up epochs from 1e-5, base lr
  5e-6 and min lr 1e-5 (so the rate runs between 5e-6 and 1e-5), model EMA 0.99996, mixup
  0.8 / cutmix 1.0 (prob 1, switch 0.5, per batch), label smoothing 0.1, RandAugment
  rand-m9-mstd0.5-inc1, colour jitter 0.3, random erasing 0.25 (pixel), bicubic, drop-path
  0, no AMP. Left out: DeiT's repeated augmentation (its own sampler, not timm's).
- ``plainmamba``: the paper (Sec. 5.1) gives warm-up 5 epochs from 2e-8 to 2e-5, cosine to
  2e-7, weight decay 1e-8; everything it does not give is the ``vim`` recipe's.
"""
from __future__ import annotations

import argparse

from alignscan import vision

__all__ = ["RECIPES", "SCHEDULES", "resolve", "check", "add_recipe_arguments", "Recipe"]

_VIM = dict(epochs=30, opt="adamw", opt_eps=1e-8, lr=5e-6, warmup_lr=1e-5, min_lr=1e-5, warmup_epochs=5,
            sched="cosine", weight_decay=1e-8, clip_grad=None, model_ema=True, model_ema_decay=0.99996,
            mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", smoothing=0.1,
            aa="rand-m9-mstd0.5-inc1", color_jitter=0.3, reprob=0.25, remode="pixel", recount=1,
            train_interpolation="bicubic", drop_path=0.0, amp=False)
RECIPES = {
    "vim": dict(_VIM, source="ZLKong/ToP-ViM vim/ft_log (released fine-tuning logs, printed arguments)"),
    "plainmamba": dict(_VIM, lr=2e-5, warmup_lr=2e-8, min_lr=2e-7, warmup_epochs=5, weight_decay=1e-8,
                       source="the paper, Sec. 5.1 (lr, warm-up, schedule, weight decay); the rest as 'vim'"),
}
# timm's schedulers, and "constant" (timm's step scheduler with decay rate 1: the warm-up, then lr).
SCHEDULES = ("cosine", "tanh", "step", "poly", "constant")
_HELP = {
    "opt": "optimizer (timm's create_optimizer_v2 name)", "opt_eps": "optimizer epsilon",
    "lr": "base learning rate", "warmup_lr": "learning rate at the start of the warm-up", "min_lr": "final lr",
    "warmup_epochs": "warm-up epochs", "sched": f"lr schedule, stepped once per epoch: {', '.join(SCHEDULES)}",
    "weight_decay": "weight decay", "clip_grad": "clip the gradient norm to this (default none)",
    "model_ema": "keep an EMA of the weights (timm's ModelEmaV3)", "model_ema_decay": "EMA decay",
    "mixup": "mixup alpha (0: off)", "cutmix": "cutmix alpha (0: off)", "mixup_prob": "probability of mixing a batch",
    "mixup_switch_prob": "probability of cutmix instead of mixup", "mixup_mode": "batch, pair or elem",
    "smoothing": "label smoothing", "aa": "timm auto-augment policy ('' for none)", "color_jitter": "colour jitter",
    "reprob": "random-erasing probability", "remode": "random-erasing mode", "recount": "random-erasing count",
    "train_interpolation": "interpolation of the random resized crop", "drop_path": "drop-path (stochastic depth) rate",
    "amp": "bfloat16 autocast on GPUs",
}


def add_recipe_arguments(p):
    """``--recipe`` and one ``--<key>`` per recipe entry (default: the recipe's)."""
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="fine-tuning recipe (default: the model family's; see alignscan.imagenet.recipe)")
    for key, value in _VIM.items():
        if key == "epochs":
            continue            # --epochs is its own option (the recipe's 30 is its default)
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP[key])
        elif key == "sched":
            p.add_argument(flag, choices=SCHEDULES, default=None, help=_HELP[key])
        elif key == "mixup_mode":
            p.add_argument(flag, choices=("batch", "pair", "elem"), default=None, help=_HELP[key])
        else:
            kind = float if isinstance(value, float) or value is None else type(value)
            p.add_argument(flag, type=kind, default=None, help=_HELP[key])


def resolve(family, args):
    """The recipe for ``family`` (or ``--recipe``) with the command line's explicit values."""
    name = getattr(args, "recipe", None) or family
    recipe = dict(RECIPES[name], name=name)
    for key in _VIM:
        value = getattr(args, key, None)
        if value is not None:
            recipe[key] = value
    return recipe


def check(recipe, batch):
    """ValueError naming the option, before any work."""
    for key in ("lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "opt_eps", "smoothing", "mixup",
                "cutmix", "reprob", "drop_path", "color_jitter"):
        if recipe[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {recipe[key]}")
    for key in ("mixup_prob", "mixup_switch_prob", "reprob", "drop_path"):
        if recipe[key] > 1:
            raise ValueError(f"--{key.replace('_', '-')} must be <= 1, got {recipe[key]}")
    if not 0 < recipe["model_ema_decay"] < 1:
        raise ValueError(f"--model-ema-decay must be in (0, 1), got {recipe['model_ema_decay']}")
    if recipe["clip_grad"] is not None and recipe["clip_grad"] <= 0:
        raise ValueError(f"--clip-grad must be > 0, got {recipe['clip_grad']}")
    if _mixing(recipe) and batch % 2:
        raise ValueError(f"--batch must be even under mixup/cutmix (timm mixes pairs of images), got {batch}")


def _mixing(recipe):
    return recipe["mixup_prob"] > 0 and (recipe["mixup"] > 0 or recipe["cutmix"] > 0)


class Recipe:
    """The recipe's training parts for one model: optimizer, per-epoch lr scheduler, EMA,
    batch mixing and the loss."""

    def __init__(self, recipe, model, num_classes, epochs):
        import torch
        vision.timm()
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3
        self.recipe = recipe
        self.optimizer = create_optimizer_v2(model, opt=recipe["opt"], lr=recipe["lr"],
                                                        weight_decay=recipe["weight_decay"], eps=recipe["opt_eps"])
        constant = recipe["sched"] == "constant"
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="step" if constant else recipe["sched"], num_epochs=epochs,
            decay_epochs=epochs if constant else None, decay_rate=1.0 if constant else 0.1,
            min_lr=recipe["min_lr"], warmup_lr=recipe["warmup_lr"], warmup_epochs=recipe["warmup_epochs"],
            step_on_epochs=True)
        self.ema = ModelEmaV3(model, decay=recipe["model_ema_decay"]) if recipe["model_ema"] else None
        self.mixup = Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"],
                                     prob=recipe["mixup_prob"], switch_prob=recipe["mixup_switch_prob"],
                                     mode=recipe["mixup_mode"], label_smoothing=recipe["smoothing"],
                                     num_classes=num_classes) if _mixing(recipe) else None
        if self.mixup is not None:
            self.loss = SoftTargetCrossEntropy()        # the mixed targets carry the smoothing
        elif recipe["smoothing"] > 0:
            self.loss = LabelSmoothingCrossEntropy(smoothing=recipe["smoothing"])
        else:
            self.loss = torch.nn.CrossEntropyLoss()

    def start_epoch(self, epoch):
        """Set the epoch's learning rate (the schedule is stepped once per epoch, as DeiT does)."""
        self.scheduler.step(epoch)
        return self.optimizer.param_groups[0]["lr"]

    def mix(self, images, labels):
        """(images, targets) mixed as the recipe says; an odd batch (at most an epoch's last)
        loses its last image, because timm mixes pairs. None when nothing is left."""
        if self.mixup is None:
            return images, labels
        if len(images) % 2:
            images, labels = images[:-1], labels[:-1]
        if len(images) == 0:
            return None
        return self.mixup(images, labels)

    def clip(self, model):
        import torch
        if self.recipe["clip_grad"] is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.recipe["clip_grad"])

    def state_dict(self):
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, blob):
        """The optimizer, scheduler and EMA of a finetune checkpoint; returns what it lacked."""
        self.optimizer.load_state_dict(blob["optimizer"])
        missing = []
        if "scheduler" in blob:
            self.scheduler.load_state_dict(blob["scheduler"])
        else:
            missing.append("scheduler")
        if self.ema is not None:
            if "model_ema" in blob:
                self.ema.module.load_state_dict(blob["model_ema"])
            else:
                missing.append("model_ema")
        return missing
