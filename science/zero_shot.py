"""The alignment on trial: zero-shot pruning of small ViMs trained here, with the factors
that could explain a difference between modes isolated, and paired tests on the same images.

    python -m alignscan.bench zero-shot [--quick] [--out DIR] [--cache DIR] [--seed S]

Tasks: digits (``science.digits``) and scan distance (``science.distance_task``: a task where the
distance along the scan decides the label).
Factors: mode (dense, align, hold, self, relabel, mask); keep ratio per stage; ViM's conv1d
over the compacted sequence ("compact", as the paper) or with pruned neighbours read as zero
("position_aware"); and where the kept tokens come from: "own" (each mode chooses from its
own outputs: the modes then drop different tokens), "dense" (chosen once from the dense
model's outputs, the same for every mode), "random" (one shared seeded draw), and on the
distance task "background" (background tokens only, seeded: the marks and the class token
always stay).
Each pair that matters (align vs relabel, hold vs relabel, hold vs align) is compared on the
same images: the counts of images both / only one / neither got right, and an exact McNemar
p-value. On digits also: the importance metrics, brief fine-tuning, and fidelity.
"""
from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from alignscan.outputs import progress_bar, write_bytes, write_json, write_text
from alignscan.reference.importance import METRICS
from alignscan.science.digits import (
    DigitsConfig,
    build_model,
    evaluate,
    load_split,
    train,
    trained_model,
)

from .design import CONVS, FINETUNE_MODES, FINETUNE_RATIOS, KEEP_RATIOS, MODES, PAIRS, SPAN_REMOVED, SPAN_SIDES
from .report import markdown, plot
from .stats import BOOTSTRAP, bootstrap_interval, holm, mcnemar_exact, paired_counts

__all__ = ["mcnemar_exact", "paired_counts", "run", "TASK_CONFIGS"]


# The two tasks' models. Digits: pruned after layers 2, 4, 6 of 8; distance: after 2 and 4 of
# 6 (width 64, 6 epochs on 8,000 images: about 5 minutes on 2 cores).
TASK_CONFIGS = {
    "digits": (DigitsConfig(), (2, 4, 6), ("own", "dense", "random")),
    "distance": (DigitsConfig(task="distance", embed_dim=64, depth=6, epochs=6), (2, 4), ("background",)),
}
QUICK_CONFIGS = {
    "digits": (DigitsConfig(epochs=1, train_subset=128, embed_dim=16, depth=8), (2, 4, 6), ("own", "dense", "random")),
    "distance": (DigitsConfig(task="distance", embed_dim=16, depth=6, epochs=1, train_subset=128), (2, 4),
                 ("background",)),
}


def _pruned_copy(dense, cfg, mode, ratio, metric, schedule, conv="compact"):
    from alignscan.models.pruning import PruningConfig
    model = build_model(cfg, pruning=PruningConfig(mode=mode, schedule=schedule, keep_ratio=ratio, metric=metric,
                                                   conv=conv))
    model.load_state_dict(dense.state_dict())
    return model.eval()


def dense_plan(dense, cfg, x, schedule, ratio, batch_size=256):
    """The tokens the dense model's own outputs choose (clip importance, nested, class token
    protected), once, for every mode: at each scheduled layer the dense model's merged SSM
    output scores the tokens still in the plan."""
    import torch

    from alignscan.models import Recorder
    from alignscan.models.pruning import PruningConfig, select_kept
    selector = PruningConfig(mode="mask", schedule=schedule, keep_ratio=ratio)
    stages = [[] for _ in schedule]
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            record = Recorder()
            dense(x[start:start + batch_size], record=record)
            outputs = record.mixer_outputs
            n, L = outputs[0][1].shape[0], outputs[0][1].shape[-1]
            live = torch.arange(L).expand(n, L)
            protected = torch.full((n, 1), dense.cls_index)
            for stage, layer in enumerate(schedule):
                live = select_kept(outputs[layer - 1][1], selector, stage, live=live, protected=protected)
                stages[stage].append(live)
    return [torch.cat(parts) for parts in stages]


def random_plan(n, tokens, cls_index, schedule, ratio, seed):
    """One shared seeded draw of nested random subsets (class token protected)."""
    import torch

    from alignscan import reference as R
    rng = np.random.default_rng(seed)
    current = np.tile(np.arange(tokens), (n, 1))
    plan = []
    for _ in schedule:
        rows = []
        for row in current:
            k = R.keep_count(len(row), ratio, n_protected=1)
            others = row[row != cls_index]
            rows.append(np.sort(np.append(rng.choice(others, k - 1, replace=False), cls_index)))
        current = np.stack(rows)
        plan.append(torch.as_tensor(current, dtype=torch.int64))
    return plan


