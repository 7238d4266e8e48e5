"""The pre-registered confirmatory test is well formed: fresh seeds and test images, and its
planning numbers are those of the five-seed run's per-image files (recomputed here)."""

import numpy as np
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
