"""Small ViMs trained here, for experiments that need trained weights: on scikit-learn's
digits, and on the generated scan-distance task (``science.distance_task``).

The digits ship inside scikit-learn (1,797 grey 8x8 images, no download); images are
upsampled to 32x32 and cut into 4x4 patches (64 patches + the middle class token = 65
tokens). The split (80/20, stratified) and the seed are fixed. Trained weights are cached
with their configuration and a SHA-256 digest of the weights: a corrupt file or one whose
configuration or digest does not match is reported and retrained, never used.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from alignscan.outputs import progress_bar, save_torch

__all__ = ["DigitsConfig", "TASKS", "load_digits_split", "load_split", "build_model", "train", "evaluate", "prefixes",
           "trained_model", "weights_digest"]


TASKS = ("digits", "distance")


@dataclass(frozen=True)
class DigitsConfig:
    """A small ViM and how it is trained. ``task``: "digits" (10 classes) or "distance" (2
    classes, science.distance_task); ``position_embedding=False`` keeps pos_embed at zero."""

    task: str = "digits"
    position_embedding: bool = True
    embed_dim: int = 96
    depth: int = 8
    img_size: int = 32
    patch_size: int = 4
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0   # of the training loss's targets
    drop_path: float = 0.0         # stochastic depth's largest rate (VisionMamba's drop_path_rate)
    seed: int = 0                  # initialisation, shuffling and augmentation
    split_seed: int = 0            # the train/test split (fixed across training seeds)
    train_subset: int = 0          # 0: the whole training split (tests use a few images)
    held_out_pairs: bool = False   # distance: the test images' mark pairs never occur in training
    bar: float = 0.0               # train on (extra epochs) until the dense validation accuracy reaches this
    max_epochs: int = 0            # ... but no longer than this many epochs in all (0: epochs)

    @property
    def key(self):
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def load_digits_split(img_size=32, seed=0):
    """(x_train, y_train, x_test, y_test) as float32 tensors (N, 1, img, img) in [0, 1]
    (bilinear upsampling of the 8x8 images) and int64 labels; a fixed stratified 80/20 split."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=seed,
                                           stratify=digits.target)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def load_split(cfg):
    """(x_train, y_train, x_test, y_test) of the configuration's task."""
    if cfg.task == "digits":
        return load_digits_split(cfg.img_size, cfg.split_seed)
    if cfg.task == "distance":
        from alignscan.science.distance_task import load_distance_split
        return load_distance_split(cfg.split_seed, held_out=cfg.held_out_pairs)
    raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")


def build_model(cfg, pruning=None, backend=None):
    from alignscan.models.vim import VisionMamba
    model = VisionMamba(embed_dim=cfg.embed_dim, depth=cfg.depth, img_size=cfg.img_size, patch_size=cfg.patch_size,
                        num_classes=10 if cfg.task == "digits" else 2, channels=1, pruning=pruning, backend=backend,
                        drop_path_rate=cfg.drop_path)
    if not cfg.position_embedding:      # no absolute positions: what the model knows of order comes from the scan
        model.pos_embed.data.zero_()
        model.pos_embed.requires_grad_(False)
    model.arch_name = None
    return model


def _augment(x, generator):
    """Random shifts of up to 2 pixels (the digits are small; this is all the augmentation)."""
    import torch
    shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3))


