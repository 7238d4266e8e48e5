"""The statistics of the experiments: exact paired tests on the same images, bootstrap
intervals, and Holm's correction for the many comparisons a table makes."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ["mcnemar_exact", "paired_counts", "bootstrap_interval", "holm", "sign_test", "sign_test_floor", "t_interval", "t_test",
           "BOOTSTRAP", "mcnemar_detectable_difference"]

BOOTSTRAP = 1000


def mcnemar_exact(only_a, only_b):
    """Two-sided exact McNemar test: p = P(|X - n/2| >= |only_a - n/2|), X ~ Binomial(n, 1/2)
    with n = only_a + only_b discordant images (1.0 when there are none)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return float(min(Fraction(1), 2 * Fraction(tail, 2 ** n)))


def paired_counts(correct_a, correct_b):
    """Counts of images both models got right, only a, only b, neither; and McNemar's p."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must describe the same images, got {a.shape} and {b.shape}")
    counts = {"both": int((a & b).sum()), "only_a": int((a & ~b).sum()), "only_b": int((~a & b).sum()),
              "neither": int((~a & ~b).sum())}
    return {**counts, "p_value": mcnemar_exact(counts["only_a"], counts["only_b"])}


def mcnemar_detectable_difference(n, discordant, alpha=0.05, power=0.8, comparisons=1):
    """The smallest accuracy difference (a fraction) that a two-sided McNemar test on ``n``
    paired images detects with probability ``power``, when a fraction ``discordant`` of the
    images is right under one model and wrong under the other; ``comparisons``: Holm's
    first step (the smallest p must beat alpha / comparisons), the strictest case.

    Normal approximation of the paired difference d = (only_a - only_b) / n, whose variance
    is (discordant - d^2) / n: d = z sqrt((discordant - d^2) / n) with z = z_(1 - alpha/2m)
    + z_power, solved: d = z sqrt(discordant / (n + z^2))."""
    from scipy import stats
    if not 0 < discordant <= 1:
        raise ValueError(f"discordant must be in (0, 1], got {discordant}")
    z = stats.norm.ppf(1 - alpha / (2 * comparisons)) + stats.norm.ppf(power)
    return float(z * math.sqrt(discordant / (n + z * z)))


def bootstrap_interval(correct, seed=0, resamples=BOOTSTRAP):
    """95 % bootstrap interval of the accuracy over the test images."""
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, size=(resamples, len(correct)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def holm(p_values):
    """Holm's step-down adjusted p-values (family-wise error control over all of them), in
    the order given: p_(i) adjusted = max over j <= i of min(1, (m - j + 1) · p_(j)) for the
    ascending p-values."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def sign_test(differences):
    """Two-sided exact sign test of per-seed differences (zeros dropped): the McNemar tail
    with the positive and negative counts (1.0 when every difference is zero)."""
    d = np.asarray(differences, dtype=float)
    return mcnemar_exact(int((d > 0).sum()), int((d < 0).sum()))


def t_interval(differences, level=0.95):
    """(mean, low, high): Student-t interval of the mean of per-seed differences (NaN
    bounds with fewer than two)."""
    from scipy import stats
    d = np.asarray(differences, dtype=float)
    mean = float(d.mean()) if d.size else float("nan")
    if d.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def sign_test_floor(n):
    """The smallest p the two-sided sign test can give with n non-zero differences: 2 / 2^n
    (0.0625 with 5 seeds: five seeds alone can never reject at 0.05 by the sign test)."""
    return min(1.0, 2.0 / 2 ** n) if n > 0 else 1.0


def t_test(differences):
    """Two-sided one-sample Student t-test of per-seed differences against 0 (the test the
    95 % t-interval inverts: p < 0.05 exactly when the interval excludes 0); 1.0 when every
    difference is zero; NaN (no test) with fewer than two differences or with equal non-zero
    ones: a zero spread says nothing about the spread between seeds (with few seeds and
    accuracies in steps of 1/images, equal differences happen), and is no evidence."""
    from scipy import stats
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return float("nan")
    if not d.any():
        return 1.0
    if np.allclose(d, d[0], rtol=0, atol=1e-12):
        return float("nan")
    return float(stats.ttest_1samp(d, 0.0).pvalue)
