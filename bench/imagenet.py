"""Real data at scale: evaluate released checkpoints on an ImageNet-style folder, and
fine-tune pruned models, on one process or many (torchrun: NCCL on GPUs, Gloo on CPUs).

    python -m bench evaluate --model vim_small --checkpoint vim_s.pth --data imagenet/val
    torchrun --nproc_per_node 8 -m bench evaluate --model vim_small --checkpoint vim_s.pth --data imagenet/val
    python -m bench finetune --model vim_small --checkpoint vim_s.pth --data imagenet/train --mode align
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m bench finetune --model vim_small --checkpoint vim_s.pth --data imagenet/train --mode align

The folder is what torchvision's ImageFolder reads: one subfolder per class, the sorted
class names are the label indices. Images are read with Pillow (torchvision is not needed).
Evaluation uses the released models' transform: resize the shorter side to size/0.875
(256 for 224) with bicubic interpolation, centre crop, ImageNet mean and std (the DeiT
recipe of Vim; PlainMamba's mmcls test pipeline is the same). Every rank evaluates a
disjoint shard (images rank, rank + world, ...: no padding, no duplicates) and the
per-image results are summed with all-reduce, so the counts equal the one-process run's.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from bench.choices import CONV_MODES, METRICS, MODEL_NAMES
from bench.outputs import save_figure, save_torch, write_json, write_text
from bench.progress import progress_bar

__all__ = ["ImageFolder", "eval_transform", "train_transform", "evaluate_command", "finetune_command",
           "add_evaluate_arguments", "add_finetune_arguments", "check_arguments"]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP_RATIO = 0.875
MODES_DEFAULT = "dense,align,relabel"

EVALUATE_HELP = "top-1/top-5 of a checkpoint on an ImageNet-style folder, per pruning mode (torchrun-ready)"
EVALUATE_DOC = ("Evaluates a released (or fine-tuned) checkpoint on an ImageNet-style folder for several pruning modes "
                "on exactly the same images: top-1, top-5, images/s, and paired counts with an exact McNemar p-value "
                "against dense and against relabel. Runs under torchrun (NCCL on GPUs, Gloo on CPUs).")
FINETUNE_HELP = "fine-tune a pruned model from a checkpoint on an ImageNet-style train folder (torchrun-ready)"
FINETUNE_DOC = ("Fine-tunes a pruned model (any mode) from a checkpoint, with the paper's settings as defaults where "
                "the paper gives them (30 epochs; PlainMamba: 5 warm-up epochs from 2e-8, base lr 2e-5, min lr 2e-7, "
                "weight decay 1e-8, cosine; ViM: a constant learning rate, whose value the paper's text lost: 1e-5 here), "
                "AdamW, random resized crop + flip, bfloat16 autocast on GPUs, a checkpoint every epoch in the "
                "official layout, --resume, and a JSON-lines log. Runs under torchrun with DistributedDataParallel.")

# The paper's fine-tuning settings (Sec. 5.1); "constant" for ViM, whose values the text lost.
FINETUNE_DEFAULTS = {
    "vim": dict(lr=1e-5, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=0, weight_decay=1e-8, schedule="constant"),
    "plainmamba": dict(lr=2e-5, min_lr=2e-7, warmup_lr=2e-8, warmup_epochs=5, weight_decay=1e-8, schedule="cosine"),
}


# --- data -------------------------------------------------------------------------------------

class ImageFolder:
    """(path, label) for every image below ``root``/<class>/..., classes sorted by name.

    Args:
        limit: keep the first ``limit`` images (sorted by path) of each class (0: all).
    """

    def __init__(self, root, limit=0):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"--data must be a folder with one subfolder per class, got {str(root)!r}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"--data {root}: no class subfolders (an ImageNet-style folder has one per class)")
        self.samples = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
            self.samples += [(p, label) for p in (files[:limit] if limit else files)]
        if not self.samples:
            raise ValueError(f"--data {root}: no images ({', '.join(EXTENSIONS)}) in its {len(self.classes)} class "
                             f"folders")

    def __len__(self):
        return len(self.samples)


def _load_rgb(path):
    from PIL import Image
    with Image.open(path) as image:
        return image.convert("RGB")


def _to_tensor(image):
    import torch
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def eval_transform(image, size):
    """Resize the shorter side to size/0.875 (bicubic), centre crop ``size``, normalise."""
    from PIL import Image
    short = int(size / CROP_RATIO)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(image.crop((left, top, left + size, top + size)))


def train_transform(image, size, rng):
    """Random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) and a random horizontal flip."""
    from PIL import Image
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:   # fall back to a centre crop of the whole image
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(image)


class _EvalSet:
    """Dataset of (index, image, label); an unreadable image gives (index, None, label)."""

    def __init__(self, folder, indices, size):
        self.folder, self.indices, self.size = folder, indices, size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.folder.samples[index]
        try:
            return index, eval_transform(_load_rgb(path), self.size), label
        except Exception as exc:      # unreadable: reported by the caller, never dropped silently
            return index, f"{path}: {type(exc).__name__}: {exc}", label


class _TrainSet:
    def __init__(self, folder, size, seed):
        self.folder, self.size, self.seed, self.epoch = folder, size, seed, 0

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        path, label = self.folder.samples[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return train_transform(_load_rgb(path), self.size, rng), label


def _collate(items):
    import torch
    good = [(i, x, y) for i, x, y in items if not isinstance(x, str)]
    bad = [(i, x) for i, x, _ in items if isinstance(x, str)]
    if not good:
        return None, None, None, bad
    index, images, labels = zip(*good)
    return torch.tensor(index), torch.stack(images), torch.tensor(labels), bad


# --- distributed ----------------------------------------------------------------------------

class World:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one."""

    def __init__(self):
        import torch
        import torch.distributed as dist
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def all_reduce(self, tensor):
        import torch.distributed as dist
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        import torch.distributed as dist
        if self.size > 1:
            dist.barrier()

    def close(self):
        import torch.distributed as dist
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --- models and checkpoints -----------------------------------------------------------------