def _plan(selection, dense, cfg, x, schedule, ratio, marks, seed):
    if selection == "own":
        return None
    if selection == "dense":
        return dense_plan(dense, cfg, x, schedule, ratio)
    if selection == "random":
        return random_plan(len(x), dense.num_tokens, dense.cls_index, schedule, ratio, seed)
    if selection == "background":
        from alignscan.science.distance_task import background_plan
        return background_plan(marks, [ratio] * len(schedule), seed, dense.num_tokens, dense.cls_index)
    raise ValueError(f"selection must be own, dense, random or background, got {selection!r}")


def _row(task, mode, ratio, conv, selection, correct, metric="clip", **extra):
    return {"task": task, "mode": mode, "keep_ratio": ratio, "conv": conv, "selection": selection, "metric": metric,
            "finetuned": False, "top1": float(np.mean(correct)), "correct": int(np.sum(correct)),
            "images": int(len(correct)), "ci95": bootstrap_interval(correct), **extra}


def run_task(task, cfg, schedule, selections, out_dir, cache_dir, quick, seed, log):
    """The zero-shot grid of one task: rows, the correctness vectors behind them, and info."""
    cfg = replace(cfg, seed=seed)
    model, info = trained_model(cfg, cache_dir, log=log)
    log(f"{task} ViM (dim {cfg.embed_dim}, depth {cfg.depth}, position embedding {cfg.position_embedding}): "
        f"{'loaded from cache' if info['source'] == 'cache' else 'trained'} {info['path']}"
        + (f" ({info['train_seconds']:.0f} s)" if info.get("train_seconds") else ""))
    _, _, x_test, y_test = load_split(cfg)
    marks = None
    if task == "distance":
        from alignscan.science.distance_task import TEST, make_images
        _, _, marks = make_images(TEST, seed=2000 + cfg.split_seed)
    if quick:
        x_test, y_test = x_test[:64], y_test[:64]
        marks = None if marks is None else marks[:64]
    _, dense_correct, dense_predicted = evaluate(model, x_test, y_test, predictions=True)
    rows = [_row(task, "dense", 1.0, "-", "-", dense_correct)]
    correct = {("dense",): dense_correct}
    predicted = {("dense",): dense_predicted}
    ratios = (0.7, 0.3) if quick else KEEP_RATIOS
    jobs = [(s, c, r, m) for s in selections for c in CONVS for r in ratios for m in MODES]
    plans = {}
    for selection, conv, ratio, mode in progress_bar(jobs, desc=f"{task} zero-shot grid", leave=False):
        if (selection, ratio) not in plans:
            plans[(selection, ratio)] = _plan(selection, model, cfg, x_test, schedule, ratio, marks, seed=17)
        pruned = _pruned_copy(model, cfg, mode, ratio, "clip", schedule, conv)
        _, c, pred = evaluate(pruned, x_test, y_test, keep_plan=plans[(selection, ratio)], predictions=True)
        correct[(selection, conv, ratio, mode)] = c
        predicted[(selection, conv, ratio, mode)] = pred
        rows.append(_row(task, mode, ratio, conv, selection, c))
    per_image = {"labels": np.asarray(y_test), "predicted": predicted, "marks": marks, "indices": {}}
    if task == "distance":
        from alignscan.science.distance_task import TRAIN, make_images, pair_overlap
        _, _, train_marks = make_images(TRAIN, seed=1000 + cfg.split_seed)        # load_distance_split's draw
        info["test_pairs_seen_in_training"] = pair_overlap(train_marks[:cfg.train_subset or None], marks)
        rows += span_cells(model, cfg, schedule, x_test, y_test, marks, quick, correct, predicted, per_image["indices"])
    return model, cfg, info, (x_test, y_test), rows, correct, per_image


def far_to_near_share(labels, predicted):
    """Of the errors, the share that reads a far pair (label 1) as near (0)."""
    wrong = np.asarray(predicted) != np.asarray(labels)
    return float(np.mean(np.asarray(labels)[wrong] == 1)) if wrong.any() else None


