"""The options of ``evaluate`` and ``finetune``, their checks (a ValueError naming the option,
before any work), and the model and weights they name."""
from __future__ import annotations

from pathlib import Path

from alignscan.reference.importance import METRICS
from alignscan.registry import CONV_MODES
from alignscan.registry import NAMES as MODEL_NAMES

__all__ = ["add_evaluate_arguments", "add_finetune_arguments", "check_arguments", "build", "load_weights",
           "DataError"]


class DataError(ValueError):
    """A problem with the user's data, checkpoint or output folder (not a bug): the command
    line prints it in one line and exits 2."""

MODES_DEFAULT = "dense,align,relabel"

EVALUATE_HELP = "top-1/top-5 of a checkpoint on an ImageNet-style folder, per pruning mode (torchrun-ready)"
EVALUATE_DOC = ("Evaluates a released (or fine-tuned) checkpoint on an ImageNet-style folder for several pruning modes "
                "on exactly the same images: top-1, top-5, images/s, and paired counts with an exact McNemar p-value "
                "against dense and against relabel. Runs under torchrun (NCCL on GPUs, Gloo on CPUs).")
FINETUNE_HELP = "fine-tune a pruned model from a checkpoint on an ImageNet-style train folder (torchrun-ready)"
FINETUNE_DOC = ("Fine-tunes a pruned model (any mode) from a checkpoint with the paper's recipe, built from timm's parts: "
                "the released ViM fine-tuning logs' settings (AdamW, cosine with 5 warm-up epochs, weight decay 1e-8, "
                "mixup 0.8 / cutmix 1.0, label smoothing 0.1, RandAugment, random erasing, model EMA 0.99996) or "
                "PlainMamba's from the paper (warm-up from 2e-8 to 2e-5, cosine to 2e-7); every entry overridable "
                "(--recipe, --lr, --mixup, ...) and written to the run record. torchvision's ImageFolder, a checkpoint "
                "every epoch in the official layout (with the EMA, optimizer and scheduler), --resume, and a JSON-lines "
                "log. Runs under torchrun with DistributedDataParallel.")


def build(name, num_classes, mode, keep, conv, metric, backend, img_size=224, drop_path=0.0):
    """The model with the paper's schedule for ``name`` and ``mode`` (``keep``: None for the
    paper's keep ratio, else one ratio per stage; ``drop_path``: the stochastic-depth rate)."""
    from alignscan import models
    if mode == "dense":
        pruning = None
    else:
        overrides = dict(conv=conv, metric=metric)
        if keep is not None:
            overrides["keep_ratio"] = keep
        pruning = models.paper_preset(name, mode=mode, **overrides)
    return models.create(name, pruning=pruning, num_classes=num_classes, backend=backend, img_size=img_size,
                         drop_path_rate=drop_path)


# --ema's choices: which weights of a checkpoint evaluate reads (models.load_checkpoint's ema=).
EMA = {"no": False, "yes": True, "auto": "auto"}


def load_weights(model, path, num_classes, ema=False):
    """models.load_checkpoint (``ema``: which weights, as there), with a message naming what
    differs when it does not fit. The entry read is in ``model.checkpoint_weights``."""
    from alignscan import models
    from alignscan.models.checkpoints import describe_mismatch, read_checkpoint
    try:
        return models.load_checkpoint(model, path, ema=ema)
    except ValueError as exc:
        try:
            state = read_checkpoint(path, ema=ema)
        except ValueError:
            raise DataError(str(exc)) from None
        why = describe_mismatch(model, state, num_classes) if isinstance(state, dict) else ""
        raise DataError(f"{exc}" + (f" -- in short: {why}" if why else "")) from None


def _add_shared_arguments(p):
    """The pruning and data options evaluate and finetune both take."""
    p.add_argument("--keep", type=float, default=None, help="keep ratio per stage instead of the paper's")
    p.add_argument("--conv", choices=CONV_MODES, default="compact", help="ViM's conv1d when pruned")
    p.add_argument("--metric", choices=METRICS, default="clip", help="importance metric")
    p.add_argument("--batch", type=int, default=64, help="images per batch and process (default 64)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per rank (default 4)")
    p.add_argument("--limit", type=int, default=0, help="first N images of each class (default all)")
    p.add_argument("--img-size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip images that cannot be read and count them (default: stop at the first one)")


def add_evaluate_arguments(p):
    p.add_argument("--model", required=True, help=f"architecture of the checkpoint: {', '.join(MODEL_NAMES)}")
    p.add_argument("--checkpoint", required=True, type=Path, help="official ({'model'} or mmcls {'state_dict'}) weights")
    p.add_argument("--data", required=True, type=Path, help="ImageNet-style folder: one subfolder per class")
    p.add_argument("--modes", default=MODES_DEFAULT, help=f"comma-separated pruning modes (default {MODES_DEFAULT})")
    p.add_argument("--shared-selection", default=None, metavar="MODE",
                   help="every pruned mode scans exactly the tokens MODE's model selects, image by image (a keep "
                        "plan made once per batch), so that the modes differ by their scan alone; MODE must be "
                        "one of --modes (default: each mode selects its own tokens)")
    p.add_argument("--preset", choices=("paper",), default="paper",
                   help="the paper's schedule and keep ratios (default); --keep overrides the ratio")
    p.add_argument("--ema", choices=tuple(EMA), default="no",
                   help="which weights of the checkpoint: no = the plain 'model' / 'state_dict' weights (default, "
                        "those the released accuracies are measured with), yes = its 'model_ema' (an error when it "
                        "has none), auto = 'model_ema' when present; evaluate.json names the weights read")
    _add_shared_arguments(p)
    p.add_argument("--backend", default=None, help="scan backend (default $ALIGNSCAN_BACKEND, else by device)")


