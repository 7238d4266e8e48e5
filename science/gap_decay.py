"""The mechanism behind the crossover, measured: how much a pruned gap's alignment decays the
state, against how much the dense model decayed it over the same tokens.

Across a gap of q pruned tokens (SPEC §1), a scan under "prev" (the paper's Eq. 6, mode
"align") multiplies the state by exp(A · q · Δ_prev), Δ_prev the step of the kept token before
the gap; "hold" decays it the same way (it also feeds the held input); "self" uses the Δ of the
kept token after the gap. The dense model, which saw the pruned tokens, decayed the same state
by exp(A · Σ Δ_j) over their own steps Δ_j. If importance or position makes Δ_prev larger than
the pruned tokens' steps, the aligned state forgets more than the dense one did, and a near
pair of marks looks far: the crossover the five-seed run showed.

Glossary (per image, layer, branch and gap; d channel, n state; in the scan order of the
branch: for ViM's backward branch "prev" is the kept token after the gap in raster order, SPEC §3):

    Δ          softplus(delta + delta_bias): the step the scan uses (read from ``models.Recorder``)
    q          pruned tokens in the gap
    log-decay  log of the state's decay factor across the gap, summarised over the states by
               mean_n A[d, n] and over the channels by their mean:
               aligned  mean_d mean_n(A[d]) · q · Δ_kept[d];  dense  mean_d mean_n(A[d]) · Σ_j Δ_j[d]
    excess     aligned log-decay - dense log-decay (negative: the aligned state decays more);
               ``excess_factor``: mean over (d, n) of exp(aligned) - exp(dense), which weighs the
               channels whose state survives the gap at all
    rule       the kept token whose Δ is used: "prev" (align, hold) or "next" (self); the
               "rule_prev"/"rule_next" rows put the dense model's own Δ at that kept token, so
               they isolate the rule from the drift of the pruned model's states

What is kept per image, layer and branch (``scan_totals``): each excess summed over the scan's
gaps (what the whole span loses), the dense Δ ratios averaged over them.

Leading and trailing pruned tokens (before the first or after the last kept token of a scan)
carry no state that an output reads, and are not gaps here.
"""
from __future__ import annotations

import numpy as np

from alignscan.stats import BOOTSTRAP, holm, rank_auc, rank_auc_interval, t_interval, t_test

__all__ = ["MODE_RULES", "MEASURES", "gap_measures", "measure", "scan_totals", "image_scores", "summarise"]

# Which kept token's Δ each mode advances a gap with (its own, from its own forward), and the
# two rules with the dense model's Δ at that token.
MODE_RULES = {"align": "prev", "hold": "prev", "self": "next", "rule_prev": "prev", "rule_next": "next"}
MEASURES = ("excess_log", "excess_factor")
DENSE_MEASURES = ("log_ratio_prev", "share_prev_above", "log_ratio_next", "share_next_above")
QUANTILES = (5, 25, 50, 75, 95)
BINS = 5            # the explained fraction's bins of extra forgetting (fifths of each seed's images)


def _gaps(positions, slots):
    """(after, q): for each row of ``positions`` (b, M) the compact index i >= 1 of the kept
    token that ends each gap (positions[i] - positions[i-1] > 1) and its number of pruned
    tokens q, padded to ``slots`` gaps per row (after 0, q 0: no gap)."""
    b, _ = positions.shape
    step = np.diff(positions, axis=1)
    after, q = np.zeros((b, slots), np.int64), np.zeros((b, slots), np.int64)
    for r in range(b):
        ends = np.flatnonzero(step[r] > 1) + 1
        after[r, :len(ends)], q[r, :len(ends)] = ends, step[r, ends - 1] - 1
    return after, q


def _at(values, index):
    """values (b, E, L) at per-row token indices (b, K) -> (b, E, K)."""
    return np.take_along_axis(values, index[:, None, :], axis=2)


