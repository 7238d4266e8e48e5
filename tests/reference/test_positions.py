"""Position maps: round trips, flips, composition, snake paths (SPEC §3)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alignscan import reference as R
from tests.strategies import position_maps


@given(position_maps(styles=("random", "all", "one", "leading", "trailing", "every_gap")))
def test_mask_positions_round_trip(drawn):
    _, positions, seqlen = drawn
    mask = R.positions_to_mask(positions, seqlen)
    assert mask.shape[-1] == seqlen
    np.testing.assert_array_equal(R.mask_to_positions(mask), positions)


@given(position_maps(styles=("random", "leading", "trailing", "every_gap")))
def test_flip_twice_is_identity_and_flip_is_valid(drawn):
    _, positions, seqlen = drawn
    flipped = R.flip_positions(positions, seqlen)
    R.validate_positions(flipped, batch=np.atleast_2d(positions).shape[0], length=positions.shape[-1], seqlen=seqlen)
    np.testing.assert_array_equal(R.flip_positions(flipped, seqlen), positions)


@given(position_maps(styles=("random", "all", "every_gap"), batch=2), st.data())
def test_compose_matches_two_step_pruning(drawn, data):
    _, positions, seqlen = drawn
    positions = np.broadcast_to(positions, (2, positions.shape[-1]))
    m = positions.shape[1]
    k = data.draw(st.integers(1, m))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    kept = np.stack([np.sort(rng.choice(m, k, replace=False)) for _ in range(2)])
    composed = R.compose(positions, kept)
    # Two-step pruning on masks: the second step keeps `kept` among the first step's survivors.
    for row in range(2):
        first = np.flatnonzero(R.positions_to_mask(positions[row], seqlen))
        np.testing.assert_array_equal(composed[row], first[kept[row]])


def test_gaps_start_at_one():
    np.testing.assert_array_equal(R.gaps([2, 3, 7]), [1, 1, 4])
    np.testing.assert_array_equal(R.gaps([[0, 5], [1, 2]]), [[1, 5], [1, 1]])


@pytest.mark.parametrize("height,width", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 5), (14, 14)])
def test_snake_paths_are_neighbour_permutations_with_matching_labels(height, width):
    orders, labels = R.snake_paths(height, width)
    moves = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    for order, label in zip(orders, labels):
        assert sorted(order.tolist()) == list(range(height * width))
        assert label[0] == 0
        for t in range(1, len(order)):
            (r0, c0), (r1, c1) = divmod(order[t - 1], width), divmod(order[t], width)
            assert (r1 - r0, c1 - c0) in moves, "consecutive path entries must be grid neighbours"
            assert label[t] == moves[(r1 - r0, c1 - c0)]
    np.testing.assert_array_equal(orders[1], orders[0][::-1])
    np.testing.assert_array_equal(orders[3], orders[2][::-1])


def test_snake_paths_on_3x4_grid():
    orders, labels = R.snake_paths(3, 4)
    assert orders[0].tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert labels[0].tolist() == [0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1]
    assert orders[2].tolist() == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
    assert labels[2].tolist() == [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3]


@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_path_positions_orders_kept_tokens_by_rank(height, width, data):
    orders, _ = R.snake_paths(height, width)
    n = height * width
    kept = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))))
    for order in orders:
        index, positions = R.path_positions(kept, order)
        assert np.all(np.diff(positions) > 0)
        np.testing.assert_array_equal(order[positions], kept[index])
        # The same as masking the path: the kept tokens in the order the path visits them.
        np.testing.assert_array_equal(kept[index], [t for t in order if t in set(kept.tolist())])


def test_a_position_map_owns_an_immutable_copy_of_its_positions():
    """Changing the array a map was built from changes nothing: the map keeps what it
    validated, and its cached coefficients agree with its positions (a caller may reuse its
    array for the next batch while the map is still in use)."""
    kept = np.array([[1, 5, 9, 13]])
    position_map = R.PositionMap(kept, 16)
    before = position_map.coefficients("prev", np.float64).coef_prev.copy()
    kept[0] = [13, 9, 5, 1]                          # would be unsorted: coef_prev -5 if aliased
    assert position_map.positions.tolist() == [[1, 5, 9, 13]]
    np.testing.assert_array_equal(position_map.coefficients("prev", np.float64).coef_prev, before)
    with pytest.raises(ValueError, match="read-only"):
        position_map.positions[0, 0] = 3
    for derived in (position_map.flip(), position_map.compose(np.array([[0, 2]])),
                    R.PositionMap.from_rows(np.array([[0, 3]]), np.array([16]))):
        assert not derived.positions.flags.writeable