def family(name):
    return "vim" if name.startswith("vim") else "plainmamba"


def build(name, num_classes, mode, keep, conv, metric, backend, img_size=224):
    """The model with the paper's schedule for ``name`` and ``mode`` (``keep``: None for the
    paper's keep ratio, else one ratio per stage)."""
    import models
    if mode == "dense":
        pruning = None
    else:
        overrides = dict(conv=conv, metric=metric)
        if keep is not None:
            overrides["keep_ratio"] = keep
        pruning = models.paper_preset(name, mode=mode, **overrides)
    return models.create(name, pruning=pruning, num_classes=num_classes, backend=backend, img_size=img_size)


def describe_mismatch(model, checkpoint_state, num_classes):
    """What differs between a checkpoint and the model, in words (architecture, classes)."""
    own = model.state_dict()
    head = "head.weight" if "head.weight" in own else "head.fc.weight"
    prefix_model = sorted({k.split(".")[0] for k in own})
    prefix_ckpt = sorted({k.split(".")[0] for k in checkpoint_state})
    notes = []
    if prefix_model != prefix_ckpt:
        notes.append(f"the checkpoint's weights are named {prefix_ckpt[:6]} but {type(model).__name__} has "
                     f"{prefix_model[:6]}: it is for another architecture")
    elif len(own) != len(checkpoint_state):
        notes.append(f"the checkpoint has {len(checkpoint_state)} weights, the model {len(own)}: another depth or size")
    if head in checkpoint_state and head in own and checkpoint_state[head].shape[0] != own[head].shape[0]:
        notes.append(f"the checkpoint has {checkpoint_state[head].shape[0]} classes, the data folder {num_classes}")
    widths = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in checkpoint_state.items()
              if k in own and k != head and not k.startswith("head") and tuple(v.shape) != tuple(own[k].shape)}
    if widths:
        key, (a, b) = next(iter(widths.items()))
        notes.append(f"{len(widths)} weights differ in shape (e.g. {key}: checkpoint {a}, model {b}): another width")
    return "; ".join(notes)


def load_weights(model, path, num_classes):
    """models.load_checkpoint, with a message naming what differs when it does not fit."""
    import models
    from models.checkpoints import read_checkpoint
    try:
        return models.load_checkpoint(model, path)
    except ValueError as exc:
        state = read_checkpoint(path)
        why = describe_mismatch(model, state, num_classes) if isinstance(state, dict) else ""
        raise ValueError(f"{exc}" + (f"\nIn short: {why}" if why else "")) from None