def gap_measures(delta_dense, A, positions, kept_deltas, slots=None):
    """Every measure of one scan (one layer, one branch), per gap.

    delta_dense: (b, E, L) the dense model's Δ on the unpruned path, in the scan's order.
    A: (E, N) the scan's A (negative). positions: (b, M) the kept tokens' indices on that path
    (ascending). kept_deltas: {name: (Δ (b, E, M) of the model that scans the kept tokens,
    or None for the dense model's Δ at the kept tokens; rule "prev" or "next")}.
    slots: gaps per row in the output (default: the most pruned tokens a row can hold).

    Returns {"q": (b, K) pruned tokens per gap (0: no gap), "log_ratio_prev"/"_next": (b, K)
    mean over channels of log(Δ_kept / mean Δ of the gap's pruned tokens), dense Δ on both
    sides, "share_prev_above"/"_next_above": share of channels where that Δ_kept is larger,
    and per name of ``kept_deltas`` "excess_log/<name>" and "excess_factor/<name>" (see the
    module doc)}; NaN where a row has no gap in that slot."""
    delta_dense, A = np.asarray(delta_dense, np.float64), np.asarray(A, np.float64)
    positions = np.asarray(positions, np.int64)
    b, _, L = delta_dense.shape
    slots = L - positions.shape[1] if slots is None else slots
    after, q = _gaps(positions, slots)
    valid = q > 0
    prev_pos = np.take_along_axis(positions, np.maximum(after - 1, 0), axis=1)      # (b, K) kept token before
    next_pos = np.take_along_axis(positions, after, axis=1)                          # ... and after the gap
    cumulative = np.concatenate([np.zeros((b, delta_dense.shape[1], 1)), np.cumsum(delta_dense, axis=2)], axis=2)
    gap_sum = _at(cumulative, next_pos) - _at(cumulative, np.where(valid, prev_pos + 1, next_pos))   # (b, E, K)
    gap_mean = gap_sum / np.maximum(q, 1)[:, None, :]
    mean_A = A.mean(axis=1)[None, :, None]                                            # (1, E, 1)
    nan = np.where(valid, 0.0, np.nan)
    out = {"q": q.astype(np.float64)}
    with np.errstate(divide="ignore", invalid="ignore"):
        for rule, pos in (("prev", prev_pos), ("next", next_pos)):
            at_kept = _at(delta_dense, pos)
            out[f"log_ratio_{rule}"] = np.log(at_kept / gap_mean).mean(axis=1) + nan
            out[f"share_{rule}_above"] = (at_kept > gap_mean).mean(axis=1) + nan
    dense_decay = A[None, :, :, None] * gap_sum[:, :, None, :]                         # (b, E, N, K)
    for name, (deltas, rule) in kept_deltas.items():
        if rule not in ("prev", "next"):
            raise ValueError(f"kept_deltas[{name!r}] rule must be 'prev' or 'next', got {rule!r}")
        if deltas is None:
            kept = _at(delta_dense, prev_pos if rule == "prev" else next_pos)
        else:
            index = np.maximum(after - 1, 0) if rule == "prev" else after
            kept = _at(np.asarray(deltas, np.float64), index)
        aligned = q[:, None, :] * kept                                                 # (b, E, K) Σ of the gap's steps
        out[f"excess_log/{name}"] = (mean_A * (aligned - gap_sum)).mean(axis=1) + nan
        factor = np.exp(A[None, :, :, None] * aligned[:, :, None, :]) - np.exp(dense_decay)
        out[f"excess_factor/{name}"] = factor.mean(axis=(1, 2)) + nan
    out["q"] = out["q"] + nan
    return out


class _Deltas(list):
    """``Recorder.scans`` that keeps, of every scan, only Δ (b, E, L), A and the positions on
    the scan's path (None while unpruned), as float64 NumPy: a recorded forward of a whole
    test set would otherwise hold every scan's inputs."""

    def append(self, scan):
        import torch.nn.functional as F
        u, delta, A, *_, bias, softplus = scan["args"]
        delta = delta.detach().float() + bias.detach().float()[None, :, None]
        delta = F.softplus(delta, beta=1.0, threshold=20.0) if softplus else delta      # mamba's softplus (SPEC §1)
        pm = scan["position_map"]
        super().append((delta.double().numpy(), A.detach().double().numpy(),
                        None if pm is None else pm.positions.detach().cpu().numpy()))


def _recorded(model, x, plan):
    import torch

    from alignscan.models import Recorder
    record = Recorder(scans=_Deltas())
    with torch.no_grad():
        model(x, keep_plan=plan, record=record)
    return record.scans


