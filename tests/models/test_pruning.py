"""Pruning in the models: keep 1.0 is dense, relabel is dense on the gathered tokens, align
feeds the scan the position maps the expansion oracle confirms, the class token survives and
is what the head reads, positions compose."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignscan import models
from alignscan import reference as R
from alignscan.bridges import TorchPositionMap
from alignscan.models.pruning import PruningConfig, select_kept

TINY_VIM = dict(embed_dim=32, depth=4, img_size=64, num_classes=10)       # 16 patches + class token
TINY_PM = dict(embed_dim=32, depth=4, img_size=64, num_classes=10)        # a 4 x 4 grid


def _images(seed=0, n=2):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _vim(mode="dense", **cfg):
    torch.manual_seed(0)
    return models.vim_tiny(pruning=PruningConfig(mode=mode, **cfg) if mode != "dense" else None, **TINY_VIM).eval()


def _pm(name="plainmamba_l1", mode="dense", **cfg):
    torch.manual_seed(0)
    return models.create(name, pruning=PruningConfig(mode=mode, **cfg) if mode != "dense" else None, **TINY_PM).eval()


@pytest.mark.parametrize("mode", ["align", "hold", "relabel", "self", "mask"])
@pytest.mark.parametrize("build", [_vim, _pm])
def test_keep_ratio_one_equals_dense(build, mode):
    x = _images()
    with torch.no_grad():
        dense = build()(x)
        pruned = build(mode=mode, schedule=(1, 2), keep_ratio=1.0)(x)
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-6)


def _vim_manual(model, x, schedule, ratio, alignment, positions_map=True):
    """ViM forward written out with explicit gathers: the stage logic the model must follow."""
    hidden = model.embed(x)
    b, L, _ = hidden.shape
    positions = torch.arange(L).expand(b, L)
    cls_at = torch.full((b, 1), model.cls_index)
    residual = None
    for i, layer in enumerate(model.layers):
        pruned = positions.shape[1] < L and positions_map
        position_map = TorchPositionMap(positions, L) if pruned else None
        scan = models.StageScan(positions, position_map, alignment if pruned else "none",
                                flipped_map=None if position_map is None else position_map.flip())
        hidden, residual, y, _ = layer(hidden, residual, scan)
        if i + 1 in schedule:
            scores = R.token_importance(y.double().numpy(), "clip")
            kept = torch.as_tensor(R.select_tokens(scores, ratio, protected=cls_at.numpy()))
            hidden = torch.gather(hidden, 1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
            residual = torch.gather(residual, 1, kept[..., None].expand(-1, -1, residual.shape[-1]))
            positions = torch.gather(positions, 1, kept)
            cls_at = (kept == cls_at).long().argmax(1, keepdim=True)
            assert (torch.gather(positions, 1, cls_at) == model.cls_index).all(), "class token lost"
    final = model.norm_f(residual + hidden)
    return model.head(final[torch.arange(b), cls_at[:, 0]])


def test_relabel_equals_dense_layers_on_the_gathered_tokens():
    model = _vim("relabel", schedule=(1, 3), keep_ratio=0.6)
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _vim_manual(model, x, (1, 3), 0.6, "none", positions_map=False))


@pytest.mark.parametrize("mode,alignment", [("align", "prev"), ("self", "self")])
def test_aligned_vim_scans_agree_with_the_expansion_oracle_layer_by_layer(mode, alignment):
    """Every scan the pruned model runs (forward branch and the flipped backward branch) is
    re-done with the expansion oracle (SPEC §2.1: the dense reference scan of the expanded
    sequence); the model's outputs must agree with it, and the whole forward with the manual one."""
    model = _vim(mode, schedule=(1, 3), keep_ratio=0.6)
    x = _images(2)
    record = models.Recorder()
    with torch.no_grad():
        logits = model(x, record=record)
        manual = _vim_manual(model, x, (1, 3), 0.6, alignment)
    scans = record.scans
    torch.testing.assert_close(logits, manual)
    checked = []
    for scan in scans:
        position_map = scan["position_map"]
        if position_map is None:
            continue
        assert scan["alignment"] == alignment
        args = [None if t is None else t.detach().double().numpy() for t in scan["args"][:8]]
        positions, seqlen = position_map.positions.numpy(), position_map.seqlen
        dense = R.selective_scan(**R.expand_to_dense(*args, True, positions=positions, seqlen=seqlen,
                                                     alignment=alignment))
        at = np.take_along_axis(dense, np.repeat(positions[:, None, :], dense.shape[1], 1), 2)
        R.assert_within_tolerance(scan["out"].double().numpy(), at, np.float32, "scan vs expansion oracle")
        checked.append(positions.shape[1])
    # two branches x layers 2, 3, 4
    assert sorted(set(checked)) == [7, 11] and len(checked) == 2 * 3


