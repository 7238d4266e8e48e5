"""The conformance suite: every backend of the registry, through every front door that
takes it, against the float64 reference, forward (out, last_state) and every gradient,
every alignment, float32 and float64 (the dtype is drawn with the rest of the problem)."""
import numpy as np
import pytest
from hypothesis import given, settings

from tests.conformance.runners import runners
from tests.kernels.equivalence import check_backward, check_forward
from tests.strategies import scan_problems

# The GPU backends' cases are marked gpu: alignscan.bench.gpu_run runs them on a lent GPU.
RUNNERS = [pytest.param(r, id=r[0], marks=[pytest.mark.gpu] if r[4] == "cuda" else []) for r in runners()]
PROBLEMS = scan_problems(dtype=(np.float32, np.float64), max_dim=6, max_dstate=4, max_length=10)


def _runner(case, p):
    _, reason, fns, alignments, _ = case
    if reason is not None:
        pytest.skip(f"cannot run here: {reason}")
    if p.alignment not in alignments:    # it must say so, never answer
        with pytest.raises(ValueError, match=p.alignment):
            fns[0](**p.kwargs())
        return None
    return fns


@pytest.mark.parametrize("case", RUNNERS)
@settings(max_examples=25)
@given(p=PROBLEMS)
def test_forward_matches_reference(case, p):
    fns = _runner(case, p)
    if fns is not None:
        check_forward(p, fns[0])


@pytest.mark.parametrize("case", RUNNERS)
@settings(max_examples=25)
@given(p=PROBLEMS)
def test_backward_matches_reference(case, p):
    fns = _runner(case, p)
    if fns is not None:
        check_backward(p, fns[1])
