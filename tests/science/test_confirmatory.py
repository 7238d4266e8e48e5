"""The pre-registered confirmatory test is well formed: fresh seeds and test images, and its
planning numbers are those of the five-seed run's per-image files (recomputed here); its
analysis tests the design on per-seed differences, and the quick run writes its entries, which
a reanalysis of the saved files reproduces."""

import numpy as np
import pytest
import torch
from scipy import stats

from alignscan.science.design import CONFIRMATORY, SEEDS
from tests import REPO

RESULTS = REPO / "docs" / "results" / "zero_shot"


def _per_seed_differences(pairs_label):
    """align - relabel accuracy (points) inside the span, compact conv, 8 removed, per seed."""
    out = []
    for seed in SEEDS:
        d = np.load(RESULTS / f"zero_shot_images_heldout_seed{seed}.npz")
        key = f"span_inside|{CONFIRMATORY['conv']}|{CONFIRMATORY['removed']}|"
        index = d["index/" + key + CONFIRMATORY["a"]]
        assert (index == d["index/" + key + CONFIRMATORY["b"]]).all()       # the same images for both
        labels = d["labels"][index]
        chosen = labels == pairs_label
        right = lambda mode: (d["predicted/" + key + mode][chosen] == labels[chosen]).mean()
        out.append(100 * (right(CONFIRMATORY["a"]) - right(CONFIRMATORY["b"])))
    return np.array(out)


def _power(effect, sd, n, alpha):
    df = n - 1
    critical = stats.t.ppf(1 - alpha, df)
    return 1 - stats.nct.cdf(critical, df, abs(effect) / (sd / np.sqrt(n)))


def test_fresh_seeds_and_a_fresh_test_draw():
    assert not set(CONFIRMATORY["seeds"]) & set(SEEDS)
    assert CONFIRMATORY["test_images_seed"] != 2000          # the draw of every earlier run
    assert [h["name"] for h in CONFIRMATORY["hypotheses"]] == ["H1", "H2"]


def test_the_planning_numbers_are_the_five_seed_runs():
    plan = CONFIRMATORY["planning"]
    far, near = _per_seed_differences(1), _per_seed_differences(0)        # labels: 1 far, 0 near
    assert len(far) == plan["seeds_in_run"]
    assert round(far.mean(), 2) == plan["far_mean"] and round(far.std(ddof=1), 2) == plan["far_sd"]
    assert round(near.mean(), 2) == plan["near_mean"] and round(near.std(ddof=1), 2) == plan["near_sd"]
    n, alpha = len(CONFIRMATORY["seeds"]), CONFIRMATORY["alpha"] / 2        # Holm: the first must beat alpha/2
    assert round(_power(plan["far_mean"], plan["far_sd"], n, alpha), 2) == plan["power_h1"]
    assert _power(plan["near_mean"], plan["near_sd"], n, alpha) > plan["power_h2"]
    assert _power(plan["far_mean"], plan["far_sd"], n - 1, alpha) < 0.8 <= _power(plan["far_mean"], plan["far_sd"], n,
                                                                                   alpha)


