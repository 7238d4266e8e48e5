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


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_the_one_sided_t_test_is_scipys(alternative):
    from alignscan.stats import t_test_one_sided
    d = [6.1, -2.0, 11.5, 4.2, 9.9, 0.4]
    for null in (0.0, -2.0, 2.0):
        expected = scipy_stats.ttest_1samp(d, null, alternative=alternative).pvalue
        assert t_test_one_sided(d, alternative, null=null) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(t_test_one_sided([1.0], alternative)) and np.isnan(t_test_one_sided([0.0, 0.0], alternative))
    with pytest.raises(ValueError, match="alternative"):
        t_test_one_sided(d, "two-sided")


def test_tost_is_two_one_sided_scipy_tests_at_the_margins():
    from alignscan.stats import tost
    near_zero = [0.4, -0.8, 0.9, 0.1, -0.3, 0.6, -0.2, 0.5]
    result = tost(near_zero, margin=2.0, alpha=0.05)
    assert result["p_lower"] == pytest.approx(scipy_stats.ttest_1samp(near_zero, -2.0, alternative="greater").pvalue)
    assert result["p_upper"] == pytest.approx(scipy_stats.ttest_1samp(near_zero, 2.0, alternative="less").pvalue)
    assert result["p"] == max(result["p_lower"], result["p_upper"]) < 0.05 and result["equivalent"]
    low, high = result["interval"]                        # the 90 % interval lies inside the margins exactly then
    expected = scipy_stats.t.interval(0.90, len(near_zero) - 1, loc=np.mean(near_zero),
                                      scale=scipy_stats.sem(near_zero))
    assert (low, high) == pytest.approx(expected) and -2.0 < low < high < 2.0
    wide = tost([3.0, -4.0, 5.0, -1.0], margin=2.0)
    assert not wide["equivalent"] and wide["p"] >= 0.05 and not -2.0 < wide["interval"][0]
    assert not tost([0.0, 0.0, 0.0], margin=2.0)["equivalent"]          # no spread: nothing shown
    with pytest.raises(ValueError, match="margin"):
        tost(near_zero, margin=0.0)


def test_t_test_power_is_the_noncentral_t_and_what_simulated_tests_reject():
    from alignscan.stats import t_test_power
    power = t_test_power(6.28, 7.50, 14, 0.025)
    assert round(power, 2) == 0.83 and t_test_power(-6.28, 7.50, 14, 0.025) == power       # direction ignored
    rng = np.random.default_rng(0)
    samples = rng.normal(6.28, 7.50, size=(20000, 14))
    p = scipy_stats.ttest_1samp(samples, 0.0, axis=1, alternative="greater").pvalue
    assert abs(np.mean(p < 0.025) - power) < 0.015
    assert np.isnan(t_test_power(1.0, 1.0, 1, 0.05))
    with pytest.raises(ValueError, match="sd"):
        t_test_power(1.0, 0.0, 5, 0.05)


def test_rank_auc_is_the_roc_area_and_its_interval_brackets_it():
    from sklearn.metrics import roc_auc_score

    from alignscan.stats import rank_auc, rank_auc_interval
    rng = np.random.default_rng(1)
    positive, negative = rng.normal(0.7, 1, 40).round(1), rng.normal(0, 1, 90).round(1)     # rounded: ties
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(90)], np.r_[positive, negative])
    assert rank_auc(positive, negative) == pytest.approx(expected)
    low, high = rank_auc_interval(positive, negative, resamples=400)
    assert low < expected < high and high - low < 0.4
    assert rank_auc([2.0], [1.0]) == 1.0 and rank_auc([1.0], [1.0]) == 0.5 and np.isnan(rank_auc([], [1.0]))
    assert all(np.isnan(rank_auc_interval([], [1.0])))
