"""The scan-distance task: its images and marks, the background and span-controlled removal
plans, and held-out pairs that never occur in training."""
import numpy as np


def test_span_plans_remove_the_same_number_of_background_tokens_inside_or_outside_the_span():
    from alignscan.science.distance_task import make_images, mark_tokens, pair_overlap, span, span_plans
    _, labels, marks = make_images(300, seed=5)
    tokens, cls = 65, 32
    for removed in (4, 12):
        inside, outside, eligible = span_plans(marks, removed, seed=1)
        assert len(eligible) > 100 and inside.shape == outside.shape == (len(eligible), tokens - removed)
        first, last = span(marks[eligible])
        special = np.concatenate([mark_tokens(marks[eligible]), np.full((len(eligible), 1), cls)], axis=1)
        for i in range(len(eligible)):
            for plan, where in ((inside, "inside"), (outside, "outside")):
                gone = np.setdiff1d(np.arange(tokens), plan[i])
                assert len(gone) == removed and np.all(np.diff(plan[i]) > 0)
                assert not np.isin(special[i], gone).any()                     # marks and class token stay
                within = (gone > first[i]) & (gone < last[i])
                assert within.all() if where == "inside" else not within.any()
        for i in np.setdiff1d(np.arange(len(marks)), eligible):                 # too few tokens on one side
            f, l = span(marks[i:i + 1])
            background = np.setdiff1d(np.arange(tokens), np.append(mark_tokens(marks[i]), cls))
            n_in = int(((background > f[0]) & (background < l[0])).sum())
            assert min(n_in, len(background) - n_in) < removed
    assert pair_overlap(marks[:100], marks[:100]) == 1.0 and pair_overlap(marks[:1], marks[1:2]) in (0.0, 1.0)


def test_background_plans_keep_the_marks_and_the_class_token_and_are_nested():
    from alignscan.science.distance_task import background_plan, make_images, mark_tokens
    images, labels, marks = make_images(20, seed=3)
    assert images.shape == (20, 1, 32, 32) and set(labels.tolist()) <= {0, 1}
    distance = marks[:, 1] - marks[:, 0]
    assert ((distance > 19) == (labels == 1)).all() and (np.abs(distance - 19) > 3).all()
    plan = background_plan(marks, [0.7, 0.5], seed=0)
    previous = None
    for stage in plan:
        for row, mark in zip(stage.numpy(), mark_tokens(marks)):
            assert 32 in row and set(mark.tolist()) <= set(row.tolist())
        if previous is not None:
            assert all(set(r.tolist()) <= set(q.tolist()) for r, q in zip(stage, previous))
        previous = stage


def test_held_out_pairs_never_occur_in_training_and_keep_the_task_balanced():
    from alignscan.science.distance_task import THRESHOLD, distance_marks, pair_overlap, pair_pools
    train_pairs, test_pairs = pair_pools(0)
    assert not {tuple(p) for p in train_pairs.tolist()} & {tuple(p) for p in test_pairs.tolist()}
    assert 0.15 < len(test_pairs) / (len(train_pairs) + len(test_pairs)) < 0.25
    train, test = distance_marks("train", 0, held_out=True), distance_marks("test", 0, held_out=True)
    assert pair_overlap(train, test) == 0.0 and pair_overlap(distance_marks("validation", 0, True), test) == 0.0
    assert pair_overlap(distance_marks("train", 0), distance_marks("test", 0)) > 0.9       # the default task's shortcut
    far = (test[:, 1] - test[:, 0]) > THRESHOLD
    assert 0.45 < far.mean() < 0.55
