"""The detectable difference of a paired McNemar test: at the computed difference, simulated
paired experiments reject about as often as the power asked for."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from alignscan.stats import mcnemar_detectable_difference


@pytest.mark.parametrize("n,discordant,comparisons", [(50_000, 0.05, 1), (50_000, 0.02, 4), (2_000, 0.10, 1)])
def test_simulated_power_at_the_detectable_difference_is_the_power_asked_for(n, discordant, comparisons):
    delta = mcnemar_detectable_difference(n, discordant, alpha=0.05, power=0.8, comparisons=comparisons)
    rng = np.random.default_rng(0)
    # cells: only a right, only b right (their difference is delta), the rest concordant
    p_only_a, p_only_b = (discordant + delta) / 2, (discordant - delta) / 2
    counts = rng.multinomial(n, [p_only_a, p_only_b, 1 - discordant], size=4000)
    b, c = counts[:, 0], counts[:, 1]
    z = (b - c) / np.sqrt(b + c)
    rejected = np.abs(z) > scipy_stats.norm.ppf(1 - 0.05 / (2 * comparisons))
    assert abs(rejected.mean() - 0.8) < 0.03


def test_more_images_or_fewer_discordant_images_detect_smaller_differences():
    assert mcnemar_detectable_difference(50_000, 0.05) < mcnemar_detectable_difference(10_000, 0.05)
    assert mcnemar_detectable_difference(50_000, 0.02) < mcnemar_detectable_difference(50_000, 0.05)
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_detectable_difference(100, 0.0)
    with pytest.raises(ValueError, match="n must be"):
        mcnemar_detectable_difference(0, 0.05)
    with pytest.raises(ValueError, match="power"):
        mcnemar_detectable_difference(100, 0.05, power=1.0)
