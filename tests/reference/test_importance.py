"""Token importance metrics and selection (SPEC §4)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alignscan import reference as R


def test_metrics_on_a_hand_case():
    y = np.array([[[1.0, -2.0], [3.0, -4.0]]])            # (batch 1, dim 2, L 2)
    np.testing.assert_allclose(R.token_importance(y, "clip"), [[4.0, 0.0]])
    np.testing.assert_allclose(R.token_importance(y, "raw"), [[4.0, -6.0]])
    np.testing.assert_allclose(R.token_importance(y, "l1"), [[4.0, 6.0]])
    np.testing.assert_allclose(R.token_importance(y, "l2"), [[np.sqrt(10), np.sqrt(20)]])
    np.testing.assert_allclose(R.token_importance(y), R.token_importance(y, "clip"))


@given(st.integers(1, 40), st.floats(0.01, 1.0), st.integers(0, 3), st.data())
def test_select_keeps_count_order_and_protected(n, ratio, n_protected, data):
    n_protected = min(n_protected, n)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    scores = rng.integers(0, 4, (2, n)).astype(float)     # many ties on purpose
    protected = np.sort(rng.choice(n, n_protected, replace=False))
    kept = R.select_tokens(scores, ratio, protected=protected)
    expected_k = n_protected + int(np.ceil(round(ratio * (n - n_protected), 9)))
    assert kept.shape == (2, expected_k)
    assert np.all(np.diff(kept, axis=1) > 0)
    for row in range(2):
        assert set(protected.tolist()) <= set(kept[row].tolist())
        # Brute force: unprotected tokens ranked by (-score, index); the top ones are kept.
        free = [j for j in range(n) if j not in set(protected.tolist())]
        ranked = sorted(free, key=lambda j: (-scores[row, j], j))
        assert set(kept[row].tolist()) == set(protected.tolist()) | set(ranked[: expected_k - n_protected])


def test_ties_go_to_the_lower_index():
    kept = R.select_tokens(np.zeros((1, 6)), 0.5)
    assert kept.tolist() == [[0, 1, 2]]


def test_per_row_protected_tokens():
    scores = np.array([[0.0, 5.0, 1.0, 2.0], [5.0, 0.0, 1.0, 2.0]])
    kept = R.select_tokens(scores, 0.3, protected=np.array([[0], [1]]))  # 1 + ceil(0.9)
    assert kept.tolist() == [[0, 1], [0, 1]]


def test_vim_count_rule_reproduces_released_code():
    counts = [197]
    for _ in range(3):
        counts.append(R.keep_count(counts[-1], 0.8, n_protected=1, rule="vim"))
    assert counts == [197, 157, 125, 101]
    scores = np.random.default_rng(0).standard_normal((1, 197))
    assert R.select_tokens(scores, 0.8, protected=[98], rule="vim").shape == (1, 157)


def test_ceil_rule_is_not_fooled_by_float_error():
    assert R.keep_count(125, 0.8) == 100
    assert R.keep_count(10, 0.7) == 7


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_keep_ratio_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        R.select_tokens(np.zeros((1, 4)), bad)
