"""The zero-shot experiment: per-layer fidelity, the across-seed contrasts and error
directions, the seed shown, and the zero-shot subcommand end to end in --quick mode."""
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from alignscan.science.design import MODES, PAIRS
from alignscan.science.zero_shot import fidelity
from tests import REPO
from tests.science.helpers import TINY, _run


def test_fidelity_is_zero_at_keep_one_and_positive_when_pruned():
    from alignscan.models.pruning import PruningConfig
    from alignscan.science.digits import build_model
    cfg = replace(TINY, depth=3)
    torch.manual_seed(0)
    dense = build_model(cfg).eval()
    x = torch.rand(2, 1, 32, 32)
    for ratio, check in ((1.0, lambda v: v < 1e-6), (0.5, lambda v: v > 0)):
        pruned = build_model(cfg, pruning=PruningConfig(mode="align", schedule=(1,), keep_ratio=ratio))
        pruned.load_state_dict(dense.state_dict())
        rows = fidelity(dense, pruned.eval(), x)
        if ratio < 1:
            assert [r["layer"] for r in rows] == [2, 3] and all(check(r["rel_dev"]) for r in rows)
        else:
            assert all(check(r["rel_dev"]) for r in rows)


def test_zero_shot_runs_the_tasks_named_and_rejects_others(tmp_path):
    _run("zero-shot", "--tasks", "distance", tmp_path=tmp_path)
    result = json.loads((tmp_path / "zero_shot.json").read_text())
    assert list(result["tasks"]) == ["distance"] and {p["task"] for p in result["paired"]} == {"distance"}
    assert not (tmp_path / "zero_shot_digits.png").exists()
    bad = subprocess.run([sys.executable, "-m", "alignscan", "zero-shot", "--tasks", "digits,cifar", "--quick", "--out",
                          str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tasks" in bad.stderr and "Traceback" not in bad.stderr


def test_zero_shot_quick_writes_paired_results_tables_and_figures(tmp_path):
    _run("zero-shot", tmp_path=tmp_path)
    result = json.loads((tmp_path / "zero_shot.json").read_text())
    assert result["quick"] is True
    rows = result["rows"]
    assert {r["task"] for r in rows} == {"digits", "distance"}
    assert {r["mode"] for r in rows} == {"dense", *MODES}
    assert any(r["finetuned"] for r in rows)
    paired = result["paired"]
    assert {p["selection"] for p in paired} >= {"dense", "random", "background", "own"}
    assert {p["conv"] for p in paired} == {"compact", "position_aware"}
    assert ("mask", "align") in PAIRS and ("align+fuse", "relabel+fuse") in PAIRS and ("released", "relabel") in PAIRS
    assert {(p["a"], p["b"]) for p in paired} == set(PAIRS) | {(f"{m}@inside", f"{m}@outside") for m in MODES}
    span_images = {(r["conv"], r["removed"]): r["images"] for r in rows if r["selection"].startswith("span_")}
    assert {r["selection"] for r in rows if "removed" in r} == {"span_inside", "span_outside"}
    assert 0 < result["tasks"]["distance"]["model"]["test_pairs_seen_in_training"] <= 1     # the shortcut, reported
    for p in paired:
        images = span_images[(p["conv"], p["keep"])] if p["selection"].startswith("span") else \
            result["tasks"][p["task"]]["test_images"]
        assert p["both"] + p["only_a"] + p["only_b"] + p["neither"] == images
        assert 0.0 <= p["p_value"] <= p["p_holm"] <= 1.0               # Holm never lowers a p-value
        assert p["comparisons"] == sum(q["task"] == p["task"] for q in paired)
    for task in ("digits", "distance"):
        saved = np.load(tmp_path / result["tasks"][task]["per_image"])
        n = result["tasks"][task]["test_images"]
        assert saved["labels"].shape == (n,) and saved["predicted/dense"].shape == (n,)
        cells = [k for k in saved.files if k.startswith("predicted/") and k != "predicted/dense"]
        assert len(cells) == sum(r["task"] == task and not r["finetuned"] and "ablation" not in r
                                 and r["mode"] != "dense" for r in rows)
        for r in rows:                                                   # the per-image file reproduces the table
            if r["task"] == task and not r["finetuned"] and "ablation" not in r and r["mode"] != "dense":
                level = r["removed"] if "removed" in r else r["keep_ratio"]
                key = f"{r['selection']}|{r['conv']}|{level}|{r['mode']}"
                labels = saved["labels"][saved[f"index/{key}"]] if "removed" in r else saved["labels"]
                assert abs((saved[f"predicted/{key}"] == labels).mean() - r["top1"]) < 1e-12
    assert set(result["fidelity"]) == {"digits ViM (trained)", "vim_small (random init)",
                                       "plainmamba_l3 (random init)"}
    for modes in result["fidelity"].values():          # every mode on the same tokens
        assert modes["selection"].startswith("shared")
        assert [r["tokens"] for r in modes["align"]] == [r["tokens"] for r in modes["hold"]] \
            == [r["tokens"] for r in modes["relabel"]]
    for task in ("digits", "distance"):
        assert (tmp_path / f"zero_shot_{task}.png").stat().st_size > 1000
    table = (tmp_path / "zero_shot.md").read_text()
    assert "Smoke test" in table and "McNemar" in table and "p Holm" in table and "Span-controlled" in table


def test_across_seeds_tests_the_primary_alone_and_holm_corrects_the_rest():
    from alignscan.science.design import PRIMARY
    from alignscan.science.zero_shot import across_seeds
    rng = np.random.default_rng(0)
    per_seed = []
    for seed, (a_in, b_in, a_out, b_out) in enumerate([(0.9, 0.7, 0.8, 0.8), (0.85, 0.75, 0.8, 0.79),
                                                         (0.9, 0.8, 0.7, 0.72)]):
        correct = {}
        for conv in ("compact", "position_aware"):
            for side, a, b in (("inside", a_in, b_in), ("outside", a_out, b_out)):
                n = 100
                correct[(f"span_{side}", conv, 8, "align")] = np.arange(n) < round(a * n)
                correct[(f"span_{side}", conv, 8, "relabel")] = rng.permutation(np.arange(n) < round(b * n))
        correct[("background", "compact", 0.5, "align")] = np.arange(50) < 40 - seed       # 0.8, 0.78, 0.76
        correct[("background", "compact", 0.5, "relabel")] = np.arange(50) < 30             # 0.6
        per_seed.append((seed, correct))
    rows = across_seeds("heldout", per_seed)
    primary = [r for r in rows if r["primary"]]
    assert len(primary) == 1 and primary[0]["conv"] == PRIMARY["conv"] and "@inside" in primary[0]["contrast"]
    assert primary[0]["differences"] == pytest.approx([0.2, 0.1, 0.1]) and "p_holm" not in primary[0]
    assert primary[0]["p_sign"] == pytest.approx(0.25)                               # 3 of 3 positive
    asym = next(r for r in rows if r["conv"] == "compact" and "@inside - @outside" in r["contrast"])
    assert asym["differences"] == pytest.approx([0.2, 0.09, 0.12])
    grid = [r for r in rows if r["selection"] == "background"]
    assert len(grid) == 1 and grid[0]["keep_ratio"] == 0.5 and grid[0]["contrast"] == "align - relabel"
    assert grid[0]["differences"] == pytest.approx([0.2, 0.18, 0.16])
    assert grid[0]["p_t"] == pytest.approx(scipy_stats.ttest_1samp([0.2, 0.18, 0.16], 0).pvalue)
    assert grid[0]["p_t"] < 0.05 < grid[0]["p_sign"]                 # 3 seeds: the sign test cannot reject
    assert all(r["sign_test_floor"] == 0.25 for r in rows)
    others = [r for r in rows if not r["primary"]]
    assert len(others) == 6 and all(r["comparisons"] == 6 for r in others)
    assert all(r["p_holm"] >= r["p_sign"] and r["p_holm_t"] >= r["p_t"] for r in others)


def test_error_directions_give_each_seeds_far_to_near_shares_and_their_differences():
    from alignscan.science.zero_shot import error_directions, far_to_near_share
    labels = np.array([1] * 10 + [0] * 10)             # 1: far, 0: near

    def reading(far_as_near, near_as_far):             # predictions with that many errors of each kind
        predicted = labels.copy()
        predicted[:far_as_near] = 0
        predicted[10:10 + near_as_far] = 1
        return labels, predicted
    errors = {  # seed: {(side, mode): (far read as near, near read as far)}
        0: {("inside", "relabel"): (4, 1), ("inside", "align"): (1, 1), ("outside", "relabel"): (1, 1),
            ("outside", "align"): (1, 1)},
        1: {("inside", "relabel"): (3, 1), ("inside", "align"): (1, 3), ("outside", "relabel"): (2, 2),
            ("outside", "align"): (1, 3)},
        2: {("inside", "relabel"): (6, 0), ("inside", "align"): (0, 0), ("outside", "relabel"): (1, 3),
            ("outside", "align"): (2, 2)},
    }
    per_seed = [(seed, {(f"span_{side}", "compact", 8, mode): reading(*e) for (side, mode), e in cells.items()})
                for seed, cells in errors.items()]
    rows = error_directions("heldout", per_seed)
    assert [r["side"] for r in rows] == ["inside", "outside", "inside - outside"]
    inside, outside, asym = rows
    assert inside["share"]["relabel"] == pytest.approx([0.8, 0.75, 1.0])
    assert inside["share"]["align"][:2] == pytest.approx([0.5, 0.25]) and inside["share"]["align"][2] is None
    assert inside["seeds"] == [0, 1] and inside["differences"] == pytest.approx([0.3, 0.5])   # seed 2: no align error
    assert outside["seeds"] == [0, 1, 2] and outside["differences"] == pytest.approx([0.0, 0.25, -0.25])
    assert asym["seeds"] == [0, 1] and asym["differences"] == pytest.approx([0.3, 0.25])
    assert far_to_near_share(*reading(4, 1)) == pytest.approx(0.8)
    for r in rows:
        assert r["mean"] == pytest.approx(np.mean(r["differences"])) and r["comparisons"] == 3
        assert r["p_t"] == pytest.approx(scipy_stats.ttest_1samp(r["differences"], 0).pvalue)
        assert r["p_holm_t"] >= r["p_t"]
    assert error_directions("digits", [(0, {("own", "compact", 0.5, "align"): reading(1, 1)})]) == []


def test_the_shown_seed_is_the_first_that_reached_its_bar():
    from alignscan.science.zero_shot import shown_seed
    assert shown_seed((0, 1, 2), {1: True}) is None                  # seed 0 not finished: not known yet
    assert shown_seed((0, 1, 2), {0: False, 1: True}) == 1
    assert shown_seed((0, 1, 2), {0: False, 1: False, 2: False}) == 2   # none reached it: the last
    assert shown_seed((3,), {3: True}) == 3


def test_zero_shot_across_seeds_on_the_held_out_task(tmp_path):
    _run("zero-shot", "--tasks", "heldout", "--seeds", "0,1", "--jobs", "2", "--threads", "2", tmp_path=tmp_path)
    result = json.loads((tmp_path / "zero_shot.json").read_text())
    assert result["jobs"] == {"processes": 2, "threads_each": 1} and result["wall_seconds"] > 0
    assert result["seeds"] == [0, 1] and [m["seed"] for m in result["per_seed"]["heldout"]] == [0, 1]
    for m in result["per_seed"]["heldout"]:
        assert m["test_pairs_seen_in_training"] == 0.0
        training = m["training"]
        assert training["bar"] == 0.99 and training["epochs"] <= 2 and m["included"] == training["reached_bar"]
        assert len(training["validation_accuracy"]) == training["epochs"]             # 1 epoch, then 1 extra
        shuffled = m["dense_shuffled_positions"]
        assert shuffled["permutations"] == len(shuffled["shuffled"]) == 3 and 0 <= shuffled["shuffled_mean"] <= 1
        assert (tmp_path / m["per_image"]).exists() and m["per_image"].endswith(f"_seed{m['seed']}.npz")
    assert {r["seed"] for r in result["rows"]} == {0, 1} and {p["seed"] for p in result["paired"]} == {0, 1}
    for p in result["paired"]:
        assert p["comparisons"] == sum(q["seed"] == p["seed"] for q in result["paired"])
    assert "Training seeds" in (tmp_path / "zero_shot.md").read_text()
    # The across-seed contrasts redone from the per-image files alone (both seeds counted as
    # included) equal the differences of the rows the run computed.
    from alignscan.science.zero_shot import reanalyse
    for m in result["per_seed"]["heldout"]:
        m["included"] = True
    (tmp_path / "zero_shot.json").write_text(json.dumps(result))
    again = reanalyse(tmp_path)
    top1 = {(r["seed"], r["selection"], r["conv"], r["removed"], r["mode"]): r["top1"]
            for r in result["rows"] if "removed" in r}
    contrasts = [r for r in again["across_seeds"] if r["selection"] == "span" and "@inside - @outside" not in r["contrast"]]
    assert {r["contrast"].split(" @")[0] for r in contrasts} == {"align - relabel", "align+fuse - relabel+fuse",
                                                                "align+merge - relabel+merge"}
    for r in contrasts:
        (a, b), side = r["contrast"].split(" @")[0].split(" - "), r["contrast"].split(" @")[1]
        expected = [top1[(s, f"span_{side}", r["conv"], r["removed"], a)] - top1[(s, f"span_{side}", r["conv"],
                                                                                  r["removed"], b)] for s in (0, 1)]
        assert r["differences"] == pytest.approx(expected)
    grid_top1 = {(r["seed"], r["conv"], r["keep_ratio"], r["mode"]): r["top1"] for r in result["rows"]
                 if r["selection"] == "background"}
    grid = [r for r in again["across_seeds"] if r["selection"] == "background"]
    assert {r["keep_ratio"] for r in grid} == {0.7, 0.3}
    for r in grid:
        a, b = r["contrast"].split(" - ")
        assert r["differences"] == pytest.approx([grid_top1[(s, r["conv"], r["keep_ratio"], a)]
                                                  - grid_top1[(s, r["conv"], r["keep_ratio"], b)] for s in (0, 1)])
    assert sum(r["primary"] for r in again["across_seeds"]) == 0          # quick: 4 removed only, not the primary's 8
    # The error directions from the per-image files are the run's own far-to-near shares.
    shares = {(r["seed"], r["selection"], r["conv"], r["removed"], r["mode"]): r["far_to_near"]
              for r in result["rows"] if "removed" in r}
    directions = [r for r in again["error_directions"] if r["side"] in ("inside", "outside")]
    assert directions and {r["task"] for r in again["error_directions"]} == {"heldout"}
    for r in directions:
        for mode, values in r["share"].items():
            assert values == pytest.approx([shares[(s, f"span_{r['side']}", r["conv"], r["removed"], mode)]
                                            for s in r["share_seeds"]], nan_ok=True)
    assert "Error directions across seeds" in (tmp_path / "zero_shot.md").read_text()
    assert "Across the 2 included seeds" in (tmp_path / "zero_shot.md").read_text()
    record = json.loads((tmp_path / "zero_shot_run.json").read_text())["zero_shot"]
    assert record["reanalysed"] and len(record["across_seeds"]) == len(again["across_seeds"])
    bad = subprocess.run([sys.executable, "-m", "alignscan", "zero-shot", "--seeds", "0,x", "--quick", "--out",
                          str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--seeds" in bad.stderr
    # One job after the other in this process, from the models the two workers cached, one
    # thread as each worker had: the same rows and paired tests.
    import numba

    from alignscan.science import zero_shot
    threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        alone = zero_shot.run(tmp_path / "one", quick=True, cache_dir=tmp_path / "cache", tasks=("heldout",),
                              seeds=(0, 1), jobs=1)
    finally:
        numba.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    assert alone["jobs"] == {"processes": 1, "threads_each": 1}
    alone = json.loads(json.dumps(alone, default=str))                     # as written: tuples become lists
    assert alone["rows"] == result["rows"] and alone["paired"] == result["paired"]
    with pytest.raises(ValueError, match="jobs"):
        zero_shot.run(tmp_path / "two", quick=True, jobs=0)
