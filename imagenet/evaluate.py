"""``evaluate``: top-1/top-5 of a checkpoint on an ImageNet-style folder, per pruning mode, on
exactly the same images. Every rank evaluates a disjoint shard (images rank, rank + world,
...: no padding, no duplicates) and the per-image results are summed with all-reduce, so the
counts equal the one-process run's."""
from __future__ import annotations

import time

from alignscan.outputs import progress_bar, save_figure, write_json, write_text
from alignscan.stats import paired_counts

from .data import Images, collate, eval_transform, image_folder
from .options import EMA, DataError, build, load_weights
from .world import World

__all__ = ["evaluate_command", "evaluate_markdown"]


def evaluate_command(args, backend=None):
    """The `evaluate` subcommand (``args``: its parsed options; ``backend``: the scan backend
    the models are built with, None for the registry's default); returns the summary it
    wrote to evaluate.json."""
    world = World()
    try:
        return _evaluate(args, backend, world)
    finally:
        world.close()


def _evaluate(args, backend, world):
    import torch
    folder = image_folder(args.data, args.limit)
    modes = args.modes.split(",")
    keep = None if args.keep is None else args.keep
    n = len(folder)
    shard = list(range(world.rank, n, world.size))               # disjoint, no padding
    loader = torch.utils.data.DataLoader(Images(folder, shard, eval_transform(args.img_size)), batch_size=args.batch,
                                         num_workers=args.workers, collate_fn=collate)
    nets = {}
    ema = EMA[getattr(args, "ema", "no")]
    for mode in modes:
        net = build(args.model, len(folder.classes), mode, keep, args.conv, args.metric, backend,
                    args.img_size)
        nets[mode] = load_weights(net, args.checkpoint, len(folder.classes), ema=ema).eval().to(world.device)
    weights = nets[modes[0]].checkpoint_weights      # the same file and choice for every mode
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
                raise DataError(f"unreadable image {bad[0][1]} (use --skip-unreadable to skip and count them)")
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
                paired.append({"a": a, "b": against, **paired_counts(top1[:, k].numpy()[evaluated].astype(bool),
                                                                top1[:, j].numpy()[evaluated].astype(bool))})
    summary = {"model": args.model, "checkpoint": str(args.checkpoint), "weights": weights,
               "ema": getattr(args, "ema", "no"), "data": str(args.data),
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
    lines = [f"{summary['model']} ({summary.get('weights', 'model')} weights) on {summary['data']} "
             f"({summary['evaluated']} images, {summary['classes']} classes"
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