def measure(dense, pruned, x, keep_plan, batch_size=64):
    """Per image, the gap measures (``gap_measures``) of every layer that scans a pruned
    sequence, both branches, from recorded forwards (``models.Recorder``) of the ``dense``
    model and of each ``pruned`` model ({mode: model}, modes of ``MODE_RULES``) on images
    ``x`` with the shared ``keep_plan`` (one (n, K) tensor per stage).

    Returns {"layers": (1-based layers measured,), name: (n, layers, 2 branches)}: the
    measures of ``gap_measures`` reduced over each scan's gaps by ``scan_totals``."""
    from alignscan.outputs import progress_bar
    modes = [m for m in MODE_RULES if not m.startswith("rule_")]
    if not pruned or any(m not in modes for m in pruned):
        raise ValueError(f"pruned must map one or more of the modes {modes} to models, got {list(pruned)}")
    parts, layers = [], None
    for start in progress_bar(range(0, len(x), batch_size), desc="gap decay", leave=False):
        rows = slice(start, start + batch_size)
        plan = [stage[rows] for stage in keep_plan]
        dense_scans = _recorded(dense, x[rows], None)
        own = {mode: _recorded(model, x[rows], plan) for mode, model in pruned.items()}
        first = next(iter(own.values()))
        scans = [k for k, (_, _, positions) in enumerate(first) if positions is not None]
        if not scans:
            raise ValueError("keep_plan must prune something: no layer of the pruned models scans a gap")
        if layers is None:
            layers = sorted({k // 2 + 1 for k in scans})
        tokens = dense_scans[0][0].shape[2]
        slots = tokens - min(first[k][2].shape[1] for k in scans)        # a gap holds at least one pruned token
        batch = {}
        for k in scans:
            delta_dense, A, _ = dense_scans[k]
            positions = first[k][2]
            for m in own:
                if not np.array_equal(own[m][k][2], positions):
                    raise ValueError(f"pruned models must scan the same tokens (the keep plan's); {m!r} does not")
            rules = {m: (own[m][k][0], MODE_RULES[m]) for m in own}
            rules.update({"rule_prev": (None, "prev"), "rule_next": (None, "next")})
            for name, values in gap_measures(delta_dense, A, positions, rules, slots).items():
                batch.setdefault(name, {})[k] = values
        parts.append(scan_totals({name: np.stack([np.stack([by_scan[2 * (layer - 1) + branch] for branch in (0, 1)],
                                                           axis=1) for layer in layers], axis=1)
                                  for name, by_scan in batch.items()}))
    return {"layers": np.asarray(layers), **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]}}


def scan_totals(per_gap):
    """Per image, layer and branch, from per-gap measures (..., gaps): each excess summed over
    the scan's gaps (the extra decay the whole span sees in that scan), the dense Δ ratios and
    shares averaged over them, "pruned" the pruned tokens in gaps and "gaps" their number."""
    out = {}
    for name, values in per_gap.items():
        values = np.asarray(values, np.float64)
        present = np.isfinite(values).any(axis=-1)
        if name == "q":
            out["pruned"] = np.nansum(values, axis=-1)
            out["gaps"] = np.isfinite(values).sum(axis=-1).astype(np.float64)
        elif name.startswith("excess"):
            out[name] = np.where(present, np.nansum(values, axis=-1), np.nan)
        else:
            count = np.isfinite(values).sum(axis=-1)
            out[name] = np.where(present, np.nansum(values, axis=-1) / np.maximum(count, 1), np.nan)
    return out


def image_scores(measures, name):
    """Per image, a measure of ``measure`` averaged over the layers and the two branches: (n,)."""
    return np.nanmean(np.asarray(measures[name], np.float64), axis=(1, 2))


def _at_layer(measures, name, i):
    """Per image, a measure at the i-th measured layer, averaged over the two branches: (n,)."""
    return np.nanmean(np.asarray(measures[name], np.float64)[:, i], axis=1)


def _distribution(values):
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"images": 0}
    return {"images": int(values.size), "mean": float(values.mean()), "share_negative": float(np.mean(values < 0)),
            "quantiles": {str(p): float(v) for p, v in zip(QUANTILES, np.percentile(values, QUANTILES))}}


def _fifths(excess, bins=BINS):
    """Each image's bin (0: the least extra forgetting, i.e. the highest excess) when the
    images are ranked by -excess and cut into ``bins`` groups as equal as the count allows."""
    ranks = np.empty(len(excess), np.int64)
    ranks[np.argsort(-np.asarray(excess, np.float64), kind="stable")] = np.arange(len(excess))
    return ranks * bins // max(len(excess), 1)