# --- evaluate -------------------------------------------------------------------------------



def _add_shared_arguments(p):
    """The pruning and data options evaluate and finetune both take."""
    p.add_argument("--keep", type=float, default=None, help="keep ratio per stage instead of the paper's")
    p.add_argument("--conv", choices=CONV_MODES, default="compact", help="ViM's conv1d when pruned")
    p.add_argument("--metric", choices=METRICS, default="clip", help="importance metric")
    p.add_argument("--batch", type=int, default=64, help="images per batch and process (default 64)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per rank (default 4)")
    p.add_argument("--limit", type=int, default=0, help="first N images of each class (default all)")
    p.add_argument("--img-size", type=int, default=224, help="input size (default 224)")


def add_evaluate_arguments(p):
    p.add_argument("--model", required=True, help=f"architecture of the checkpoint: {', '.join(MODEL_NAMES)}")
    p.add_argument("--checkpoint", required=True, type=Path, help="official ({'model'} or mmcls {'state_dict'}) weights")
    p.add_argument("--data", required=True, type=Path, help="ImageNet-style folder: one subfolder per class")
    p.add_argument("--modes", default=MODES_DEFAULT, help=f"comma-separated pruning modes (default {MODES_DEFAULT})")
    p.add_argument("--preset", choices=("paper",), default="paper",
                   help="the paper's schedule and keep ratios (default); --keep overrides the ratio")
    _add_shared_arguments(p)
    p.add_argument("--backend", default=None, help="scan backend (default $ALIGNSCAN_BACKEND, else by device)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip images that cannot be read and count them (default: stop at the first one)")