@pytest.mark.parametrize("build", [_vim, _pm])
@pytest.mark.parametrize("mode", ["align", "hold", "relabel", "self", "mask"])
def test_positions_increase_and_compose_across_stages(build, mode):
    model = build(mode=mode, schedule=(1, 2, 3), keep_ratio=0.7)
    with torch.no_grad():
        _, kept = model(_images(3), return_kept=True)
    assert len(kept) == 3
    for earlier, later in zip(kept, kept[1:]):
        assert (later[:, 1:] > later[:, :-1]).all()
        for row_e, row_l in zip(earlier.tolist(), later.tolist()):
            assert set(row_l) <= set(row_e)          # composed: a subset of the previous stage's tokens
    if build is _vim:
        assert all((k == 8).any(dim=1).all() for k in kept), "the class token (index 8) must always be kept"


def test_vim_counts_follow_the_released_rule():
    model = _vim("align", schedule=(1, 2), keep_ratio=0.8, count_rule="vim")
    with torch.no_grad():
        _, kept = model(_images(), return_kept=True)
    assert [k.shape[1] for k in kept] == [R.keep_count(17, 0.8, 1, "vim"), R.keep_count(13, 0.8, 1, "vim")]


def test_position_aware_conv_differs_from_compact_only_after_pruning():
    x = _images(4)
    with torch.no_grad():
        compact = _vim("align", schedule=(2,), keep_ratio=0.5)(x)
        aware = _vim("align", schedule=(2,), keep_ratio=0.5, conv="position_aware")(x)
        same = _vim("align", schedule=(2,), keep_ratio=1.0, conv="position_aware")(x)
    assert not torch.allclose(compact, aware)
    torch.testing.assert_close(same, _vim()(x), rtol=0, atol=1e-6)


def test_select_kept_protects_and_orders():
    y = torch.randn(3, 8, 10)
    cfg = PruningConfig(mode="align", schedule=(1,), keep_ratio=0.3)
    kept = select_kept(y, cfg, 0, protected=torch.tensor([[4], [0], [9]]))
    assert kept.shape == (3, 1 + 3)
    assert all(p in row for p, row in zip((4, 0, 9), kept.tolist()))
    assert (kept[:, 1:] > kept[:, :-1]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="prune"), "mode"), (dict(mode="align", schedule=(0,)), "schedule"),
    (dict(mode="align", schedule=(3, 2)), "schedule"), (dict(mode="align", schedule=(1,), keep_ratio=1.5), "keep_ratio"),
    (dict(mode="align", schedule=(1, 2), keep_ratio=(0.5,)), "keep_ratio"), (dict(metric="linf"), "metric"),
    (dict(conv="dilated"), "conv"), (dict(count_rule="floor"), "count_rule")])
def test_bad_pruning_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_paper_presets_and_names():
    assert models.paper_preset("vim_small").schedule == (5, 10, 15)
    assert models.paper_preset("plainmamba_l3").schedule == (5, 11, 17, 23)
    with pytest.raises(ValueError, match="name"):
        models.paper_preset("vit_b")
    with pytest.raises(ValueError, match="name"):
        models.create("vim_base")


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True),
       st.lists(st.floats(0.1, 1.0), min_size=3, max_size=3), st.sampled_from(["align", "hold", "relabel", "self"]),
       st.sampled_from(["clip", "raw", "l1", "l2"]), st.integers(0, 1000))
def test_any_schedule_keeps_the_class_token_and_composes(schedule, ratios, mode, metric, seed):
    schedule = tuple(sorted(schedule))
    model = _vim(mode, schedule=schedule, keep_ratio=tuple(ratios[:len(schedule)]), metric=metric)
    with torch.no_grad():
        logits, kept = model(_images(seed), return_kept=True)
    assert torch.isfinite(logits).all() and len(kept) == len(schedule)
    previous = torch.arange(17).expand(2, 17)
    for stage, positions in enumerate(kept):
        expected = R.keep_count(previous.shape[1], ratios[stage], n_protected=1)
        assert positions.shape == (2, expected)
        assert (positions == 8).any(dim=1).all()
        assert (positions[:, 1:] > positions[:, :-1]).all()
        assert all(set(r.tolist()) <= set(p.tolist()) for r, p in zip(positions, previous))
        previous = positions


