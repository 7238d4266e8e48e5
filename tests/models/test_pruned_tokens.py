"""What becomes of the pruned tokens (SPEC §4): EViT's fused token and the merge of each run
of pruned tokens, and the released code's class-token re-centring. The NumPy reference
(``reference.pruned_tokens``) on hand-made cases; the models' torch twins (``models.stages``)
against it, stage by stage; the models with them."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignscan import models
from alignscan import reference as R
from alignscan.models.pruning import PruningConfig, select_kept, token_scores
from alignscan.models.stages import Stages, fuse_pruned, merge_runs, recentre_order
from alignscan.reference.pruned_tokens import fusion_weights

TINY_VIM = dict(embed_dim=32, depth=4, img_size=64, num_classes=10)       # 16 patches + class token at 8


def _images(seed=0, n=3):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _vim(mode="align", **cfg):
    torch.manual_seed(0)
    return models.vim_tiny(pruning=PruningConfig(mode=mode, **cfg), **TINY_VIM).eval()


# --- the reference on cases worked by hand ------------------------------------------------

def test_fusion_weights_are_clipped_importance_normalised_or_uniform():
    assert np.allclose(fusion_weights([5.0, 1.0, -2.0, 3.0], np.array([1, 2, 3])), [0.25, 0.0, 0.75])
    assert np.allclose(fusion_weights([5.0, -1.0, -2.0], np.array([1, 2])), [0.5, 0.5])


def test_fuse_keeps_the_kept_tokens_and_appends_their_weighted_average():
    x = np.arange(10.0).reshape(5, 2)
    out = R.fuse_pruned(x, [0, 3], scores=[9.0, 1.0, 3.0, 9.0, 0.0])
    assert np.allclose(out[:2], x[[0, 3]])
    assert np.allclose(out[2], 0.25 * x[1] + 0.75 * x[2] + 0.0 * x[4])
    assert np.allclose(R.fuse_pruned(x, range(5), np.ones(5)), x)          # nothing pruned: nothing fused


def test_merge_averages_each_run_at_its_last_position():
    x = np.arange(14.0).reshape(7, 2)
    positions = np.array([0, 2, 3, 4, 7, 8, 11])
    tokens, places = R.merge_runs(x, [0, 4], positions)                     # runs 1-3 and 5-6
    assert np.allclose(tokens, [x[0], x[1:4].mean(0), x[4], x[5:7].mean(0)])
    assert places.tolist() == [0, 4, 7, 11]
    tokens, places = R.merge_runs(x, [2, 3], positions)                     # a leading and a trailing run
    assert np.allclose(tokens, [x[:2].mean(0), x[2], x[3], x[4:].mean(0)])
    assert places.tolist() == [2, 3, 4, 11]


def test_recentre_moves_the_class_token_to_the_middle_and_keeps_the_rest_in_order():
    assert R.recentre_order(5, 0).tolist() == [1, 2, 0, 3, 4]
    assert R.recentre_order(6, 5).tolist() == [0, 1, 2, 5, 3, 4]
    assert R.recentre_order(1, 0).tolist() == [0]


# --- the torch twins against the reference ------------------------------------------------

@st.composite
def _rows(draw):
    n = draw(st.integers(2, 24))
    kept = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    seed = draw(st.integers(0, 2 ** 16))
    return n, np.array(kept), seed


@settings(max_examples=60, deadline=None)
@given(_rows())
def test_the_torch_fuse_and_merge_equal_the_reference(case):
    n, kept, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    scores = rng.standard_normal(n) * (rng.random(n) < 0.7)
    positions = np.sort(rng.choice(4 * n, n, replace=False))
    tx, tk = torch.tensor(x)[None], torch.tensor(kept)[None]
    (fused,) = fuse_pruned((tx,), tk, torch.tensor(scores)[None])
    if len(kept) < n:
        np.testing.assert_allclose(fused[0].numpy(), R.fuse_pruned(x, kept, scores), rtol=1e-12, atol=1e-12)
    (merged,), places, group = merge_runs((tx,), tk, torch.tensor(positions)[None])
    ref_tokens, ref_places = R.merge_runs(x, kept, positions)
    np.testing.assert_allclose(merged[0].numpy(), ref_tokens, rtol=1e-12, atol=1e-12)
    assert places[0].tolist() == ref_places.tolist()
    cls_at = int(rng.integers(0, n))
    assert recentre_order(n, torch.tensor([[cls_at]]))[0].tolist() == R.recentre_order(n, cls_at).tolist()


def test_a_batched_merge_with_unequal_counts_is_refused():
    x = torch.randn(2, 6, 3)
    kept = torch.tensor([[0, 3, 5], [0, 1, 2]])                 # 2 runs + 3 kept; 1 run + 3 kept
    with pytest.raises(ValueError, match="one image at a time"):
        merge_runs((x,), kept, torch.arange(6).expand(2, 6))


@pytest.mark.parametrize("pruned_tokens", ["fuse", "merge"])
@pytest.mark.parametrize("mode", ["align", "relabel"])
def test_two_stages_of_the_model_equal_the_reference_row_by_row(pruned_tokens, mode):
    """``Stages`` after two pruning layers: every stream, position and the class token's
    place equal the reference applied to each row, stage after stage."""
    torch.manual_seed(1)
    cfg = PruningConfig(mode=mode, schedule=(1, 2), keep_ratio=0.5, pruned_tokens=pruned_tokens)
    batch, tokens, cls = (1 if pruned_tokens == "merge" else 3), 17, 8
    stages = Stages(cfg, batch, tokens, "cpu", protected=cls)
    streams = (torch.randn(batch, tokens, 4, dtype=torch.float64), torch.randn(batch, tokens, 4, dtype=torch.float64))
    ref = [[s[r].numpy() for s in streams] for r in range(batch)]
    ref_positions = [np.arange(tokens) for _ in range(batch)]
    for stage in range(2):
        n = streams[0].shape[1]
        y = torch.randn(batch, 6, n, dtype=torch.float64)
        kept = select_kept(y, cfg, stage, protected=stages.protected_at)
        scores = token_scores(y, cfg.metric)
        streams = stages.after_layer(stage, y, *streams)
        for r in range(batch):
            k = kept[r].numpy()
            if pruned_tokens == "fuse":
                ref[r] = [R.fuse_pruned(s, k, scores[r].numpy()) for s in ref[r]]
                ref_positions[r] = np.append(ref_positions[r][k], tokens + stage)
            else:
                merged = [R.merge_runs(s, k, ref_positions[r]) for s in ref[r]]
                ref[r], ref_positions[r] = [m[0] for m in merged], merged[0][1]
            for got, want in zip(streams, ref[r]):
                np.testing.assert_allclose(got[r].numpy(), want, rtol=1e-12, atol=1e-12)
            assert stages.positions[r].tolist() == ref_positions[r].tolist()
            assert int(stages.positions[r, stages.protected_at[r, 0]]) == cls
    assert torch.equal(stages.position_map.positions, stages.positions)
    assert stages.position_map.seqlen == tokens + (2 if pruned_tokens == "fuse" else 0)


# --- the models ---------------------------------------------------------------------------

@pytest.mark.parametrize("pruned_tokens", ["fuse", "merge"])
def test_keep_ratio_one_is_dense_whatever_becomes_of_the_pruned_tokens(pruned_tokens):
    x = _images(1)
    with torch.no_grad():
        dense = _vim("dense")(x)
        pruned = _vim("align", schedule=(1, 3), keep_ratio=1.0, pruned_tokens=pruned_tokens)(x)
    torch.testing.assert_close(pruned, dense)


def test_fuse_adds_one_token_per_stage_at_slots_after_the_path():
    with torch.no_grad():
        _, kept = _vim("align", schedule=(1, 2), keep_ratio=0.5, pruned_tokens="fuse")(_images(2), return_kept=True)
    assert kept[0].shape == (3, R.keep_count(17, 0.5, n_protected=1) + 1)
    assert (kept[0][:, -1] == 17).all() and (kept[1][:, -1] == 18).all()
    assert (kept[1][:, 1:] > kept[1][:, :-1]).all()


@pytest.mark.parametrize("mode", ["align", "hold", "relabel"])
def test_a_merged_batch_equals_its_images_one_by_one(mode):
    """Each image has its own token count under "merge"; the batch gives each image's own
    result, with a keep plan too, and the class token is what the head reads."""
    model = _vim(mode, schedule=(1, 2), keep_ratio=0.4, pruned_tokens="merge")
    x = _images(3)
    with torch.no_grad():
        together, kept = model(x, return_kept=True)
        alone = torch.cat([model(x[r:r + 1]) for r in range(3)])
        plan_model = _vim("align", schedule=(1, 2), keep_ratio=0.4)
        _, plan = plan_model(x, return_kept=True)
        planned = model(x, keep_plan=plan)
        planned_alone = torch.cat([model(x[r:r + 1], keep_plan=[p[r:r + 1] for p in plan]) for r in range(3)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(planned, planned_alone)
    assert len(kept) == 2 and all(len(stage) == 3 for stage in kept)
    assert all(8 in row.tolist() for stage in kept for row in stage)


def test_merge_gives_the_merged_token_the_runs_length_as_its_step_under_align():
    """Under "align" the scans see a map whose gap before a merged token is its run's length:
    the first layer after the stage scans positions with gaps (SPEC §1), "relabel" none."""
    from alignscan.models import Recorder
    plan = [torch.tensor([[0, 1, 5, 8, 12, 16]])]          # runs 2-4, 6-7, 9-11, 13-15
    x = _images(4, n=1)
    for mode, expected in (("align", "prev"), ("relabel", "none")):
        record = Recorder()
        with torch.no_grad():
            _vim(mode, schedule=(1,), keep_ratio=0.4, pruned_tokens="merge")(x, keep_plan=plan, record=record)
        scan = record.scans[2]                              # layer 2's forward branch: after the stage
        assert scan["alignment"] == expected
        assert scan["position_map"].positions[0].tolist() == [0, 1, 4, 5, 7, 8, 11, 12, 15, 16]


def test_recentred_class_token_sits_in_the_middle_after_every_stage():
    model = _vim("relabel", schedule=(1, 2), keep_ratio=0.5, recenter_cls=True)
    with torch.no_grad():
        logits, kept = model(_images(5), return_kept=True)
        plain_logits = _vim("relabel", schedule=(1, 2), keep_ratio=0.5)(_images(5))
    for stage in kept:
        assert (stage[:, stage.shape[1] // 2] == 8).all()
        others = stage[stage != 8].view(stage.shape[0], -1)
        assert (others[:, 1:] > others[:, :-1]).all()
    assert torch.isfinite(logits).all() and not torch.allclose(logits, plain_logits)
    with torch.no_grad():          # a keep plan finds its tokens although the class token moved
        again = model(_images(5), keep_plan=[k.sort(dim=1).values for k in kept])
    torch.testing.assert_close(again, logits)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="mask", schedule=(1,), pruned_tokens="fuse"), "pruned_tokens"),
    (dict(mode="align", schedule=(1,), pruned_tokens="blend"), "pruned_tokens"),
    (dict(mode="align", schedule=(1,), recenter_cls=True), "recenter_cls"),
    (dict(mode="relabel", schedule=(1,), recenter_cls=True, conv="position_aware"), "recenter_cls"),
    (dict(mode="relabel", schedule=(1,), recenter_cls=True, pruned_tokens="fuse"), "recenter_cls")])
def test_bad_combinations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_plainmamba_refuses_what_it_has_no_place_for_and_flops_count_the_fused_token():
    with pytest.raises(ValueError, match="pruned_tokens"):
        models.create("plainmamba_l1", pruning=PruningConfig("align", (1,), 0.5, pruned_tokens="fuse"), img_size=64)
    drop = models.flops("vim_small", models.paper_preset("vim_small"))
    fuse = models.flops("vim_small", models.paper_preset("vim_small", pruned_tokens="fuse"))
    assert fuse > drop
    with pytest.raises(ValueError, match="counted"):
        models.flops("vim_small", models.paper_preset("vim_small", pruned_tokens="merge"))


def test_merge_groups_put_together_exactly_the_rows_with_equal_counts():
    """From a keep plan alone: the rows that "merge" leaves with the same token count after
    every stage, checked against the reference merge of each row."""
    from alignscan.models.pruning import KeepPlan
    from alignscan.models.stages import merge_groups
    plan = KeepPlan([torch.tensor([[0, 1, 5, 8, 12, 16], [0, 1, 6, 8, 12, 16], [0, 1, 2, 8, 9, 10]]),
                     torch.tensor([[1, 8, 16], [1, 8, 16], [1, 8, 9]])], 17)
    groups = merge_groups(plan, 17)
    assert sorted(r for g in groups for r in g) == [0, 1, 2]

    def counts(r):
        current, out = np.arange(17), []
        for stage in plan.stages:
            _, current = R.merge_runs(np.zeros((len(current), 1)), np.flatnonzero(np.isin(current, stage[r].numpy())),
                                      current)
            out.append(len(current))
        return out
    for g in groups:
        assert len({tuple(counts(r)) for r in g}) == 1
    assert len({tuple(counts(g[0])) for g in groups}) == len(groups)
    assert groups == [[0, 1], [2]]
