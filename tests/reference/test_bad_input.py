"""Every class of bad input raises ValueError/TypeError naming the argument (issue: Bad input)."""
import numpy as np
import pytest

import reference as R
from tests.strategies import make_problem


def _problem():
    return make_problem(np.random.default_rng(0), batch=2, dim=4, dstate=3, length=5, groups=2,
                        positions=np.array([[0, 2, 3, 6, 8], [1, 2, 3, 4, 5]]), seqlen=9)


BAD_SCAN_INPUTS = [
    ("u ndim", dict(u=np.zeros((4, 5))), ValueError, "u"),
    ("delta shape", dict(delta=np.zeros((2, 4, 6))), ValueError, "delta"),
    ("A shape", dict(A=np.zeros((3, 3))), ValueError, "A"),
    ("A too many states", dict(A=np.zeros((4, 257))), ValueError, "A"),
    ("B ndim", dict(B=np.zeros((2, 3))), ValueError, "B"),
    ("C shape", dict(C=np.zeros((2, 2, 3, 4))), ValueError, "C"),
    ("dim not divisible by G", dict(B=np.zeros((2, 3, 3, 5))), ValueError, "divisible"),
    ("D shape", dict(D=np.zeros(5)), ValueError, "D"),
    ("z shape", dict(z=np.zeros((2, 4, 4))), ValueError, "z"),
    ("delta_bias shape", dict(delta_bias=np.zeros((4, 1))), ValueError, "delta_bias"),
    ("integer u", dict(u=np.zeros((2, 4, 5), dtype=np.int64)), TypeError, "u"),
    ("positions float", dict(positions=np.zeros((2, 5))), TypeError, "positions"),
    ("positions bool", dict(positions=np.ones((2, 5), bool)), TypeError, "positions"),
    ("positions not increasing", dict(positions=np.array([0, 2, 2, 3, 4])), ValueError, "increasing"),
    ("positions negative", dict(positions=np.array([-1, 2, 3, 4, 5])), ValueError, ">= 0"),
    ("positions beyond seqlen", dict(positions=np.array([0, 2, 3, 4, 9])), ValueError, "seqlen"),
    ("positions wrong length", dict(positions=np.array([0, 1, 2])), ValueError, "M=5"),
    ("positions wrong batch", dict(positions=np.zeros((3, 5), np.int64) + np.arange(5)), ValueError, "batch"),
    ("positions ndim", dict(positions=np.zeros((1, 2, 5), np.int64)), ValueError, "positions"),
    ("seqlen not int", dict(seqlen=9.0), TypeError, "seqlen"),
    ("seqlen negative", dict(seqlen=-1), ValueError, "seqlen"),
    ("unknown alignment", dict(alignment="next"), ValueError, "alignment"),
    ("softplus flag", dict(delta_softplus="yes"), TypeError, "delta_softplus"),
]


@pytest.mark.parametrize("case,override,error,match", BAD_SCAN_INPUTS, ids=[c[0] for c in BAD_SCAN_INPUTS])
def test_bad_scan_input_is_rejected_by_forward_and_backward(case, override, error, match):
    p = _problem()
    with pytest.raises(error, match=match):
        R.selective_scan(**p.kwargs(**override))
    with pytest.raises(error, match=match):
        R.selective_scan_backward(p.dout(), **p.kwargs(**override))


def test_bad_dout_is_rejected():
    p = _problem()
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
