"""The paper's central claim, measured: prune a trained model with no fine-tuning and compare
alignment with relabelling (paper Fig. 2 / Table 4), then fine-tune both briefly and compare
again; plus a fidelity number that needs no training.

    python -m bench zero-shot [--quick] [--out DIR]
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench.progress import progress_bar

from bench.digits import DigitsConfig, build_model, evaluate, load_digits_split, train, trained_model

KEEP_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
MODES = ("align", "relabel", "self", "mask")
METRICS = ("clip", "raw", "l1", "l2")
SCHEDULE = (2, 4, 6)          # the digits ViM has 8 layers: prune after layers 2, 4 and 6
FINETUNE_RATIOS = (0.5, 0.3)
BOOTSTRAP = 1000


def bootstrap_interval(correct, seed=0, resamples=BOOTSTRAP):
    """95 % bootstrap interval of the accuracy over the test images (the run-to-run spread a
    different test sample would give)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, size=(resamples, len(correct)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _pruned_copy(dense, cfg, mode, ratio, metric, schedule):
    from models.pruning import PruningConfig
    model = build_model(cfg, pruning=PruningConfig(mode=mode, schedule=schedule, keep_ratio=ratio, metric=metric))
    model.load_state_dict(dense.state_dict())
    return model.eval()


def fidelity(dense, pruned, images):
    """Per layer after the first pruning: ||pruned - dense at the same tokens|| / ||dense there||."""
    import torch
    trace_dense, trace_pruned = [], []
    with torch.no_grad():
        dense(images, trace=trace_dense)
        pruned(images, trace=trace_pruned)
    rows = []
    total = trace_dense[0][1].shape[1]
    for layer, ((_, out_d), (kept, out_p)) in enumerate(zip(trace_dense, trace_pruned), start=1):
        if kept.shape[1] == total:
            continue
        ref = torch.gather(out_d, 1, kept[..., None].expand(-1, -1, out_d.shape[-1]))
        rows.append({"layer": layer, "tokens": int(kept.shape[1]),
                     "rel_dev": float((out_p - ref).norm() / ref.norm())})
    return rows


def fidelity_table(digits_model, cfg, x_test, quick=False):
    """Fidelity of "align" and "relabel" on the trained digits ViM and on random-init ViM-S
    and PlainMamba-L3 (paper presets)."""
    import torch

    import models
    out = {}
    cases = [("digits ViM (trained)", lambda mode: _pruned_copy(digits_model, cfg, mode, 0.7, "clip", SCHEDULE),
              digits_model, x_test[:64])]
    for name in ("vim_small", "plainmamba_l3"):
        kwargs = dict(img_size=64) if quick else {}
        torch.manual_seed(0)
        dense = models.create(name, **kwargs).eval()
        images = torch.randn(2, 3, kwargs.get("img_size", 224), kwargs.get("img_size", 224),
                             generator=torch.Generator().manual_seed(0))

        def make(mode, name=name, dense=dense, kwargs=kwargs):
            m = models.create(name, pruning=models.paper_preset(name, mode=mode), **kwargs)
            m.load_state_dict(dense.state_dict())
            return m.eval()
        cases.append((f"{name} (random init)", make, dense, images))
    for label, make, dense, images in progress_bar(cases, desc="fidelity", leave=False):
        out[label] = {mode: fidelity(dense, make(mode), images) for mode in ("align", "relabel")}
    return out


def run(out_dir, quick=False, cache_dir=None, seed=0, log=print):
    cfg = DigitsConfig(epochs=1, train_subset=128, embed_dim=32, depth=8, seed=seed) if quick else DigitsConfig(seed=seed)
    keep_ratios = (0.7, 0.3) if quick else KEEP_RATIOS
    metrics = ("clip", "raw") if quick else METRICS
    finetune_epochs = 1 if quick else 3
    out_dir = Path(out_dir)
    model, info = trained_model(cfg, cache_dir or out_dir / "cache", log=log)
    log(f"digits ViM (dim {cfg.embed_dim}, depth {cfg.depth}, {cfg.img_size}px, patch {cfg.patch_size}): "
        f"{'loaded from cache' if info['source'] == 'cache' else 'trained'} {info['path']}"
        + (f" ({info['train_seconds']:.0f} s)" if info.get("train_seconds") else ""))
    x_train, y_train, x_test, y_test = load_digits_split(cfg.img_size, cfg.split_seed)
    if quick:
        x_test, y_test = x_test[:64], y_test[:64]
    dense_acc, dense_correct = evaluate(model, x_test, y_test)
    rows = [{"mode": "dense", "metric": "-", "keep_ratio": 1.0, "finetuned": False, "top1": dense_acc,
             "ci95": bootstrap_interval(dense_correct)}]
    jobs = [(m, k, r) for k in metrics for m in MODES for r in keep_ratios]
    for mode, metric, ratio in progress_bar(jobs, desc="zero-shot grid", leave=False):
        acc, correct = evaluate(_pruned_copy(model, cfg, mode, ratio, metric, SCHEDULE), x_test, y_test)
        rows.append({"mode": mode, "metric": metric, "keep_ratio": ratio, "finetuned": False, "top1": acc,
                     "ci95": bootstrap_interval(correct)})
    ft_ratios = (keep_ratios[-1],) if quick else FINETUNE_RATIOS
    ft_x, ft_y = (x_train[:128], y_train[:128]) if quick else (x_train, y_train)
    for mode in ("align", "relabel"):
        for ratio in ft_ratios:
            pruned = _pruned_copy(model, cfg, mode, ratio, "clip", SCHEDULE)
            ft_cfg = replace(cfg, lr=cfg.lr / 4)
            start = time.perf_counter()
            train(pruned, ft_x, ft_y, ft_cfg, epochs=finetune_epochs, desc=f"fine-tune {mode} keep {ratio}")
            acc, correct = evaluate(pruned, x_test, y_test)
            rows.append({"mode": mode, "metric": "clip", "keep_ratio": ratio, "finetuned": True, "top1": acc,
                         "ci95": bootstrap_interval(correct), "finetune_epochs": finetune_epochs,
                         "finetune_seconds": time.perf_counter() - start})
    fid = fidelity_table(model, cfg, x_test, quick=quick)
    result = {"model": info, "schedule": list(SCHEDULE), "test_images": int(len(y_test)), "rows": rows,
              "fidelity": fid, "seed": cfg.seed,
              "spread": f"95% bootstrap interval over the {len(y_test)} test images ({BOOTSTRAP} resamples); "
                        f"training seed {cfg.seed} (other seeds: --seed)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "zero_shot.json").write_text(json.dumps(result, indent=2))
    (out_dir / "zero_shot.md").write_text(markdown(result))
    plot(result, out_dir / "zero_shot.png")
    return result


def markdown(result):
    rows = result["rows"]
    dense = rows[0]["top1"]
    ratios = sorted({r["keep_ratio"] for r in rows if r["mode"] != "dense"}, reverse=True)
    lines = [f"Digits ViM, test top-1 (%) without fine-tuning, metric clip; dense {100 * dense:.1f}. "
             f"Pruning after layers {result['schedule']} at the keep ratio per stage. "
             f"Spread: {result['spread']}.", "",
             "| mode | " + " | ".join(f"keep {r}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    get = {(r["mode"], r["metric"], r["keep_ratio"], r["finetuned"]): r for r in rows}
    for mode in MODES:
        cells = []
        for ratio in ratios:
            r = get.get((mode, "clip", ratio, False))
            cells.append(f"{100 * r['top1']:.1f} [{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f}]" if r else "-")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    metrics = sorted({r["metric"] for r in rows if r["mode"] != "dense"})
    lines += ["", "Importance metrics, mode align, top-1 (%):", "",
              "| metric | " + " | ".join(f"keep {r}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for metric in metrics:
        lines.append(f"| {metric} | " + " | ".join(
            f"{100 * get[('align', metric, r, False)]['top1']:.1f}" if ("align", metric, r, False) in get else "-"
            for r in ratios) + " |")
    ft = [r for r in rows if r["finetuned"]]
    if ft:
        lines += ["", f"After fine-tuning ({ft[0]['finetune_epochs']} epochs each), top-1 (%):", "",
                  "| mode | keep | zero-shot | fine-tuned |", "|---|---|---|---|"]
        for r in ft:
            zs = get[(r["mode"], "clip", r["keep_ratio"], False)]["top1"]
            lines.append(f"| {r['mode']} | {r['keep_ratio']} | {100 * zs:.1f} | {100 * r['top1']:.1f} |")
    lines += ["", "Fidelity: relative deviation of the remaining tokens' layer outputs from the dense model's "
                  "outputs at the same tokens (no training needed):", "",
              "| model | layer | tokens | align | relabel |", "|---|---|---|---|---|"]
    for label, modes in result["fidelity"].items():
        for a, rl in zip(modes["align"], modes["relabel"]):
            lines.append(f"| {label} | {a['layer']} | {a['tokens']} | {a['rel_dev']:.4f} | {rl['rel_dev']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    dense = rows[0]["top1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in zip(MODES, ("-o", "--s", ":^", "-.d")):
        pts = sorted((r["keep_ratio"], 100 * r["top1"], 100 * r["ci95"][0], 100 * r["ci95"][1]) for r in rows
                     if r["mode"] == mode and r["metric"] == "clip" and not r["finetuned"])
        if pts:
            k, a, lo, hi = map(np.array, zip(*pts))
            axes[0].plot(k, a, style, label=mode)
            axes[0].fill_between(k, lo, hi, alpha=0.15)
    for r in rows:
        if r["finetuned"]:
            axes[0].plot(r["keep_ratio"], 100 * r["top1"], "*", ms=12,
                         color="C0" if r["mode"] == "align" else "C1")
    axes[0].axhline(100 * dense, color="k", lw=0.8, label="dense")
    axes[0].set(title="Digits ViM: zero-shot top-1 (stars: after fine-tuning)", xlabel="keep ratio per stage",
                ylabel="top-1 (%)")
    axes[0].legend()
    for metric, style in zip(METRICS, ("-o", "--s", ":^", "-.d")):
        pts = sorted((r["keep_ratio"], 100 * r["top1"]) for r in rows
                     if r["mode"] == "align" and r["metric"] == metric and not r["finetuned"])
        if pts:
            axes[1].plot(*zip(*pts), style, label=metric)
    axes[1].set(title="align: importance metrics", xlabel="keep ratio per stage", ylabel="top-1 (%)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
