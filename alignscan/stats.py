"""The statistics of the experiments: exact paired tests on the same images, bootstrap
intervals, and Holm's correction for the many comparisons a table makes."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ["mcnemar_exact", "paired_counts", "bootstrap_interval", "holm", "sign_test", "sign_test_floor", "t_interval", "t_test",
           "BOOTSTRAP", "mcnemar_detectable_difference", "t_test_one_sided", "tost", "t_test_power", "rank_auc",
           "rank_auc_interval"]

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
    if not n >= 1:
        raise ValueError(f"n must be at least one paired image, got {n}")
    if not (0 < alpha < 1 and 0 < power < 1) or comparisons < 1:
        raise ValueError(f"alpha and power must be in (0, 1) and comparisons >= 1, got alpha={alpha}, "
                         f"power={power}, comparisons={comparisons}")
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


def _no_t_test(d):
    """NaN when one-sample t-tests of ``d`` say nothing: fewer than two values, or no spread
    (equal values, zeros included: a zero spread is no evidence about the spread between
    seeds; SciPy returns NaN there too)."""
    return d.size < 2 or np.allclose(d, d[0], rtol=0, atol=1e-12)


def t_test_one_sided(differences, alternative, null=0.0):
    """One-sided one-sample Student t-test of per-seed differences: p of mean > ``null``
    (``alternative`` "greater") or mean < ``null`` ("less"); SciPy's ``ttest_1samp`` with that
    alternative. NaN (no test) with fewer than two differences or none of their spread."""
    from scipy import stats
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    d = np.asarray(differences, dtype=float)
    if _no_t_test(d):
        return float("nan")
    return float(stats.ttest_1samp(d, null, alternative=alternative).pvalue)


def tost(differences, margin, alpha=0.05):
    """Two one-sided t-tests (Schuirmann's TOST) that the mean of per-seed differences lies
    within (-margin, +margin): p_lower tests mean > -margin, p_upper mean < +margin, and the
    mean is shown equivalent when both are below ``alpha`` (p = the larger). The (1 - 2 alpha)
    t-interval lies inside the margins exactly then. NaN p (not shown) without a spread."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    d = np.asarray(differences, dtype=float)
    p_lower = t_test_one_sided(d, "greater", null=-margin)
    p_upper = t_test_one_sided(d, "less", null=margin)
    p = max(p_lower, p_upper) if not (math.isnan(p_lower) or math.isnan(p_upper)) else float("nan")
    mean, low, high = t_interval(d, level=1 - 2 * alpha)
    return {"margin": float(margin), "alpha": float(alpha), "mean": mean, "p_lower": p_lower, "p_upper": p_upper,
            "p": p, "interval": (low, high), "interval_level": 1 - 2 * alpha,
            "equivalent": bool(p < alpha) if not math.isnan(p) else False}


def t_test_power(effect, sd, n, alpha):
    """Power of a one-sided one-sample t-test at level ``alpha`` with ``n`` values when the
    true mean is ``effect`` (in the tested direction; its sign is ignored) and the SD ``sd``:
    P(T > t_(1-alpha, n-1)) with T noncentral t of n - 1 degrees of freedom and
    noncentrality |effect| sqrt(n) / sd. NaN with fewer than two values."""
    from scipy import stats
    if not sd > 0:
        raise ValueError(f"sd must be > 0, got {sd!r}")
    if n < 2:
        return float("nan")
    df = n - 1
    critical = stats.t.ppf(1 - alpha, df)
    return float(stats.nct.sf(critical, df, abs(effect) * math.sqrt(n) / sd))


def rank_auc(positive, negative):
    """The probability that a value drawn from ``positive`` exceeds one from ``negative``
    (ties count a half): Mann-Whitney's U / (n_pos n_neg), the area under the ROC curve of the
    value as a score for "positive"; 2 AUC - 1 is the rank-biserial correlation. NaN when
    either group is empty."""
    from scipy import stats
    a, b = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if a.size == 0 or b.size == 0:
        return float("nan")
    return float(stats.mannwhitneyu(a, b, alternative="two-sided").statistic / (a.size * b.size))


def rank_auc_interval(positive, negative, seed=0, resamples=BOOTSTRAP, level=0.95):
    """Percentile bootstrap interval of ``rank_auc``, each group resampled within itself (the
    group sizes stay those observed). (NaN, NaN) when either group is empty."""
    from scipy import stats
    a, b = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.concatenate([rng.choice(a, (resamples, a.size)), rng.choice(b, (resamples, b.size))], axis=1)
    ranks = stats.rankdata(draws, axis=1)                       # one resample a row; ties share their mean rank
    values = (ranks[:, :a.size].sum(axis=1) - a.size * (a.size + 1) / 2) / (a.size * b.size)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
