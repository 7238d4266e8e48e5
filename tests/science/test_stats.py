"""The statistics of the experiments: bootstrap intervals, Holm's correction, the exact
McNemar test, the sign test and its floor, the t interval and test, against their
definitions and SciPy."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from alignscan.stats import bootstrap_interval


def test_bootstrap_interval_brackets_the_accuracy():
    correct = np.array([True] * 80 + [False] * 20)
    lo, hi = bootstrap_interval(correct)
    assert lo < 0.8 < hi and hi - lo < 0.25


def test_holm_adjusts_in_step_down_order():
    from alignscan.stats import holm
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_mcnemar_exact_matches_the_binomial_tail():
    from alignscan.stats import mcnemar_exact, paired_counts
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == 2 / 2 ** 6                     # P(X = 0) + P(X = 6) for n = 6
    assert abs(mcnemar_exact(2, 10) - 2 * sum(__import__("math").comb(12, i) for i in range(3)) / 2 ** 12) < 1e-15
    assert mcnemar_exact(600, 500) < 0.01 and mcnemar_exact(1, 1000) < 1e-250
    counts = paired_counts([True, True, False, False, True], [True, False, True, False, False])
    assert (counts["both"], counts["only_a"], counts["only_b"], counts["neither"]) == (1, 2, 1, 1)


def test_sign_test_and_t_interval():

    from alignscan.stats import sign_test, t_interval
    assert sign_test([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)          # 5 of 5 positive
    assert sign_test([0.1, -0.1, 0.0]) == 1.0 and sign_test([0.0, 0.0]) == 1.0
    d = [0.02, 0.05, -0.01, 0.04, 0.03]
    mean, low, high = t_interval(d)
    expected = scipy_stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=scipy_stats.sem(d))
    assert mean == pytest.approx(np.mean(d)) and (low, high) == pytest.approx(expected)
    assert np.isnan(t_interval([0.1])[1])


def test_the_sign_test_floor_and_the_t_test():
    from alignscan.stats import sign_test, sign_test_floor, t_test
    assert sign_test_floor(5) == 0.0625 == sign_test([0.1] * 5) and sign_test_floor(6) == 0.03125
    assert t_test([0.0, 0.0, 0.0]) == 1.0 and np.isnan(t_test([0.3]))
    assert np.isnan(t_test([-0.022, -0.022]))          # no spread between seeds: no test, not p = 0
    assert t_test([0.01, 0.03, 0.02]) == pytest.approx(scipy_stats.ttest_1samp([0.01, 0.03, 0.02], 0).pvalue)
