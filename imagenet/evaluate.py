"""``evaluate``: top-1/top-5 of a checkpoint on an ImageNet-style folder, per pruning mode, on
exactly the same images. Every rank evaluates a disjoint shard (images rank, rank + world,
...: no padding, no duplicates) and the per-image results are summed with all-reduce, so the
counts equal the one-process run's."""
from __future__ import annotations

import io
import time

import numpy as np

from alignscan.outputs import progress_bar, save_figure, write_bytes, write_json, write_text
from alignscan.stats import holm, paired_counts

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

    from alignscan.bridges import resolve_backend
    from alignscan.models.pruning import KeepPlan
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
    shared = getattr(args, "shared_selection", None)
    # Per image and mode, the top-5 classes (-1: not evaluated); every image is filled by the
    # one process that evaluated it, so a sum over the processes gathers them in order.
    top = torch.zeros(n, len(modes), 5, dtype=torch.int64)
    target = torch.zeros(n, dtype=torch.int64)
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
            images = images.to(world.device)
            seen[index], target[index] = 1, labels
            plan = None
            order = sorted(modes, key=lambda m: m != shared)          # the selecting mode first
            for mode in order:
                k = modes.index(mode)
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if mode == shared:
                    logits, kept = nets[mode](images, return_kept=True)
                    plan = KeepPlan(kept)                              # read on the host once per batch
                elif plan is not None and mode != "dense":
                    logits = nets[mode](images, keep_plan=plan)
                else:
                    logits = nets[mode](images)
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[k] += time.perf_counter() - t0
                best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
                top[index, k] = torch.nn.functional.pad(best, (0, 5 - best.shape[1]), value=-1)
    for t in (top, target, seen):
        world.all_reduce(t)
    world.all_reduce(seconds)
    count = torch.tensor([len(unreadable)])
    world.all_reduce(count)
    if not world.main:
        return {}
    evaluated = seen.bool().numpy()
    total = int(evaluated.sum())
    labels_all = target.numpy()
    top1 = (top[:, :, 0].numpy() == labels_all[:, None]) & evaluated[:, None]
    top5 = (top.numpy() == labels_all[:, None, None]).any(axis=2) & evaluated[:, None]
    results = []
    for k, mode in enumerate(modes):
        c1, c5 = top1[evaluated, k], top5[evaluated, k]
        results.append({"mode": mode, "top1": float(c1.mean()) if total else 0.0, "top5": float(c5.mean()) if total else 0.0,
                        "correct": int(c1.sum()), "total": total,
                        "images_per_s": total / float(seconds[k]) * world.size if seconds[k] > 0 else None})
    paired = []
    for k, a in enumerate(modes):
        for against in ("dense", "relabel"):
            if against in modes and a != against:
                j = modes.index(against)
                paired.append({"a": a, "b": against, **paired_counts(top1[evaluated, k], top1[evaluated, j])})
    for row, adjusted in zip(paired, holm([row["p_value"] for row in paired])):
        row["p_holm"] = adjusted
    args.out.mkdir(parents=True, exist_ok=True)
    predictions = args.out / "evaluate_images.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, modes=np.array(modes), path=np.array([path for path, _ in folder.samples]),
                        label=labels_all, evaluated=evaluated, top5=top.numpy())
    write_bytes(predictions, buffer.getvalue())
    summary = {"backend": resolve_backend(world.device.type, backend), "model": args.model, "checkpoint": str(args.checkpoint),
               "weights": weights, "ema": getattr(args, "ema", "no"), "data": str(args.data),
               "classes": len(folder.classes), "images": n, "evaluated": total, "unreadable": int(count.item()),
               "unreadable_policy": "skipped and counted" if args.skip_unreadable else "stop",
               "world_size": world.size, "device": str(world.device), "keep": keep if keep is not None else "paper",
               "conv": args.conv, "metric": args.metric, "results": results, "paired": paired,
               "paired_correction": f"Holm over the {len(paired)} paired tests",
               "shared_selection": shared, "per_image": str(predictions),
               "quick": bool(getattr(args, "quick", False))}
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
        selection = summary.get("shared_selection")
        lines += ["", (f"Every pruned mode scans the tokens {selection}'s model selects, image by image: the "
                       f"differences are the scan's alone." if selection else
                       "Each mode selects its own tokens: the differences are the selection's and the scan's."),
                  "", "| a vs b | both | only a | only b | neither | McNemar p | Holm p |", "|---|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            lines.append(f"| {p['a']} vs {p['b']} | {p['both']} | {p['only_a']} | {p['only_b']} | {p['neither']} | "
                         f"{p['p_value']:.3g} | {p.get('p_holm', float('nan')):.3g} |")
    return "\n".join(lines) + "\n"


def _evaluate_plot(summary, path):
    """The bar plot beside the numbers; without matplotlib (a bare GPU image), the numbers alone."""
    try:
        import matplotlib
    except ImportError:
        print(f"evaluate: no plot ({path.name}): matplotlib is not installed (the plots extra)")
        return None
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
