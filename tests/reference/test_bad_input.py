"""Bad input to the reference's helpers raises ValueError/TypeError naming the argument. (The
scan's own arguments are checked on every entry point at once: tests/conformance.)"""
import numpy as np
import pytest

from alignscan import reference as R
from tests.strategies import make_problem


def test_bad_dout_is_rejected():
    p = make_problem(np.random.default_rng(0), batch=2, dim=4, dstate=3, length=5)
    with pytest.raises(ValueError, match="dout"):
        R.selective_scan_backward(np.zeros((2, 4, 4)), **p.kwargs())


@pytest.mark.parametrize("call,error,match", [
    (lambda: R.token_importance(np.zeros((2, 3)), "clip"), ValueError, "y"),
    (lambda: R.token_importance(np.zeros((1, 2, 3)), "linf"), ValueError, "metric"),
    (lambda: R.token_importance(np.zeros((1, 2, 3), int)), TypeError, "y"),
    (lambda: R.select_tokens(np.zeros(4), 0.5), ValueError, "scores"),
    (lambda: R.select_tokens(np.zeros((1, 4)), "half"), TypeError, "keep_ratio"),
    (lambda: R.select_tokens(np.zeros((1, 4)), 0.5, protected=[4]), ValueError, "protected"),
    (lambda: R.select_tokens(np.zeros((1, 4)), 0.5, protected=[1.0]), TypeError, "protected"),
    (lambda: R.select_tokens(np.array([[0.0, np.nan]]), 0.5), ValueError, "scores"),
    (lambda: R.select_tokens(np.zeros((1, 4)), 0.5, rule="floor"), ValueError, "rule"),
    (lambda: R.mask_to_positions(np.array([[1, 0]])), TypeError, "mask"),
    (lambda: R.mask_to_positions(np.array([[True, False], [True, True]])), ValueError, "same number"),
    (lambda: R.compose(np.arange(4), np.array([4])), ValueError, "kept"),
    (lambda: R.snake_paths(0, 3), ValueError, "height"),
    (lambda: R.path_positions([0, 1], np.array([0, 0, 1])), ValueError, "order"),
    (lambda: R.flip_positions(np.array([0.0, 1.0]), 3), TypeError, "positions"),
])
def test_bad_helper_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