def add_finetune_arguments(p):
    p.add_argument("--model", required=True, help=f"architecture: {', '.join(MODEL_NAMES)}")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights to start from (official layout)")
    p.add_argument("--resume", type=Path, default=None, help="a finetune checkpoint to continue from (its step)")
    p.add_argument("--data", required=True, type=Path, help="ImageNet-style train folder")
    p.add_argument("--mode", default="align", help="pruning mode (default align)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30, as the paper)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (default: no limit)")
    _add_shared_arguments(p)
    for name in ("lr", "min-lr", "warmup-lr", "weight-decay"):
        p.add_argument(f"--{name}", type=float, default=None, help=f"{name} (default: the paper's for the family)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="warm-up epochs (default: the paper's)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=None, help="lr schedule (default: the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation and the shuffling (default 0)")
    p.add_argument("--backend", default=None, help="scan backend (default $ALIGNSCAN_BACKEND, else by device)")


def check_arguments(args):
    """ValueError naming the argument, before any work."""
    import models
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
    if hasattr(args, "epochs") and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")


def _mcnemar(a, b):
    from bench.zero_shot import paired_counts
    return paired_counts(a, b)


def evaluate_command(args):
    """The `evaluate` subcommand; returns the summary it wrote to evaluate.json."""
    world = World()
    try:
        return _evaluate(args, world)
    finally:
        world.close()


def _evaluate(args, world):
    import torch
    folder = ImageFolder(args.data, args.limit)
    modes = args.modes.split(",")
    keep = None if args.keep is None else args.keep
    n = len(folder)
    shard = list(range(world.rank, n, world.size))               # disjoint, no padding
    loader = torch.utils.data.DataLoader(_EvalSet(folder, shard, args.img_size), batch_size=args.batch,
                                         num_workers=args.workers, collate_fn=_collate)
    nets = {}
    for mode in modes:
        net = build(args.model, len(folder.classes), mode, keep, args.conv, args.metric, args.backend_device[0],
                    args.img_size)
        nets[mode] = load_weights(net, args.checkpoint, len(folder.classes)).eval().to(world.device)
    # Per image and mode: 1 if top-1 right, 2 if only top-5 right ... encoded as two tables.
    top1 = torch.zeros(n, len(modes), dtype=torch.int64)
    top5 = torch.zeros(n, len(modes), dtype=torch.int64)
    seen = torch.zeros(n, dtype=torch.int64)
    unreadable = []
    seconds = torch.zeros(len(modes), dtype=torch.float64)
    with torch.no_grad():
        for index, images, labels, bad in progress_bar(loader, desc=f"evaluate (rank {world.rank})",
                                                       disable=not world.main, leave=False):
            if bad and not args.skip_unreadable:
                raise ValueError(f"unreadable image {bad[0][1]} (use --skip-unreadable to skip and count them)")
            unreadable += [b[1] for b in bad]
            if index is None:
                continue
            images, labels = images.to(world.device), labels.to(world.device)
            seen[index] = 1
            for k, mode in enumerate(modes):
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits = nets[mode](images)
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[k] += time.perf_counter() - t0
                best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
                top1[index, k] = (best[:, 0] == labels.cpu()).long()
                top5[index, k] = (best == labels.cpu()[:, None]).any(dim=-1).long()
    for t in (top1, top5, seen):
        world.all_reduce(t)
    world.all_reduce(seconds)
    count = torch.tensor([len(unreadable)])
    world.all_reduce(count)
    if not world.main:
        return {}
    evaluated = seen.bool().numpy()
    total = int(evaluated.sum())
    results = []
    for k, mode in enumerate(modes):
        c1, c5 = top1[:, k].numpy()[evaluated], top5[:, k].numpy()[evaluated]
        results.append({"mode": mode, "top1": float(c1.mean()) if total else 0.0, "top5": float(c5.mean()) if total else 0.0,
                        "correct": int(c1.sum()), "total": total,
                        "images_per_s": total / float(seconds[k]) * world.size if seconds[k] > 0 else None})
    paired = []
    for k, a in enumerate(modes):
        for against in ("dense", "relabel"):
            if against in modes and a != against:
                j = modes.index(against)
                paired.append({"a": a, "b": against, **_mcnemar(top1[:, k].numpy()[evaluated].astype(bool),
                                                                top1[:, j].numpy()[evaluated].astype(bool))})
    summary = {"model": args.model, "checkpoint": str(args.checkpoint), "data": str(args.data),
               "classes": len(folder.classes), "images": n, "evaluated": total, "unreadable": int(count.item()),
               "unreadable_policy": "skipped and counted" if args.skip_unreadable else "stop",
               "world_size": world.size, "device": str(world.device), "keep": keep if keep is not None else "paper",
               "conv": args.conv, "metric": args.metric, "results": results, "paired": paired,
               "quick": bool(getattr(args, "quick", False))}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "evaluate.json", summary)
    write_text(args.out / "evaluate.md", evaluate_markdown(summary))
    _evaluate_plot(summary, args.out / "evaluate.png")
    print(evaluate_markdown(summary))
    return summary


def evaluate_markdown(summary):
    lines = [f"{summary['model']} on {summary['data']} ({summary['evaluated']} images, {summary['classes']} classes"
             f"{', ' + str(summary['unreadable']) + ' unreadable skipped' if summary['unreadable'] else ''}; "
             f"keep {summary['keep']}, conv {summary['conv']}, metric {summary['metric']}, "
             f"{summary['world_size']} process(es) on {summary['device']})", "",
             "| mode | top-1 (%) | top-5 (%) | correct | images/s |", "|---|---|---|---|---|"]
    for r in summary["results"]:
        speed = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-"
        lines.append(f"| {r['mode']} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} | {r['correct']} / {r['total']} | "
                     f"{speed} |")
    if summary["paired"]:
        lines += ["", "| a vs b | both | only a | only b | neither | McNemar p |", "|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            lines.append(f"| {p['a']} vs {p['b']} | {p['both']} | {p['only_a']} | {p['only_b']} | {p['neither']} | "
                         f"{p['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def _evaluate_plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(summary["results"]), 3.6))
    modes = [r["mode"] for r in summary["results"]]
    ax.bar(modes, [100 * r["top1"] for r in summary["results"]], color="C0", label="top-1")
    ax.bar(modes, [100 * (r["top5"] - r["top1"]) for r in summary["results"]],
           bottom=[100 * r["top1"] for r in summary["results"]], color="C0", alpha=0.35, label="top-5")
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=f"{summary['model']}: {summary['evaluated']} images")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# --- fine-tune ------------------------------------------------------------------------------

def _lr_at(step, steps_per_epoch, total_steps, cfg):
    warmup = int(cfg["warmup_epochs"] * steps_per_epoch)
    if step < warmup:
        return cfg["warmup_lr"] + (cfg["lr"] - cfg["warmup_lr"]) * step / max(1, warmup)
    if cfg["schedule"] == "constant":
        return cfg["lr"]
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


def official_layout(name, state, extra):
    """The released checkpoints' layout: ViM {"model": ...}; PlainMamba (mmcls) {"state_dict": ...}."""
    return {"model": state, **extra} if family(name) == "vim" else {"state_dict": state, "meta": extra.get("meta", {}),
                                                                      **extra}


def finetune_command(args):
    """The `finetune` subcommand; returns its summary (steps, checkpoint, log, settings)."""
    world = World()
    try:
        return _finetune(args, world)[0]
    finally:
        world.close()


def _finetune(args, world):
    import torch
    cfg = dict(FINETUNE_DEFAULTS[family(args.model)])
    for key in ("lr", "min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "schedule"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    folder = ImageFolder(args.data, args.limit)
    model = build(args.model, len(folder.classes), args.mode, args.keep, args.conv, args.metric,
                  args.backend_device[0], args.img_size)
    if args.checkpoint is not None and args.resume is None:
        load_weights(model, args.checkpoint, len(folder.classes))
    model = model.to(world.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    dataset = _TrainSet(folder, args.img_size, args.seed)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                                              shuffle=True, seed=args.seed, drop_last=True) \
        if world.size > 1 else None
    generator = torch.Generator().manual_seed(args.seed)
    # Every rank gets the same number of images (the sampler drops the remainder of n / world)
    # and so the same number of steps; a last, smaller batch is kept, so that a folder smaller
    # than one batch (--limit) still trains.
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=sampler is None, sampler=sampler,
                                         num_workers=args.workers, drop_last=False, generator=generator)
    if len(dataset) < world.size:
        raise ValueError(f"--data {args.data}: {len(dataset)} image(s) for {world.size} processes: each needs one")
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    step = 0
    if args.resume is not None:
        from models.checkpoints import read_checkpoint
        blob = read_checkpoint(args.resume, whole=True)
        model.load_state_dict(blob["model"] if "model" in blob else blob["state_dict"])
        optimizer.load_state_dict(blob["optimizer"])
        step = int(blob["step"])
    wrapped = model
    if world.size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "finetune_log.jsonl"
    last_checkpoint = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if world.device.type == "cuda" else None
    wrapped.train()
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        dataset.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        skip = step - epoch * steps_per_epoch          # batches of this epoch done before a resume
        bar = progress_bar(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not world.main,
                           leave=False)
        t0, seen, value = time.perf_counter(), 0, float("nan")
        for k, (images, labels) in enumerate(loader):
            if k < skip:
                continue
            if step >= total_steps:
                break
            lr = _lr_at(step, steps_per_epoch, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(world.device), labels.to(world.device)
            if autocast is not None:
                with autocast:
                    loss = torch.nn.functional.cross_entropy(wrapped(images), labels)
            else:
                loss = torch.nn.functional.cross_entropy(wrapped(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(images) * world.size
            value = loss.detach().float()
            world.all_reduce(value)
            value = float(value) / world.size
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is not finite at step {step}: {value}")
            bar.update(1)
            if world.main:
                record = {"epoch": epoch + 1, "step": step, "loss": value, "lr": lr,
                          "images_per_s": seen / (time.perf_counter() - t0)}
                with open(log_path, "a") as log:
                    log.write(json.dumps(record) + "\n")
        bar.close()
        if world.main:
            extra = {"epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(),
                     "args": {k: str(v) for k, v in vars(args).items() if k != "backend_device"},
                     "meta": {"epoch": epoch + 1, "step": step, "alignscan": "finetune"}}
            last_checkpoint = args.out / f"checkpoint_{args.model}_{args.mode}.pth"
            save_torch(official_layout(args.model, model.state_dict(), extra), last_checkpoint)
            print(f"epoch {epoch + 1}: step {step}, loss {value:.4f}, checkpoint {last_checkpoint}")
        world.barrier()
    summary = {"model": args.model, "mode": args.mode, "steps": step, "world_size": world.size, "settings": cfg,
               "checkpoint": str(last_checkpoint) if last_checkpoint else None, "log": str(log_path)}
    return summary, model