def _fraction(extra, bins_of):
    """(fraction, mean extra error per bin): 1 - (mean extra error in bin 0, the images that
    forget least beyond the dense model) / (mean extra error over all images): the share of
    the extra errors that would vanish if every image erred as bin 0 does (a population
    attributable fraction with bin 0 as reference). NaN where the mean extra error is zero or
    a bin is empty."""
    extra, bins_of = np.asarray(extra, np.float64), np.asarray(bins_of)
    rates = [float(extra[bins_of == b].mean()) if (bins_of == b).any() else float("nan") for b in range(BINS)]
    mean = extra.mean() if extra.size else 0.0
    fraction = 1.0 - rates[0] / mean if mean != 0 and np.isfinite(rates).all() else float("nan")
    return float(fraction), rates


def _percentile_interval(values):
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values.size else \
        (float("nan"), float("nan"))


def _prediction(per_seed, mode, measure_name, population, resamples):
    """Per seed, the AUC of an image's extra forgetting (-excess) for the images ``mode`` reads
    near as far against the rest of ``population`` ("near": the other near pairs; "all": every
    other image), with a bootstrap interval; across seeds the mean AUC, t-interval, t-test
    against 0.5."""
    per = []
    for seed, measures, cells in per_seed:
        labels, predicted = cells[mode]
        score = -image_scores(measures, f"{measure_name}/{mode}")
        flagged = (labels == 0) & (predicted == 1)
        rest = ((labels == 0) & ~flagged) if population == "near" else ~flagged
        low, high = rank_auc_interval(score[flagged], score[rest], seed=seed, resamples=resamples)
        per.append({"seed": seed, "errors": int(flagged.sum()), "others": int(rest.sum()),
                    "auc": rank_auc(score[flagged], score[rest]), "ci95": (low, high)})
    aucs = [p["auc"] for p in per if np.isfinite(p["auc"])]
    mean, low, high = t_interval(aucs)
    return {"per_seed": per, "seeds": len(aucs), "mean_auc": mean, "t95": (low, high),
            "p_t": t_test(np.asarray(aucs) - 0.5) if aucs else float("nan")}


def _explained(per_seed, mode, baseline, measure_name, resamples, rng):
    """``_fraction`` on the near pairs, the bins cut within each seed (each model's excess has
    its own scale): per seed (bootstrap over images) and pooled over the seeds (bootstrap over
    seeds)."""
    per, pooled = [], []
    for seed, measures, cells in per_seed:
        labels, predicted = cells[mode]
        near = labels == 0
        extra = (predicted[near] != 0).astype(float) - (cells[baseline][1][near] != 0).astype(float)
        excess = image_scores(measures, f"{measure_name}/{mode}")[near]
        bins_of = _fifths(excess)
        fraction, rates = _fraction(extra, bins_of)
        draws = [rng.integers(0, extra.size, extra.size) for _ in range(resamples)] if extra.size else []
        per.append({"seed": seed, "images": int(near.sum()),
                    "mean_extra_error": float(extra.mean()) if extra.size else float("nan"),
                    "mean_excess": float(excess.mean()) if excess.size else float("nan"),
                    "extra_error_by_fifth": rates, "fraction": fraction,
                    "ci95": _percentile_interval([_fraction(extra[d], bins_of[d])[0] for d in draws])})
        pooled.append((extra, bins_of))
    fraction, rates = _fraction(np.concatenate([e for e, _ in pooled]), np.concatenate([b for _, b in pooled]))
    draws = [rng.integers(0, len(pooled), len(pooled)) for _ in range(resamples)]
    boot = [_fraction(np.concatenate([pooled[j][0] for j in d]), np.concatenate([pooled[j][1] for j in d]))[0]
            for d in draws]
    extra = np.concatenate([e for e, _ in pooled])
    return {"per_seed": per, "pooled": {"fraction": fraction, "extra_error_by_fifth": rates, "images": int(extra.size),
                                        "mean_extra_error": float(extra.mean()) if extra.size else float("nan"),
                                        "ci95_seeds": _percentile_interval(boot)}}