def add_finetune_arguments(p):
    p.add_argument("--model", required=True, help=f"architecture: {', '.join(MODEL_NAMES)}")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights to start from (official layout)")
    p.add_argument("--resume", type=Path, default=None, help="a finetune checkpoint to continue from (its step)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train from random weights (without it, --checkpoint or --resume is required)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run (its log and checkpoint are replaced)")
    p.add_argument("--data", required=True, type=Path, help="ImageNet-style train folder")
    p.add_argument("--mode", default="align", help="pruning mode (default align)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30, as the paper)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (default: no limit)")
    _add_shared_arguments(p)
    from .recipe import add_recipe_arguments
    add_recipe_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation and the shuffling (default 0)")
    p.add_argument("--backend", default=None, help="scan backend (default $ALIGNSCAN_BACKEND, else by device)")


def check_arguments(args):
    """ValueError naming the argument, before any work."""
    from alignscan import models
    if args.model not in models.NAMES:
        raise ValueError(f"--model must be one of {models.NAMES}, got {args.model!r}")
    for name in ("batch", "workers", "limit", "img_size"):
        value = getattr(args, name, 0)
        if value < (1 if name in ("batch", "img_size") else 0):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {1 if name in ('batch', 'img_size') else 0}, "
                             f"got {value}")
    if not Path(args.data).is_dir():
        raise ValueError(f"--data must be an existing folder (one subfolder per class), got {str(args.data)!r}")
    for name in ("checkpoint", "resume"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{name} must be an existing file, got {str(path)!r}")
    if getattr(args, "keep", None) is not None and not 0 < args.keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
    modes = args.modes.split(",") if hasattr(args, "modes") else [args.mode]
    for mode in modes:
        if mode not in models.MODES:
            raise ValueError(f"--{'modes' if hasattr(args, 'modes') else 'mode'} must be among {models.MODES}, "
                             f"got {mode!r}")
    shared = getattr(args, "shared_selection", None)
    if shared is not None and (shared not in modes or shared == "dense"):
        raise ValueError(f"--shared-selection must be one of the pruned modes in --modes "
                         f"({', '.join(m for m in modes if m != 'dense')}), got {shared!r}")
    if hasattr(args, "epochs"):
        _check_finetune(args)


def _check_finetune(args):
    from alignscan import registry

    from . import recipe
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    recipe.check(recipe.resolve(registry.family(args.model), args), args.batch)
    if args.checkpoint is None and args.resume is None and not args.from_scratch:
        raise ValueError("--checkpoint (weights to start from) or --resume is required; "
                         "pass --from-scratch to train from random weights")
    if args.resume is not None:
        now = dict(recipe.resolve(registry.family(args.model), args), epochs=args.epochs)
        _check_resume_fits(check_resumable(args.resume), args, now)
    used = [p.name for p in (Path(args.out).glob("finetune_log.jsonl") if Path(args.out).is_dir() else [])] + \
        [p.name for p in (Path(args.out).glob(f"checkpoint_{args.model}_*.pth") if Path(args.out).is_dir() else [])]
    if used and args.resume is None and not args.overwrite:
        raise ValueError(f"--out {args.out} holds an earlier run ({', '.join(sorted(used))}): "
                         f"pass --resume CHECKPOINT to continue it or --overwrite to start afresh")


RESUME_KEYS = ("optimizer", "step", "epoch")
# What a resumed run cannot change: the model and its pruning, the input size, and the
# batch (the step count of an epoch); the recipe's every entry is compared as well.
RESUME_FIXED = ("model", "mode", "keep", "conv", "metric", "img_size", "batch")


def _check_resume_fits(blob, args, recipe_now):
    """A resumed run keeps the checkpoint's settings: ValueError listing every option given
    a value other than the checkpoint's (an optimizer, a learning rate, a mode ...), before
    any step. The restored optimizer and scheduler would otherwise run on with the old
    values while the log recorded the new ones."""
    then_recipe, then_args = blob.get("recipe"), blob.get("args")
    differ = []
    if isinstance(then_args, dict):
        for key in RESUME_FIXED:
            if key in then_args and then_args[key] != str(getattr(args, key)):
                differ.append(f"--{key.replace('_', '-')} {getattr(args, key)} (checkpoint: {then_args[key]})")
    if isinstance(then_recipe, dict):
        for key, value in recipe_now.items():
            if key == "source" or key not in then_recipe or then_recipe[key] == value:
                continue
            option = "--recipe" if key == "name" else f"--{key.replace('_', '-')}"
            differ.append(f"{option} {value} (checkpoint: {then_recipe[key]})")
    if differ:
        raise ValueError(f"--resume {args.resume}: a resumed run keeps the settings it was trained with, and these "
                         f"differ: {'; '.join(differ)}. Drop them, or start a new run from its weights with "
                         f"--checkpoint")


def check_resumable(path):
    """ValueError naming ``--resume`` and what the file lacks, unless it is a finetune checkpoint."""
    from alignscan.models.checkpoints import read_checkpoint
    try:
        blob = read_checkpoint(path, whole=True)
    except ValueError as exc:
        raise ValueError(f"--resume: {exc}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise ValueError(f"--resume {path} is not a finetune checkpoint: it has no {', '.join(map(repr, missing))} "
                         f"(a released checkpoint? start from it with --checkpoint)")
    return blob