def _cells(diffs_by_side):
    """Made-up cells of one seed whose align - relabel accuracy (points) on far and near pairs
    inside and outside the span is the given one: 50 far and 50 near images per side."""
    from alignscan.science.confirmatory import cell
    labels = np.r_[np.ones(50, int), np.zeros(50, int)]
    cells = {}
    for side, (far, near) in diffs_by_side.items():
        right = {"relabel": np.r_[np.arange(50) < 30, np.arange(50) < 30]}
        right["align"] = np.r_[np.arange(50) < 30 + far // 2, np.arange(50) < 30 + near // 2]     # 2 points an image
        for mode in ("align", "relabel", "self", "hold"):
            correct = right.get(mode, right["relabel"])
            cells[cell(side, mode)] = (labels, np.where(correct, labels, 1 - labels))
    return cells


def test_analyse_tests_the_design_on_per_seed_differences():
    from alignscan.science.confirmatory import analyse
    from alignscan.stats import holm, t_test_power
    plan = {10: ((8, -6), (0, 2)), 11: ((2, -4), (2, 0)), 12: ((12, -6), (-2, 0)), 13: ((4, -2), (0, -2))}
    per_seed = [(s, _cells({"inside": d[0], "outside": d[1]})) for s, d in plan.items()]
    summaries = [{"seed": s, "included": True, "training": {"epochs": 6}} for s in plan]
    summaries.append({"seed": 14, "included": False, "training": {"epochs": 18, "validation_accuracy": [0.5, 0.9]}})
    out = analyse(per_seed, summaries)
    assert out["seeds"] == [10, 11, 12, 13] and out["seeds_run"] == [10, 11, 12, 13, 14]
    assert out["missed_bar"] == [{"seed": 14, "epochs": 18, "validation_accuracy": [0.5, 0.9]}]
    far, near = (np.array([d[0][k] for d in plan.values()], float) for k in (0, 1))
    assert out["per_seed"]["inside"]["far"]["differences"] == pytest.approx(far)
    assert out["per_seed"]["inside"]["near"]["differences"] == pytest.approx(near)
    assert out["per_seed"]["inside"]["far"]["images"] == [50] * 4
    h1, h2 = out["hypotheses"]
    assert h1["name"] == "H1" and h1["p"] == pytest.approx(stats.ttest_1samp(far, 0, alternative="greater").pvalue)
    assert h2["name"] == "H2" and h2["p"] == pytest.approx(stats.ttest_1samp(near, 0, alternative="less").pvalue)
    assert [h1["p_holm"], h2["p_holm"]] == pytest.approx(holm([h1["p"], h2["p"]]))
    for h in (h1, h2):
        assert h["verdict"] == ("supported" if h["p_holm"] < 0.05 else "not supported")
    outside = {e["pairs"]: e for e in out["equivalence"]}
    d_far = np.array([d[1][0] for d in plan.values()], float)
    assert outside["far"]["p_lower"] == pytest.approx(stats.ttest_1samp(d_far, -2.0, alternative="greater").pvalue)
    assert outside["far"]["p_upper"] == pytest.approx(stats.ttest_1samp(d_far, 2.0, alternative="less").pvalue)
    assert outside["far"]["verdict"] == ("equivalent within ±2 points" if outside["far"]["p"] < 0.05
                                         else "not shown equivalent")
    assert out["power"]["seeds"] == 4 and out["power"]["alpha_one_sided"] == 0.025
    assert out["power"]["H1"] == pytest.approx(_power(6.28, 7.50, 4, 0.025)) == t_test_power(6.28, 7.5, 4, 0.025)
    assert out["power"]["planned"] == {"seeds": 14, "H1": 0.83, "H2": 0.999}
    one = analyse(per_seed[:1], summaries[:1])                # one seed: no test, said so
    assert all(h["verdict"].startswith("no test") for h in one["hypotheses"]) and np.isnan(one["power"]["H1"])


def test_the_new_test_draw_holds_held_out_pairs_and_no_earlier_image():
    from alignscan.science.distance_task import load_distance_split, pair_pools, redrawn_test_split
    x, y, marks = redrawn_test_split(CONFIRMATORY["test_images_seed"], n=200)
    train_pairs, test_pairs = pair_pools(0)
    held = {tuple(p) for p in test_pairs.tolist()}
    assert x.shape == (200, 1, 32, 32) and all(tuple(p) in held for p in marks.tolist())
    assert ((marks[:, 1] - marks[:, 0] > 19) == y.numpy().astype(bool)).all()
    _, _, earlier_x, _ = load_distance_split(0, held_out=True)
    assert not any(torch.equal(a, b) for a in x[:50] for b in earlier_x[:200])
    again, _, _ = redrawn_test_split(CONFIRMATORY["test_images_seed"])
    assert torch.equal(again[:200], x)                                       # the first n of the whole draw


def test_the_quick_confirmatory_run_writes_both_entries_and_reanalyse_reproduces_them(tmp_path):
    import json
    import subprocess
    import sys

    from alignscan.science.zero_shot import QUICK_CONFIRMATORY, load_gap_decay, per_image_predictions, reanalyse
    from tests.science.helpers import _run
    _run("zero-shot", "--confirmatory", "--jobs", "2", "--threads", "2", tmp_path=tmp_path)
    result = json.loads((tmp_path / "zero_shot.json").read_text())
    entry, delta = result["confirmatory"], result["delta"]
    seeds = list(QUICK_CONFIRMATORY["seeds"])
    assert entry["seeds"] == entry["seeds_run"] == seeds and entry["missed_bar"] == []
    assert entry["run"]["wall_seconds"] > 0 and entry["run"]["machine"]["cpus"] >= 1
    assert [h["name"] for h in entry["hypotheses"]] == ["H1", "H2"] and len(entry["equivalence"]) == 2
    assert {"p", "p_holm", "verdict", "mean", "t95"} <= set(entry["hypotheses"][0])
    assert entry["power"]["seeds"] == 2 and entry["design"]["seeds"] == list(CONFIRMATORY["seeds"])
    # The cells evaluated are the design's and nothing more; the differences are the files'.
    for m in result["per_seed"]["heldout"]:
        saved = np.load(tmp_path / m["per_image"])
        cells = sorted(k for k in saved.files if k.startswith("predicted/"))
        assert cells == sorted(["predicted/dense"] + [f"predicted/span_{side}|compact|8|{mode}"
                                                      for side in ("inside", "outside")
                                                      for mode in ("align", "relabel", "self", "hold")])
        assert saved["labels"].shape == (QUICK_CONFIRMATORY["test_images"],)
        cells = per_image_predictions(tmp_path / m["per_image"])
        i = seeds.index(m["seed"])
        for side in ("inside", "outside"):
            for pairs, label in (("far", 1), ("near", 0)):
                truth, a = cells[(f"span_{side}", "compact", 8, "align")]
                _, b = cells[(f"span_{side}", "compact", 8, "relabel")]
                chosen = truth == label
                expected = 100 * ((a[chosen] == label).mean() - (b[chosen] == label).mean())
                assert entry["per_seed"][side][pairs]["differences"][i] == pytest.approx(expected)
        index, measures = load_gap_decay(tmp_path / m["gap_decay"])
        assert (index == saved["index/span_inside|compact|8|align"]).all()
        assert measures["layers"].tolist() == [3, 4, 5, 6] and (measures["pruned"] == 8).all()   # all inside
        assert measures["excess_log/align"].shape == (len(index), 4, 2)
    assert delta["seeds"] == seeds and delta["layers"] == [3, 4, 5, 6] and delta["modes"] == ["align", "self", "hold"]
    assert set(delta["excess"]["excess_log"]) == {"align", "self", "hold", "rule_prev", "rule_next"}
    assert delta["excess"]["excess_log"]["align"][0]["images"] == sum(
        len(load_gap_decay(tmp_path / m["gap_decay"])[0]) for m in result["per_seed"]["heldout"])
    assert set(delta["prediction"]["excess_log"]["align"]) == {"near", "all"}
    assert "explained_definition" in delta and "Confirmatory test" in (tmp_path / "zero_shot.md").read_text()
    # From the saved files alone: the same entries; a seed marked as having missed its bar is
    # left out of both and reported.
    before = {k: json.dumps(result[k], sort_keys=True) for k in ("confirmatory", "delta")}
    again = reanalyse(tmp_path)
    assert {k: json.dumps(again[k], sort_keys=True) for k in ("confirmatory", "delta")} == before
    written = json.loads((tmp_path / "zero_shot.json").read_text())
    assert {k: json.dumps(written[k], sort_keys=True) for k in ("confirmatory", "delta")} == before
    record = json.loads((tmp_path / "zero_shot_run.json").read_text())["zero_shot"]
    assert record["reanalysed"] and json.dumps(record["confirmatory"], sort_keys=True) == before["confirmatory"]
    written["per_seed"]["heldout"][1]["included"] = False
    (tmp_path / "zero_shot.json").write_text(json.dumps(written))
    fewer = reanalyse(tmp_path)
    assert fewer["confirmatory"]["seeds"] == seeds[:1] and fewer["delta"]["seeds"] == seeds[:1]
    assert [m["seed"] for m in fewer["confirmatory"]["missed_bar"]] == seeds[1:]
    assert np.isnan(fewer["confirmatory"]["power"]["H1"])
    bad = subprocess.run([sys.executable, "-m", "alignscan", "zero-shot", "--confirmatory", "--seeds", "0,1", "--quick",
                          "--out", str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--seeds" in bad.stderr and "--confirmatory" in bad.stderr