def summarise(per_seed, modes=("align", "self", "hold"), baseline="relabel", resamples=BOOTSTRAP):
    """The "delta" entry of a confirmatory result from its seeds' measures and predictions.

    per_seed: [(seed, measures of ``measure``, {mode: (labels (n,), predictions (n,))} of the
    same images: the span cell the measures were taken on, for ``modes`` and ``baseline``)].

    Returns a dict with:
        dense_delta: per layer, over the images of every seed (each image: the mean over its
            gaps and both branches), log(Δ_kept / mean Δ of the gap's pruned tokens) on the
            dense model for the kept token before ("prev") and after ("next") the gap, and the
            mean share of channels where that Δ_kept is the larger.
        excess: per measure, mode (and "rule_prev"/"rule_next"), per layer: the distribution
            over images of the excess summed over the gaps (mean of the two branches): mean,
            share < 0 (the aligned state decays more), quantiles; each seed's mean and their
            t-interval.
        prediction: per measure and mode, whether an image's extra forgetting (its -excess,
            mean over layers and branches) singles out the images that mode reads near as far,
            by the AUC (P(such an image scores higher than another); 0.5: no signal; 2 AUC - 1
            is the rank-biserial) with a bootstrap interval per seed, among the near pairs
            ("near", the primary: same label) and among all images ("all"); across seeds the
            mean AUC, its t-interval and a t-test against 0.5, Holm over these rows.
        explained: per measure and mode, on the near pairs, the fraction of the mode's extra
            errors over ``baseline`` that the excess explains (``explained_definition``), with
            the mean extra error per bin of extra forgetting, per seed (bootstrap over images)
            and pooled over seeds (bootstrap over seeds).
    """
    layers = [int(v) for v in per_seed[0][1]["layers"]] if per_seed else []
    out = {"seeds": [s for s, _, _ in per_seed], "layers": layers, "modes": list(modes), "baseline": baseline,
           "resamples": resamples,
           "sign": "excess = aligned log-decay - dense log-decay across the gaps; negative: the aligned state decays "
                   "more than the dense one did over the same pruned tokens",
           "score": "per image: -excess, summed over a scan's gaps, mean over the layers and both branches (the "
                    "extra forgetting across the span)",
           "explained_definition": "near pairs; per image extra error = mode wrong - baseline wrong (1, 0, -1); "
                                   "within each seed the images ranked by extra forgetting (-excess) and cut into "
                                   f"{BINS} equal bins; explained fraction = 1 - (mean extra error of the bin that "
                                   "forgets least) / (mean extra error of all): the share of the extra errors that "
                                   "would vanish if every image erred as the images forgetting least beyond the "
                                   "dense model do (a population attributable fraction with that bin as reference)",
           "dense_delta": [], "excess": {}, "prediction": {}, "explained": {}}
    if not per_seed:
        return out
    for i, layer in enumerate(layers):
        row = {"layer": layer}
        for name in DENSE_MEASURES:
            pooled = np.concatenate([_at_layer(m, name, i) for _, m, _ in per_seed])
            row[name] = _distribution(pooled) if name.startswith("log_ratio") else \
                float(np.nanmean(pooled)) if np.isfinite(pooled).any() else float("nan")
        out["dense_delta"].append(row)
    rows = list(modes) + [r for r in ("rule_prev", "rule_next") if f"excess_log/{r}" in per_seed[0][1]]
    for measure_name in MEASURES:
        out["excess"][measure_name] = {}
        for mode in rows:
            per_layer = []
            for i, layer in enumerate(layers):
                values = [_at_layer(m, f"{measure_name}/{mode}", i) for _, m, _ in per_seed]
                means = [float(np.nanmean(v)) for v in values]
                _, low, high = t_interval(means)
                per_layer.append({"layer": layer, "rule": MODE_RULES[mode], **_distribution(np.concatenate(values)),
                                  "per_seed_mean": means, "seed_mean_t95": (low, high)})
            out["excess"][measure_name][mode] = per_layer
    rng = np.random.default_rng(0)
    tests = []
    for measure_name in MEASURES:
        out["prediction"][measure_name], out["explained"][measure_name] = {}, {}
        for mode in modes:
            out["prediction"][measure_name][mode] = {population: _prediction(per_seed, mode, measure_name, population,
                                                                             resamples)
                                                     for population in ("near", "all")}
            tests += out["prediction"][measure_name][mode].values()
            out["explained"][measure_name][mode] = _explained(per_seed, mode, baseline, measure_name, resamples, rng)
    for row, adjusted in zip(tests, holm([r["p_t"] if np.isfinite(r["p_t"]) else 1.0 for r in tests])):
        row["p_holm_t"], row["comparisons"] = adjusted, len(tests)
    return out
