"""The digits data path, the weights cache (corrupt or mismatched files are retrained, never
used), and the zero-shot and visualize subcommands end to end in --quick mode."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from alignscan.science.design import MODES, PAIRS
from alignscan.science.digits import DigitsConfig, load_digits_split, trained_model, weights_digest
from alignscan.science.stats import bootstrap_interval
from alignscan.science.zero_shot import fidelity
from tests import REPO

TINY = DigitsConfig(embed_dim=16, depth=2, epochs=1, train_subset=64, batch_size=32)


def test_digits_split_is_fixed_and_well_formed():
    x_tr, y_tr, x_te, y_te = load_digits_split(32, 0)
    assert x_tr.shape == (1437, 1, 32, 32) and x_te.shape == (360, 1, 32, 32)
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    assert sorted(set(y_te.tolist())) == list(range(10))
    again = load_digits_split(32, 0)
    assert torch.equal(again[3], y_te)


def test_weights_are_cached_and_reused(tmp_path):
    model, info = trained_model(TINY, tmp_path, log=lambda *_: None)
    assert info["source"] == "trained" and Path(info["path"]).exists()
    again, info2 = trained_model(TINY, tmp_path, log=lambda *_: None)
    assert info2["source"] == "cache"
    assert weights_digest(again.state_dict()) == weights_digest(model.state_dict())


def test_corrupt_or_mismatched_cache_is_retrained_not_used(tmp_path):
    _, info = trained_model(TINY, tmp_path, log=lambda *_: None)
    path = Path(info["path"])
    messages = []
    path.write_bytes(path.read_bytes()[:200])                     # truncated file
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "unreadable" in info["reason"] and messages
    blob = torch.load(path, weights_only=True)                    # tampered weights, digest kept
    blob["state_dict"]["head.bias"] += 1.0
    torch.save(blob, path)
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "digest" in info["reason"]
    blob = torch.load(path, weights_only=True)                    # another configuration under this name
    blob["config"]["epochs"] = 99
    torch.save(blob, path)
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "configuration" in info["reason"]
    blob = torch.load(path, weights_only=True)                    # same config, digest consistent, but the
    blob["state_dict"]["head.extra"] = torch.zeros(2)             # model changed since: the weights do not fit
    blob["digest"] = weights_digest(blob["state_dict"])
    torch.save(blob, path)
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "trained" and "no longer fit" in info["reason"]
    _, info = trained_model(TINY, tmp_path, log=messages.append)
    assert info["source"] == "cache"                              # the retrained weights replaced it


def test_a_cache_that_cannot_be_written_warns_and_keeps_the_trained_model(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    messages = []
    model, info = trained_model(TINY, tmp_path / "a_file" / "cache", log=messages.append)
    assert info["source"] == "trained" and "cache_error" in info and model is not None
    assert any("could not cache" in m for m in messages)


def test_bootstrap_interval_brackets_the_accuracy():
    correct = np.array([True] * 80 + [False] * 20)
    lo, hi = bootstrap_interval(correct)
    assert lo < 0.8 < hi and hi - lo < 0.25


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


def _run(*args, tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan.bench", *args, "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_zero_shot_runs_the_tasks_named_and_rejects_others(tmp_path):
    _run("zero-shot", "--tasks", "distance", tmp_path=tmp_path)
    result = json.loads((tmp_path / "zero_shot.json").read_text())
    assert list(result["tasks"]) == ["distance"] and {p["task"] for p in result["paired"]} == {"distance"}
    assert not (tmp_path / "zero_shot_digits.png").exists()
    bad = subprocess.run([sys.executable, "-m", "alignscan.bench", "zero-shot", "--tasks", "digits,cifar", "--quick", "--out",
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


def test_span_plans_remove_the_same_number_of_background_tokens_inside_or_outside_the_span():
    from alignscan.science.distance_task import make_images, mark_tokens, pair_overlap, span, span_plans
    _, labels, marks = make_images(300, seed=5)
    tokens, cls = 65, 32
    for removed in (4, 12):
        inside, outside, eligible = span_plans(marks, removed, seed=1)
        assert len(eligible) > 100 and inside.shape == outside.shape == (len(eligible), tokens - removed)
        first, last = span(marks[eligible])
        special = np.concatenate([mark_tokens(marks[eligible]), np.full((len(eligible), 1), cls)], axis=1)
        for i in range(len(eligible)):
            for plan, where in ((inside, "inside"), (outside, "outside")):
                gone = np.setdiff1d(np.arange(tokens), plan[i])
                assert len(gone) == removed and np.all(np.diff(plan[i]) > 0)
                assert not np.isin(special[i], gone).any()                     # marks and class token stay
                within = (gone > first[i]) & (gone < last[i])
                assert within.all() if where == "inside" else not within.any()
        for i in np.setdiff1d(np.arange(len(marks)), eligible):                 # too few tokens on one side
            f, l = span(marks[i:i + 1])
            background = np.setdiff1d(np.arange(tokens), np.append(mark_tokens(marks[i]), cls))
            n_in = int(((background > f[0]) & (background < l[0])).sum())
            assert min(n_in, len(background) - n_in) < removed
    assert pair_overlap(marks[:100], marks[:100]) == 1.0 and pair_overlap(marks[:1], marks[1:2]) in (0.0, 1.0)


def test_holm_adjusts_in_step_down_order():
    from alignscan.science.stats import holm
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_mcnemar_exact_matches_the_binomial_tail():
    from alignscan.science.stats import mcnemar_exact, paired_counts
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == 2 / 2 ** 6                     # P(X = 0) + P(X = 6) for n = 6
    assert abs(mcnemar_exact(2, 10) - 2 * sum(__import__("math").comb(12, i) for i in range(3)) / 2 ** 12) < 1e-15
    assert mcnemar_exact(600, 500) < 0.01 and mcnemar_exact(1, 1000) < 1e-250
    counts = paired_counts([True, True, False, False, True], [True, False, True, False, False])
    assert (counts["both"], counts["only_a"], counts["only_b"], counts["neither"]) == (1, 2, 1, 1)


def test_background_plans_keep_the_marks_and_the_class_token_and_are_nested():
    from alignscan.science.distance_task import background_plan, make_images, mark_tokens
    images, labels, marks = make_images(20, seed=3)
    assert images.shape == (20, 1, 32, 32) and set(labels.tolist()) <= {0, 1}
    distance = marks[:, 1] - marks[:, 0]
    assert ((distance > 19) == (labels == 1)).all() and (np.abs(distance - 19) > 3).all()
    plan = background_plan(marks, [0.7, 0.5], seed=0)
    previous = None
    for stage in plan:
        for row, mark in zip(stage.numpy(), mark_tokens(marks)):
            assert 32 in row and set(mark.tolist()) <= set(row.tolist())
        if previous is not None:
            assert all(set(r.tolist()) <= set(q.tolist()) for r, q in zip(stage, previous))
        previous = stage


def test_visualize_quick_writes_figures(tmp_path):
    _run("visualize", tmp_path=tmp_path)
    figures = sorted(tmp_path.glob("visualize_*.png"))
    assert len(figures) == 3 and all(f.stat().st_size > 5000 for f in figures)


def test_visualize_with_a_vim_model_and_an_image(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    image = tmp_path / "in.png"
    plt.imsave(image, np.random.default_rng(0).random((40, 40, 3)))
    _run("visualize", "--model", "vim_tiny", "--image", str(image), tmp_path=tmp_path)
    assert (tmp_path / "visualize_0.png").exists()


def test_missing_image_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "alignscan.bench", "visualize", "--image", str(tmp_path / "nope.png"),
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "image must be an existing image file" in run.stderr
    assert "Traceback" not in run.stderr


def test_held_out_pairs_never_occur_in_training_and_keep_the_task_balanced():
    from alignscan.science.distance_task import THRESHOLD, distance_marks, pair_overlap, pair_pools
    train_pairs, test_pairs = pair_pools(0)
    assert not {tuple(p) for p in train_pairs.tolist()} & {tuple(p) for p in test_pairs.tolist()}
    assert 0.15 < len(test_pairs) / (len(train_pairs) + len(test_pairs)) < 0.25
    train, test = distance_marks("train", 0, held_out=True), distance_marks("test", 0, held_out=True)
    assert pair_overlap(train, test) == 0.0 and pair_overlap(distance_marks("validation", 0, True), test) == 0.0
    assert pair_overlap(distance_marks("train", 0), distance_marks("test", 0)) > 0.9       # the default task's shortcut
    far = (test[:, 1] - test[:, 0]) > THRESHOLD
    assert 0.45 < far.mean() < 0.55


def test_sign_test_and_t_interval():

    from alignscan.science.stats import sign_test, t_interval
    assert sign_test([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)          # 5 of 5 positive
    assert sign_test([0.1, -0.1, 0.0]) == 1.0 and sign_test([0.0, 0.0]) == 1.0
    d = [0.02, 0.05, -0.01, 0.04, 0.03]
    mean, low, high = t_interval(d)
    expected = scipy_stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=scipy_stats.sem(d))
    assert mean == pytest.approx(np.mean(d)) and (low, high) == pytest.approx(expected)
    assert np.isnan(t_interval([0.1])[1])


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


def test_the_sign_test_floor_and_the_t_test():
    from alignscan.science.stats import sign_test, sign_test_floor, t_test
    assert sign_test_floor(5) == 0.0625 == sign_test([0.1] * 5) and sign_test_floor(6) == 0.03125
    assert t_test([0.0, 0.0, 0.0]) == 1.0 and np.isnan(t_test([0.3]))
    assert np.isnan(t_test([-0.022, -0.022]))          # no spread between seeds: no test, not p = 0
    assert t_test([0.01, 0.03, 0.02]) == pytest.approx(scipy_stats.ttest_1samp([0.01, 0.03, 0.02], 0).pvalue)


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
    bad = subprocess.run([sys.executable, "-m", "alignscan.bench", "zero-shot", "--seeds", "0,x", "--quick", "--out",
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
