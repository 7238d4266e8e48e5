"""The gap decay (science.gap_decay): the measures of one scan on a hand-built case with known
Δ values, the same read from a pruned ViM's recorded forwards against a gap-by-gap loop over
the recorder's own scans, and the summary's AUC and explained fraction on made-up images
whose answer is known."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from alignscan.science.gap_decay import gap_measures, measure, scan_totals, summarise
from tests.science.helpers import TINY


def test_gap_measures_on_a_hand_built_scan_with_known_deltas():
    # One channel, two states (mean A = -2); 6 tokens, kept 0, 1, 4, 5: one gap of q = 2
    # (tokens 2 and 3) between kept token 1 (before) and 4 (after).
    dense = np.array([[[0.1, 0.2, 0.3, 0.5, 0.4, 0.6]]])
    A = np.array([[-1.0, -3.0]])
    positions = np.array([[0, 1, 4, 5]])
    pruned = np.array([[[0.1, 0.25, 0.45, 0.6]]])          # the pruned model's Δ at its 4 kept tokens
    out = gap_measures(dense, A, positions, {"align": (pruned, "prev"), "self": (pruned, "next"),
                                             "rule_prev": (None, "prev"), "rule_next": (None, "next")})
    first = {k: v[0, 0] for k, v in out.items()}
    assert np.isnan(out["q"][0, 1]) and first["q"] == 2                         # 2 slots (6 - 4), one gap
    # dense: the gap's steps 0.3 + 0.5 = 0.8, mean 0.4; before it Δ 0.2, after it 0.4
    assert first["log_ratio_prev"] == pytest.approx(np.log(0.2 / 0.4)) and first["share_prev_above"] == 0
    assert first["log_ratio_next"] == pytest.approx(0.0) and first["share_next_above"] == 0
    # align: -2 * 2 * 0.25 = -1.0 against the dense -2 * 0.8 = -1.6: excess +0.6 (decays less)
    assert first["excess_log/align"] == pytest.approx(0.6)
    assert first["excess_log/self"] == pytest.approx(-2 * 2 * 0.45 + 1.6)                   # -0.2: decays more
    assert first["excess_log/rule_prev"] == pytest.approx(-2 * 2 * 0.2 + 1.6)               # +0.8
    assert first["excess_log/rule_next"] == pytest.approx(-2 * 2 * 0.4 + 1.6)               # 0
    factor = np.mean([np.exp(a * 2 * 0.25) - np.exp(a * 0.8) for a in (-1.0, -3.0)])
    assert first["excess_factor/align"] == pytest.approx(factor)
    # Two rows, gaps of different counts; totals per scan: excesses summed, ratios averaged.
    dense2 = np.tile(dense, (2, 1, 1))
    positions2 = np.array([[0, 1, 4, 5], [0, 2, 3, 5]])                               # row 1: two gaps of 1
    out2 = gap_measures(dense2, A, positions2, {"rule_prev": (None, "prev")})
    assert out2["q"][1].tolist() == [1, 1]
    row1 = [-2 * (0.1 - 0.2), -2 * (0.5 - 0.4)]              # (Δ of kept token 0 - step of 1), (Δ of 3 - step of 4)
    assert out2["excess_log/rule_prev"][1] == pytest.approx(row1)
    totals = scan_totals(out2)
    assert totals["excess_log/rule_prev"][1] == pytest.approx(sum(row1)) and totals["pruned"].tolist() == [2, 2]
    assert totals["gaps"].tolist() == [1, 2]
    assert totals["log_ratio_prev"][1] == pytest.approx(np.mean([np.log(0.1 / 0.2), np.log(0.5 / 0.4)]))
    with pytest.raises(ValueError, match="rule"):
        gap_measures(dense, A, positions, {"align": (pruned, "before")})


def _tiny_vim(mode=None):
    from alignscan.models.pruning import PruningConfig
    from alignscan.science.digits import build_model
    cfg = replace(TINY, task="distance", depth=3)
    return build_model(cfg, pruning=None if mode is None else PruningConfig(mode=mode, schedule=(1,), keep_ratio=0.9))


def _loop_excess(record_dense, record_mode, kept, layer, branch, rule, tokens):
    """The excess log-decay of one image's scan summed over its gaps, gap by gap, from the
    recorders' own arguments (Δ = softplus(delta + bias)), the map's positions re-derived."""
    k = 2 * (layer - 1) + branch
    softplus = lambda scan: torch.nn.functional.softplus(scan["args"][1][0] + scan["args"][7][:, None]).detach().double()
    dense, own = softplus(record_dense.scans[k]), softplus(record_mode.scans[k])
    mean_A = record_dense.scans[k]["args"][2].double().mean(1)
    path = np.asarray(kept) if branch == 0 else tokens - 1 - np.asarray(kept)[::-1]
    total = 0.0
    for i in range(1, len(path)):
        q = path[i] - path[i - 1] - 1
        if q > 0:
            at = i - 1 if rule == "prev" else i
            steps = dense[:, path[i - 1] + 1:path[i]].sum(1)
            total += float((mean_A * (q * own[:, at] - steps)).mean())
    return total


def test_measure_reads_the_recorded_scans_of_both_branches():
    from alignscan.models import Recorder
    torch.manual_seed(0)
    dense = _tiny_vim().eval()
    pruned = {}
    for mode in ("align", "self", "hold"):
        pruned[mode] = _tiny_vim(mode)
        pruned[mode].load_state_dict(dense.state_dict())
        pruned[mode].eval()
    tokens = dense.num_tokens
    removed = [[5, 6, 7, 40], [10, 20, 21, 22], [3, 62, 63, 64]]       # row 2: 62-64 trail (lead the backward scan)
    kept = torch.as_tensor(np.stack([np.setdiff1d(np.arange(tokens), r) for r in removed]))
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    measures = measure(dense, pruned, x, [kept], batch_size=2)
    assert measures["layers"].tolist() == [2, 3]                        # pruned after layer 1 of 3
    assert measures["excess_log/align"].shape == (3, 2, 2)
    for branch in (0, 1):                                                # gaps are the same, read either way
        assert measures["pruned"][:, :, branch].tolist() == [[4, 4], [4, 4], [1, 1]]
        assert measures["gaps"][:, :, branch].tolist() == [[2, 2], [2, 2], [1, 1]]
    for row in range(3):
        records = {}
        for name, model, plan in (("dense", dense, None), *((m, pruned[m], [kept[row:row + 1]]) for m in pruned)):
            records[name] = Recorder()
            with torch.no_grad():
                model(x[row:row + 1], keep_plan=plan, record=records[name])
        for i, layer in enumerate((2, 3)):
            for branch in (0, 1):
                for mode, rule in (("align", "prev"), ("self", "next"), ("hold", "prev")):
                    expected = _loop_excess(records["dense"], records[mode], kept[row].numpy(), layer, branch, rule,
                                            tokens)
                    assert measures[f"excess_log/{mode}"][row, i, branch] == pytest.approx(expected, rel=1e-9,
                                                                                           abs=1e-12)
    with pytest.raises(ValueError, match="pruned"):
        measure(dense, {"relabel": dense}, x, [kept])


def test_summarise_finds_a_known_signal_and_a_known_explained_fraction():
    # Two seeds of 200 made-up near pairs (label 0) and 100 far pairs: align reads a near pair as
    # far exactly when its excess is below -1 (its state decayed more); relabel never errs.
    per_seed = []
    for seed in (3, 4):
        rng = np.random.default_rng(seed)
        labels = np.r_[np.zeros(200, int), np.ones(100, int)]
        excess = rng.normal(0.0, 1.0, 300)
        align = np.where((labels == 0) & (excess < -1.0), 1, labels)
        measures = {"layers": np.array([3, 4])}
        for mode in ("align", "self", "hold"):
            for name in ("excess_log", "excess_factor"):
                measures[f"{name}/{mode}"] = np.repeat(excess[:, None, None], 2, axis=1).repeat(2, axis=2)
        for name in ("log_ratio_prev", "share_prev_above", "log_ratio_next", "share_next_above"):
            measures[name] = np.zeros((300, 2, 2))
        cells = {"align": (labels, align), "self": (labels, labels), "hold": (labels, align), "relabel": (labels, labels)}
        per_seed.append((seed, measures, cells))
    out = summarise(per_seed, resamples=200)
    near = out["prediction"]["excess_log"]["align"]["near"]
    assert [p["auc"] for p in near["per_seed"]] == [1.0, 1.0] and near["mean_auc"] == 1.0
    assert all(p["errors"] == int(np.sum((s[2]["align"][0] == 0) & (s[2]["align"][1] == 1)))
               for p, s in zip(near["per_seed"], per_seed))
    assert np.isnan(out["prediction"]["excess_log"]["self"]["near"]["mean_auc"])        # self never errs
    every = out["prediction"]["excess_log"]["align"]["all"]        # far pairs with a low excess are among the rest
    assert 0.9 < every["mean_auc"] < 1.0 and all(p["others"] == 300 - p["errors"] for p in every["per_seed"])
    rows = [r for by_mode in out["prediction"].values() for by_population in by_mode.values()
            for r in by_population.values()]
    assert all(r["comparisons"] == len(rows) == 12 for r in rows)
    # Every extra error lies among the images that forget most: none in the fifth that forgets
    # least, so all of them are the excess's.
    explained = out["explained"]["excess_log"]["align"]
    for per in explained["per_seed"]:
        assert per["extra_error_by_fifth"][0] == 0 and per["extra_error_by_fifth"][-1] > 0.5
        assert per["fraction"] == 1.0 and per["ci95"] == (1.0, 1.0)
    assert explained["pooled"]["fraction"] == 1.0 and explained["pooled"]["mean_extra_error"] > 0
    assert explained["pooled"]["images"] == 400
    layers = out["excess"]["excess_log"]["align"]
    assert [r["layer"] for r in layers] == [3, 4] and layers[0]["images"] == 600
    assert layers[0]["per_seed_mean"] == pytest.approx([float(np.mean(s[1]["excess_log/align"][:, 0, 0]))
                                                        for s in per_seed])
    assert out["dense_delta"][0]["share_prev_above"] == 0.0
    # Extra errors spread evenly over the fifths: the excess explains none of them; twice the
    # rate in the other fifths as in the least-forgetting one: 1 - 0.1 / 0.18 of them.
    from alignscan.science.gap_decay import _fifths, _fraction
    bins_of = _fifths(np.arange(100.0))
    assert np.bincount(bins_of).tolist() == [20] * 5 and bins_of[-1] == 0          # highest excess: forgets least
    fifths = np.repeat(np.arange(5), 20)
    assert _fraction(np.tile([1.0, 0.0, 0.0, 0.0, 0.0], 20), fifths)[0] == pytest.approx(0.0)    # 4 in each fifth
    assert _fraction(np.repeat([0.1, 0.2, 0.2, 0.2, 0.2], 20), fifths)[0] == pytest.approx(1 - 0.1 / 0.18)
    assert np.isnan(_fraction(np.zeros(10), np.repeat(np.arange(5), 2))[0])