@pytest.mark.parametrize("build", [_vim, _pm])
def test_the_backend_argument_reaches_every_scan(monkeypatch, build):
    """backend= given to the model runs every scan there (here: the torch twin), with the
    same answer as the default backend; no environment variable or patching involved."""
    import alignscan.bridges.scan_op as scan_op
    calls = []
    real = scan_op.scan_twin
    monkeypatch.setattr(scan_op, "scan_twin", lambda args: calls.append(args.alignment) or real(args))
    model = build(mode="align", schedule=(1, 2), keep_ratio=0.6)
    x = _images(5)
    with torch.no_grad():
        default = model(x)
        assert not calls
        model.backend = "torch"
        twin = model(x)
    scans_per_layer = 2 if build is _vim else 4
    assert len(calls) == scans_per_layer * len(model.layers if build is _vim else model.backbone.layers)
    torch.testing.assert_close(twin, default, rtol=1e-4, atol=1e-4)
    model.backend = "bogus"
    with pytest.raises(ValueError, match="backend"), torch.no_grad():
        model(x)


@pytest.mark.parametrize("build", [_vim, _pm])
def test_a_keep_plan_runs_every_mode_on_the_same_tokens(build):
    """With a keep plan, the kept tokens are the plan's whatever the mode; "hold" runs."""
    x = _images(6)
    with torch.no_grad():
        _, own = build(mode="align", schedule=(1, 2), keep_ratio=0.6)(x, return_kept=True)
        for mode in ("align", "hold", "self", "relabel", "mask"):
            logits, kept = build(mode=mode, schedule=(1, 2), keep_ratio=0.6)(x, return_kept=True, keep_plan=own)
            assert torch.isfinite(logits).all()
            for a, b in zip(kept, own):
                assert torch.equal(a, b), mode


def test_a_keep_plan_that_is_not_nested_is_refused():
    model = _vim("align", schedule=(1, 2), keep_ratio=0.6)
    plan = [torch.tensor([[0, 2, 8, 9, 11], [1, 3, 8, 10, 12]]), torch.tensor([[1, 8, 9], [1, 8, 10]])]
    with pytest.raises(ValueError, match="keep_plan\\[1\\] must keep a subset"), torch.no_grad():
        model(_images(7), keep_plan=plan)


PLAN_MODES = [(mode, "drop") for mode in models.MODES if mode != "dense"] + [("align", "fuse"), ("align", "merge")]


@pytest.mark.parametrize("mode,pruned_tokens", PLAN_MODES, ids=[f"{m}-{p}" for m, p in PLAN_MODES])
def test_every_mode_refuses_a_keep_plan_without_the_class_token(mode, pruned_tokens):
    """One plan check for every mode: under "mask" a plan without the class token would have
    the head read the zeroed class token."""
    model = _vim(mode, schedule=(1, 2), keep_ratio=0.6, pruned_tokens=pruned_tokens)
    cls = model.cls_index
    others = [i for i in range(model.num_tokens) if i != cls]
    without = [torch.tensor([others[::2]]), torch.tensor([others[:4:2]])]
    with pytest.raises(ValueError, match=rf"keep_plan\[0\] must keep the class token \(index {cls}\)"), \
            torch.no_grad():
        model(_images(n=1), keep_plan=without)
    second_only = [torch.tensor([sorted(others[::2] + [cls])]), torch.tensor([others[:4:2]])]
    with pytest.raises(ValueError, match=r"keep_plan\[1\] must keep the class token"), torch.no_grad():
        model(_images(n=1), keep_plan=second_only)
    with_cls = [second_only[0], torch.tensor([sorted(others[:4:2] + [cls])])]
    with torch.no_grad():
        assert torch.isfinite(model(_images(n=1), keep_plan=with_cls)).all()


@pytest.mark.parametrize("ratio", [np.float32(0.5), np.float64(0.5), np.float16(0.5), np.int64(1),
                                   [np.float32(0.5), 0.25], np.array([0.5, 0.25])])
def test_numpy_numbers_are_keep_ratios_like_python_numbers(ratio):
    config = PruningConfig("align", (1, 2), ratio)
    expected = (0.5, 0.25) if isinstance(ratio, (list, np.ndarray)) else float(ratio)
    assert config.keep_ratio == expected and type(config.ratio(0)) is float
    assert PruningConfig("align", (np.int32(1), np.int64(2)), 0.5).schedule == (1, 2)


@pytest.mark.parametrize("ratio", [True, np.bool_(True), "0.5", torch.tensor(0.5), None])
def test_a_keep_ratio_that_is_not_a_number_is_a_type_error(ratio):
    with pytest.raises(TypeError, match="keep_ratio must be a number"):
        PruningConfig("align", (1,), ratio)


@pytest.mark.parametrize("schedule", [(True, 2), (1, np.bool_(True)), (False,), (1.0, 2)])
def test_a_schedule_of_bools_or_floats_is_refused(schedule):
    """True == 1 to Python: (True, 2) would be taken as layers 1 and 2."""
    with pytest.raises(ValueError, match="schedule must be strictly increasing 1-based layer indices"):
        PruningConfig("align", schedule, 0.5)