def span_cells(model, cfg, schedule, x_test, y_test, marks, quick, correct, predicted, indices):
    """The span-controlled cells of the distance task (``distance_task.span_plans``): the same
    number of background tokens removed from each image, all inside the span joining the
    marks and the class token, or all outside it, on the images that have enough of both;
    every mode, both convs. Rows have selection "span_inside"/"span_outside" and ``removed``."""
    import torch

    from alignscan.science.distance_task import span_plans
    rows = []
    jobs = [(k, c, m) for k in (SPAN_REMOVED[:1] if quick else SPAN_REMOVED) for c in CONVS for m in MODES]
    plans = {}
    for removed, conv, mode in progress_bar(jobs, desc="distance span cells", leave=False):
        if removed not in plans:
            inside, outside, eligible = span_plans(marks, removed, seed=23, tokens=model.num_tokens,
                                                   cls_index=model.cls_index)
            plans[removed] = ({"inside": inside, "outside": outside}, eligible)
        sides, eligible = plans[removed]
        if len(eligible) == 0:
            continue
        x, y = x_test[eligible], y_test[eligible]
        pruned = _pruned_copy(model, cfg, mode, 1.0 - removed / model.num_tokens, "clip", schedule, conv)
        for side in SPAN_SIDES:
            kept = torch.as_tensor(sides[side])
            _, c, pred = evaluate(pruned, x, y, keep_plan=[kept] * len(schedule), predictions=True)
            key = (f"span_{side}", conv, removed, mode)
            correct[key], predicted[key], indices[key] = c, pred, eligible
            rows.append(_row("distance", mode, round(1.0 - removed / model.num_tokens, 4), conv, f"span_{side}", c,
                             removed=removed, far_to_near=far_to_near_share(np.asarray(y), pred)))
    return rows


def paired_rows(task, correct, ratios, selections):
    """Every pair of PAIRS in every cell, on the same images, with McNemar's exact p and the
    Holm-adjusted p over all of this task's comparisons (``p_holm``: the family-wise error of
    the whole table is held at the level). On the distance task also the span cells (``keep``
    is then the number of tokens removed) and, per mode, inside against outside on the same
    images (``a``/``b`` "align@inside"/"align@outside")."""
    out = []
    span = sorted({k[2] for k in correct if len(k) == 4 and str(k[0]).startswith("span_")})
    levels = [(s, ratios) for s in selections] + [(f"span_{side}", span) for side in SPAN_SIDES if span]
    for selection, values in levels:
        for conv in CONVS:
            for ratio in values:
                for a, b in PAIRS:
                    if (selection, conv, ratio, a) in correct and (selection, conv, ratio, b) in correct:
                        out.append({"task": task, "keep": ratio, "conv": conv, "selection": selection, "a": a, "b": b,
                                    **paired_counts(correct[(selection, conv, ratio, a)],
                                                    correct[(selection, conv, ratio, b)])})
    for conv in CONVS:
        for removed in span:
            for mode in MODES:
                inside, outside = ("span_inside", conv, removed, mode), ("span_outside", conv, removed, mode)
                if inside in correct and outside in correct:
                    out.append({"task": task, "keep": removed, "conv": conv, "selection": "span", "a": f"{mode}@inside",
                                "b": f"{mode}@outside", **paired_counts(correct[inside], correct[outside])})
    for row, adjusted in zip(out, holm([r["p_value"] for r in out])):
        row["p_holm"] = adjusted
        row["comparisons"] = len(out)
    return out