def train(model, x, y, cfg, epochs=None, desc="train"):
    """AdamW with cosine decay; returns the per-epoch mean losses."""
    import torch
    epochs = cfg.epochs if epochs is None else epochs
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps = epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.15)
    losses = []
    model.train()
    with progress_bar(total=steps, desc=desc, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                batch = _augment(x[idx], gen) if cfg.task == "digits" else x[idx]   # shifts would move the marks
                loss = torch.nn.functional.cross_entropy(model(batch), y[idx], label_smoothing=cfg.label_smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(total / len(x))
    model.eval()
    return losses


def evaluate(model, x, y, batch_size=256, keep_plan=None, predictions=False, prefix=None):
    """(top-1 accuracy, per-image correctness as a bool array[, per-image predicted class]).
    keep_plan: one (n, K) tensor per pruning stage for the n images (the tokens to keep,
    instead of choosing them). prefix: the images' ``models.vim.Prefix`` (``prefixes``), so
    that the layers before the first pruning stage are not run again for every mode."""
    import torch
    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            part = slice(start, start + batch_size)
            plan = None if keep_plan is None else [stage[part] for stage in keep_plan]
            done = None if prefix is None else prefix[part]
            predicted.append(model(x[part], keep_plan=plan, prefix=done).argmax(1).numpy())
    predicted = np.concatenate(predicted) if predicted else np.zeros(0, np.int64)
    correct = predicted == np.asarray(y)
    accuracy = float(correct.mean()) if correct.size else 0.0
    return (accuracy, correct, predicted) if predictions else (accuracy, correct)


def prefixes(model, x, layers, batch_size=256):
    """The dense ``model``'s ``Prefix`` of images ``x`` (its first ``layers`` layers), in the
    batches ``evaluate`` uses."""
    import torch

    from alignscan.models.vim import Prefix
    model.eval()
    with torch.no_grad():
        parts = [model.prefix(x[start:start + batch_size], layers) for start in range(0, len(x), batch_size)]
    return Prefix(layers, *(torch.cat([getattr(p, f) for p in parts]) for f in ("hidden", "residual", "y", "y_b")))


def weights_digest(state_dict):
    """SHA-256 over the weights' names, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _load_cached(path, cfg):
    """The cached weights if the file is intact and was trained with this configuration;
    otherwise None and the reason."""
    import torch
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:       # truncated, not a torch file, ...
        return None, f"unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob or "digest" not in blob:
        return None, "not an alignscan digits checkpoint"
    if blob["config"] != asdict(cfg):
        return None, "trained with another configuration"
    if weights_digest(blob["state_dict"]) != blob["digest"]:
        return None, "weights do not match their digest (corrupt)"
    return blob, None


def trained_model(cfg=DigitsConfig(), cache_dir=Path("bench_out") / "cache", log=print):
    """(model, info): the cached model if valid, else a freshly trained one (then cached).
    info: {"path", "source": "cache" | "trained", "train_seconds", "losses", "reason"}."""
    import torch
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{cfg.task}_vim_{cfg.key}.pt"
    model = build_model(cfg)
    info = {"path": str(path), "config": asdict(cfg)}
    if path.exists():
        blob, reason = _load_cached(path, cfg)
        if blob is not None:
            try:
                model.load_state_dict(blob["state_dict"])       # strict: a model changed since, same config
            except RuntimeError as exc:
                blob, reason = None, f"its weights no longer fit the model ({str(exc).splitlines()[0][:120]})"
        if blob is not None:
            model.eval()
            return model, {**info, "source": "cache", "train_seconds": blob.get("train_seconds"),
                           "losses": blob.get("losses"), "training": blob.get("training")}
        log(f"cached {cfg.task} weights at {path} rejected: {reason}; retraining")
        info["reason"] = reason
    x_train, y_train, _, _ = load_split(cfg)
    if cfg.train_subset:
        x_train, y_train = x_train[:cfg.train_subset], y_train[:cfg.train_subset]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    start = time.perf_counter()
    losses = train(model, x_train, y_train, cfg, desc=f"train {cfg.task} ViM")
    training = _train_to_bar(model, x_train, y_train, cfg, losses, log)
    seconds = time.perf_counter() - start
    state = model.state_dict()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_torch({"state_dict": state, "config": asdict(cfg), "digest": weights_digest(state),
                    "train_seconds": seconds, "losses": losses, "training": training}, path)
    except OSError as exc:             # the training is not lost for a cache that cannot be written
        log(f"warning: could not cache the trained {cfg.task} weights at {path} ({exc.strerror or exc}); "
            f"going on with the trained model")
        info["cache_error"] = str(exc)
    return model, {**info, "source": "trained", "train_seconds": seconds, "losses": losses, "training": training}


def validation_split(cfg):
    """(x, y) on which the training bar is read: on the distance task, images drawn like the
    training ones from their own seed; digits has no third split, so its test images (the
    bar only decides how long the dense model trains, never a comparison between modes)."""
    if cfg.task == "distance":
        from alignscan.science.distance_task import load_distance_split
        return load_distance_split(cfg.split_seed, held_out=cfg.held_out_pairs, split=("validation",))
    return load_split(cfg)[2:]


def _train_to_bar(model, x, y, cfg, losses, log):
    """Extra epochs (half the first run's at a time, from half its learning rate) until the
    dense validation accuracy reaches ``cfg.bar`` or ``cfg.max_epochs`` are spent. Returns the
    record: epochs, validation accuracy after each round, whether the bar was reached."""
    if not cfg.bar:
        return {"epochs": cfg.epochs, "bar": None}
    x_val, y_val = validation_split(cfg)
    epochs, history = cfg.epochs, [evaluate(model, x_val, y_val)[0]]
    extra = max(1, cfg.epochs // 2)
    while history[-1] < cfg.bar and epochs + extra <= max(cfg.max_epochs, cfg.epochs):
        log(f"{cfg.task} seed {cfg.seed}: validation {100 * history[-1]:.1f} % < bar {100 * cfg.bar:.0f} % after "
            f"{epochs} epochs: {extra} more")
        losses += train(model, x, y, replace(cfg, lr=cfg.lr / 2, seed=cfg.seed + 7919 * epochs), epochs=extra,
                        desc=f"train {cfg.task} ViM (extra)")
        epochs += extra
        history.append(evaluate(model, x_val, y_val)[0])
    return {"epochs": epochs, "bar": cfg.bar, "validation_accuracy": history, "reached_bar": history[-1] >= cfg.bar}
