"""The pre-registered confirmatory test (``design.CONFIRMATORY``), analysed from the per-image
predictions of its seeds: per seed align - relabel accuracy on far and near pairs inside and
outside the span, the one-sided t-tests of H1 and H2 with Holm's correction, the equivalence
tests outside, the power the seeds that reached the bar give at the planning numbers, and a
verdict per hypothesis. Nothing here chooses anything: every level comes from the design."""
from __future__ import annotations

import numpy as np

from alignscan.stats import holm, t_interval, t_test_one_sided, t_test_power, tost

from .design import CONFIRMATORY

__all__ = ["MODES", "PAIRS_LABELS", "cell", "seed_differences", "analyse"]

# What the run evaluates: the two modes the hypotheses compare, and the two whose gap decay
# the mechanism measurement needs beside align (``science.gap_decay``).
MODES = (CONFIRMATORY["a"], CONFIRMATORY["b"], "self", "hold")
PAIRS_LABELS = {"far": 1, "near": 0}          # the distance task's labels: 1 far, 0 near


def cell(side, mode, design=CONFIRMATORY):
    """The key of a span cell of the design in ``zero_shot.per_image_predictions``."""
    return (f"span_{side}", design["conv"], design["removed"], mode)


def _plain(value):
    """The design as JSON writes it (tuples as lists), so that a reanalysis compares equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def seed_differences(cells, design=CONFIRMATORY):
    """One seed's accuracies (points) of the design's a and b and their difference a - b, per
    side ("inside", "outside") and pairs ("far", "near"), with the number of images: from
    its cells {key: (labels, predictions)} (``zero_shot.per_image_predictions``)."""
    out = {}
    for side in ("inside", "outside"):
        labels, _ = cells[cell(side, design["a"], design)]
        for pairs, label in PAIRS_LABELS.items():
            chosen = labels == label
            accuracy = {}
            for mode in (design["a"], design["b"]):
                truth, predicted = cells[cell(side, mode, design)]
                if not np.array_equal(truth, labels):
                    raise ValueError(f"cells must hold the same images for {design['a']} and {mode} ({side})")
                accuracy[mode] = 100.0 * float(np.mean(predicted[chosen] == truth[chosen])) if chosen.any() \
                    else float("nan")
            out[(side, pairs)] = {"images": int(chosen.sum()), "accuracy": accuracy,
                                  "difference": accuracy[design["a"]] - accuracy[design["b"]]}
    return out


def _verdict(p, alpha):
    if not np.isfinite(p):
        return "no test (fewer than two seeds, or no spread between them)"
    return "supported" if p < alpha else "not supported"


def analyse(per_seed, summaries, design=CONFIRMATORY):
    """The "confirmatory" entry of a result.

    per_seed: [(seed, cells)] of the seeds that reached the training bar, cells as
    ``zero_shot.per_image_predictions`` gives them. summaries: every seed's summary of the
    run (seed, included, training), so that the seeds left out are reported with why."""
    alpha = design["alpha"]
    seeds = [s for s, _ in per_seed]
    by_seed = [seed_differences(cells, design) for _, cells in per_seed]
    out = {"design": _plain(design), "seeds_planned": [int(s) for s in design["seeds"]],
           "seeds_run": [m["seed"] for m in summaries], "seeds": seeds,
           "missed_bar": [{"seed": m["seed"], "epochs": (m.get("training") or {}).get("epochs"),
                           "validation_accuracy": (m.get("training") or {}).get("validation_accuracy")}
                          for m in summaries if not m["included"]],
           "units": "accuracy points (100 x fraction of the span cell's images of that kind right), per seed",
           "per_seed": {}, "hypotheses": [], "equivalence": []}
    for side in ("inside", "outside"):
        out["per_seed"][side] = {}
        for pairs in PAIRS_LABELS:
            rows = [d[(side, pairs)] for d in by_seed]
            out["per_seed"][side][pairs] = {
                "images": [r["images"] for r in rows], "differences": [r["difference"] for r in rows],
                **{mode: [r["accuracy"][mode] for r in rows] for mode in (design["a"], design["b"])}}
    for h in design["hypotheses"]:
        d = np.asarray(out["per_seed"][h["side"]][h["pairs"]]["differences"], float)
        mean, low, high = t_interval(d)
        out["hypotheses"].append({**_plain(h), "seeds": int(d.size), "mean": mean,
                                  "sd": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
                                  "t95": (low, high), "p": t_test_one_sided(d, h["direction"])})
    for h, adjusted in zip(out["hypotheses"], holm([h["p"] if np.isfinite(h["p"]) else 1.0
                                                    for h in out["hypotheses"]])):
        h["p_holm"] = adjusted if np.isfinite(h["p"]) else float("nan")
        h["verdict"] = _verdict(h["p_holm"], alpha)
    equivalence = design["equivalence"]
    for pairs in equivalence["pairs"]:
        d = np.asarray(out["per_seed"][equivalence["side"]][pairs]["differences"], float)
        test = tost(d, equivalence["margin_points"], equivalence["alpha"])
        out["equivalence"].append({"side": equivalence["side"], "pairs": pairs, "seeds": int(d.size),
                                   "sd": float(d.std(ddof=1)) if d.size > 1 else float("nan"), **test,
                                   "verdict": (f"equivalent within ±{equivalence['margin_points']:g} points"
                                               if test["equivalent"] else "not shown equivalent")})
    plan = design["planning"]
    first_step = alpha / len(design["hypotheses"])        # Holm's first step: the strictest level
    out["power"] = {"seeds": len(seeds), "alpha_one_sided": first_step,
                    "at": {"H1": {"mean": plan["far_mean"], "sd": plan["far_sd"]},
                           "H2": {"mean": plan["near_mean"], "sd": plan["near_sd"]}},
                    "H1": t_test_power(plan["far_mean"], plan["far_sd"], len(seeds), first_step),
                    "H2": t_test_power(plan["near_mean"], plan["near_sd"], len(seeds), first_step),
                    "planned": {"seeds": len(design["seeds"]), "H1": plan["power_h1"], "H2": plan["power_h2"]}}
    return out