def save_per_image(path, task, per_image, seed):
    """Every image's prediction and correctness per cell (selection, conv, keep, mode), with
    the labels (and, on the distance task, the marks' patches), compressed, next to the
    JSON: any breakdown (by class, gap length, span) can be redone from it."""
    arrays = {"labels": per_image["labels"].astype(np.int16), "seed": np.array(seed)}
    if per_image.get("marks") is not None:
        arrays["marks"] = np.asarray(per_image["marks"]).astype(np.int16)
    for key, pred in per_image["predicted"].items():
        name = "dense" if key == ("dense",) else "|".join(str(k) for k in key)
        arrays[f"predicted/{name}"] = pred.astype(np.int16)
        if key in per_image.get("indices", {}):       # a cell on a subset of the test images (span cells)
            arrays[f"index/{name}"] = np.asarray(per_image["indices"][key]).astype(np.int16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def digits_extras(model, cfg, schedule, test, quick, log):
    """On digits: the importance metrics (align, own tokens), brief fine-tuning, fidelity."""
    x_test, y_test = test
    rows = []
    ratios = (0.7, 0.3) if quick else KEEP_RATIOS
    for metric in progress_bar((("clip", "raw") if quick else METRICS), desc="metrics", leave=False):
        for ratio in ratios:
            _, c = evaluate(_pruned_copy(model, cfg, "align", ratio, metric, schedule), x_test, y_test)
            rows.append(_row("digits", "align", ratio, "compact", "own", c, metric=metric, ablation="metric"))
    x_train, y_train, _, _ = load_split(cfg)
    ft_x, ft_y = (x_train[:128], y_train[:128]) if quick else (x_train, y_train)
    epochs = 1 if quick else 3
    for mode in FINETUNE_MODES:
        for ratio in ((ratios[-1],) if quick else FINETUNE_RATIOS):
            pruned = _pruned_copy(model, cfg, mode, ratio, "clip", schedule)
            start = time.perf_counter()
            train(pruned, ft_x, ft_y, replace(cfg, lr=cfg.lr / 4), epochs=epochs, desc=f"fine-tune {mode} keep {ratio}")
            _, c = evaluate(pruned, x_test, y_test)
            rows.append(dict(_row("digits", mode, ratio, "compact", "own", c), finetuned=True,
                             finetune_epochs=epochs, finetune_seconds=time.perf_counter() - start))
    return rows, fidelity_table(model, cfg, schedule, x_test, quick=quick)


def fidelity(dense, pruned, images):
    """Per layer after the first pruning: ||pruned - dense at the same tokens|| / ||dense there||."""
    import torch

    from alignscan.models import Recorder
    record_dense, record_pruned = Recorder(), Recorder()
    with torch.no_grad():
        dense(images, record=record_dense)
        pruned(images, record=record_pruned)
    trace_dense, trace_pruned = record_dense.trace, record_pruned.trace
    rows = []
    total = trace_dense[0][1].shape[1]
    for layer, ((_, out_d), (kept, out_p)) in enumerate(zip(trace_dense, trace_pruned), start=1):
        if kept.shape[1] == total:
            continue
        ref = torch.gather(out_d, 1, kept[..., None].expand(-1, -1, out_d.shape[-1]))
        rows.append({"layer": layer, "tokens": int(kept.shape[1]),
                     "rel_dev": float((out_p - ref).norm() / ref.norm())})
    return rows


def fidelity_table(digits_model, cfg, schedule, x_test, quick=False):
    """Fidelity of "align", "hold" and "relabel" on the trained digits ViM and on random-init
    ViM-S and PlainMamba-L3 (paper presets)."""
    import torch

    from alignscan import models
    out = {}
    cases = [("digits ViM (trained)", lambda mode: _pruned_copy(digits_model, cfg, mode, 0.7, "clip", schedule),
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
        out[label] = {mode: fidelity(dense, make(mode), images) for mode in ("align", "hold", "relabel")}
    return out


def run(out_dir, quick=False, cache_dir=None, seed=0, log=print, tasks=("digits", "distance")):
    """Every task's grid, the paired comparisons, the digits extras; JSON, Markdown, figures."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    configs = QUICK_CONFIGS if quick else TASK_CONFIGS
    result = {"quick": quick, "seed": seed, "rows": [], "paired": [], "tasks": {}, "fidelity": {},
              "spread": f"95% bootstrap intervals over the test images ({BOOTSTRAP} resamples); paired: exact McNemar "
                        f"test on the images two modes disagree on; training seed {seed}"}
    for task in tasks:
        cfg, schedule, selections = configs[task]
        model, cfg, info, test, rows, correct, per_image = run_task(task, cfg, schedule, selections, out_dir,
                                                                    cache_dir, quick, seed, log)
        out_dir.mkdir(parents=True, exist_ok=True)
        per_image_path = save_per_image(out_dir / f"zero_shot_images_{task}.npz", task, per_image, seed)
        ratios = sorted({r["keep_ratio"] for r in rows if r["mode"] != "dense"}, reverse=True)
        result["rows"] += rows
        result["paired"] += paired_rows(task, correct, ratios, selections)
        result["tasks"][task] = {"model": info, "schedule": list(schedule), "test_images": int(len(test[1])),
                                 "selections": list(selections), "per_image": per_image_path.name}
        if task == "digits":
            extra_rows, result["fidelity"] = digits_extras(model, cfg, schedule, test, quick, log)
            result["rows"] += extra_rows
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "zero_shot.json", result)
    write_text(out_dir / "zero_shot.md", markdown(result))
    result["figures"] = [str(plot(result, task, out_dir / f"zero_shot_{task}.png")) for task in tasks]
    return result
