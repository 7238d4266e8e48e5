"""A pruned model never waits for the host (a copy to the host is a synchronisation on a GPU
and a graph break under ``torch.compile``): selection and position maps are torch ops on the
model's device, equal to their NumPy reference twins; a pruned forward makes no
device-to-host transfer or host synchronisation (a guard that can fail shows it); and the
whole pruned model traces under ``torch.compile(fullgraph=True)`` with eager's logits."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignscan import models
from alignscan import reference as R
from alignscan.bridges import TorchPositionMap
from alignscan.models import pruning
from alignscan.models.pruning import KeepPlan, PruningConfig, select_kept, token_scores, top_tokens
from tests.models.host_guard import HostGuard, HostSyncError
from tests.strategies import position_maps

COMPILE_TOLERANCE = R.tolerance(np.float32)


# --- selection on the device equals the reference -------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), metric=st.sampled_from(R.METRICS), rule=st.sampled_from(R.importance.COUNT_RULES),
       ratio=st.sampled_from([0.1, 0.3, 0.5, 0.8, 1.0]), ties=st.booleans(), protect=st.booleans())
def test_torch_selection_equals_the_reference_including_ties(seed, metric, rule, ratio, ties, protect):
    """Ties (integer-valued y with few distinct values, so many tokens score the same) go to
    the lower index in both; protected tokens are always kept."""
    rng = np.random.default_rng(seed)
    batch, dim, length = rng.integers(1, 4), rng.integers(1, 6), rng.integers(2, 30)
    y = rng.integers(-2, 3, size=(batch, dim, length)).astype(np.float64) if ties \
        else rng.standard_normal((batch, dim, length))
    protected = np.stack([rng.choice(length, size=1, replace=False) for _ in range(batch)]) if protect else None
    expected = R.select_tokens(R.token_importance(y, metric), ratio, protected=protected, rule=rule)
    cfg = PruningConfig(mode="align", schedule=(1,), keep_ratio=ratio, metric=metric, count_rule=rule)
    got = select_kept(torch.tensor(y, dtype=torch.float32 if ties else torch.float64), cfg, 0,
                      protected=None if protected is None else torch.tensor(protected))
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_allclose(token_scores(torch.tensor(y), metric).numpy(), R.token_importance(y, metric),
                               rtol=1e-12, atol=1e-12)


def test_mask_mode_selects_among_the_live_tokens_as_the_reference_does():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((3, 4, 12))
    live = np.stack([np.sort(rng.choice(12, 7, replace=False)) for _ in range(3)])
    protected = live[:, 2:3]
    cfg = PruningConfig(mode="mask", schedule=(1,), keep_ratio=0.5)
    got = select_kept(torch.tensor(y), cfg, 0, live=torch.tensor(live), protected=torch.tensor(protected))
    scores = np.take_along_axis(R.token_importance(y, "clip"), live, axis=1)
    sub = R.select_tokens(scores, 0.5, protected=np.full((3, 1), 2), rule="ceil")
    np.testing.assert_array_equal(got.numpy(), np.take_along_axis(live, sub, axis=1))
    assert top_tokens(torch.tensor([[1.0, 1.0, 1.0]]), 2).tolist() == [[0, 1]]     # ties: lower index first


# --- position maps on the device equal the reference ----------------------------------------

def _same_map(torch_map, numpy_map):
    np.testing.assert_array_equal(torch_map.positions.numpy(), numpy_map.positions)
    np.testing.assert_array_equal(torch_map.seqlen_rows.numpy(), numpy_map.seqlen_rows)
    for alignment in R.ALIGNMENTS:
        for got, want in zip(torch_map.coefficients(alignment), numpy_map.coefficients(alignment)):
            np.testing.assert_array_equal(got.numpy(), want)


@settings(max_examples=60, deadline=None)
@given(case=position_maps(max_length=10, max_run=12), seed=st.integers(0, 2**32 - 1))
def test_every_transform_of_a_device_map_equals_the_reference(case, seed):
    style, positions, seqlen = case
    if positions is None:
        return
    rng = np.random.default_rng(seed)
    batch = positions.shape[0] if positions.ndim == 2 else int(rng.integers(1, 4))
    reference = R.PositionMap(positions, seqlen, batch=batch, length=positions.shape[-1]).fit(batch,
                                                                                              positions.shape[-1])
    device = TorchPositionMap(torch.tensor(positions), seqlen, batch=batch, length=positions.shape[-1]) \
        .fit(batch, positions.shape[-1])
    trusted = TorchPositionMap.trusted(torch.tensor(reference.positions), int(seqlen))
    for made in (device, trusted):
        _same_map(made, reference)
        _same_map(made.flip(), reference.flip())
        _same_map(made.flip().flip(), reference)
        k = int(rng.integers(1, reference.length + 1))
        kept = np.stack([np.sort(rng.choice(reference.length, k, replace=False)) for _ in range(batch)])
        _same_map(made.compose(torch.tensor(kept)), reference.compose(kept))
        order = rng.permutation(seqlen)
        index, along = made.path(torch.tensor(order))
        ref_index, ref_along = reference.path(order)
        np.testing.assert_array_equal(index.numpy(), ref_index)
        _same_map(along, ref_along)


# --- no host round trip in a pruned forward --------------------------------------------------

def _vim(mode, **kw):
    torch.manual_seed(0)
    pruning_cfg = None if mode == "dense" else PruningConfig(mode, (1, 3), 0.6, **kw)
    return models.create("vim_tiny", pruning=pruning_cfg, img_size=32, depth=4, num_classes=3).eval()


def _plainmamba(mode, **kw):
    torch.manual_seed(0)
    pruning_cfg = None if mode == "dense" else PruningConfig(mode, (1, 2), 0.6, **kw)
    return models.create("plainmamba_l1", pruning=pruning_cfg, img_size=32, depth=3, num_classes=3).eval()


def _plan(model, batch):
    """A nested keep plan for the model's stages (class token kept), checked before use."""
    tokens = model.num_tokens if hasattr(model, "num_tokens") else model.grid[0] * model.grid[1]
    keep = [torch.arange(tokens)[torch.arange(tokens) % 2 == 0], torch.arange(tokens)[torch.arange(tokens) % 4 == 0]]
    if hasattr(model, "cls_index"):
        keep = [torch.unique(torch.cat([k, torch.tensor([model.cls_index])])) for k in keep]
    return KeepPlan([k.expand(batch, -1) for k in keep], tokens)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("build", [_vim, _plainmamba], ids=["vim", "plainmamba"])
@pytest.mark.parametrize("mode", models.MODES)
def test_a_pruned_forward_makes_no_host_round_trip(build, mode, backend):
    conv = {"conv": "position_aware"} if build is _vim and mode == "align" else {}
    model = build(mode, **conv)
    model.backend = backend
    x = torch.randn(2, 3, 32, 32)
    plan = _plan(model, 2) if mode != "dense" else None
    with torch.no_grad():
        expected = model(x)
        with HostGuard():
            logits = model(x)
            planned = model(x, keep_plan=plan) if plan is not None else logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert torch.isfinite(planned).all()


def test_the_guard_catches_a_host_copy_in_the_selection(monkeypatch):
    """The guard can fail: a selection that scores the tokens in NumPy (``y.cpu().numpy()``)
    and sends the kept indices back, the plainest way to write it, is caught."""
    def host_select(y, config, stage, live=None, protected=None):
        scores = R.token_importance(y.detach().to(torch.float64).cpu().numpy(), config.metric)
        kept = R.select_tokens(scores, config.ratio(stage), rule=config.count_rule,
                               protected=None if protected is None else protected.cpu().numpy())
        return torch.as_tensor(kept, device=y.device)

    monkeypatch.setattr(models.stages, "select_kept", host_select)
    model = _vim("align")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))                   # works, with a host round trip
        with pytest.raises(HostSyncError, match="Tensor.cpu|Tensor.numpy|host"):
            with HostGuard():
                model(torch.randn(1, 3, 32, 32))
    user_positions = torch.tensor([[0, 2]])
    with pytest.raises(HostSyncError, match="validate_positions"):
        with HostGuard():
            TorchPositionMap(user_positions, 4)               # a user's map: its one host read, caught too


def test_a_plain_list_keep_plan_is_checked_once_on_the_host():
    model = _vim("align")
    plan = _plan(model, 1)
    with torch.no_grad():
        planned = model(torch.zeros(1, 3, 32, 32), keep_plan=plan)
        torch.testing.assert_close(model(torch.zeros(1, 3, 32, 32), keep_plan=list(plan.stages)), planned)
    with pytest.raises(ValueError, match="keep the class token"):
        model(torch.zeros(1, 3, 32, 32), keep_plan=KeepPlan([torch.tensor([[0, 1, 3]]), torch.tensor([[0]])]))
    assert pruning.KeepPlan is KeepPlan


# --- the whole pruned model under torch.compile(fullgraph=True) ------------------------------

@pytest.mark.parametrize("mode", ["align", "hold", "relabel"])
@pytest.mark.parametrize("name", ["vim_tiny", "plainmamba_l1"])
def test_the_pruned_model_compiles_whole_and_matches_eager(name, mode):
    """The paper's preset (ViM-T after 10 and 20, PlainMamba-L1 after 5 and 10); graph capture
    with fullgraph=True (any graph break fails) and the aot_eager backend; one model through
    inductor as well, as a user would run it."""
    torch.manual_seed(0)
    model = models.create(name, pruning=models.paper_preset(name, mode=mode), img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, eager, **COMPILE_TOLERANCE)
        if name == "vim_tiny" and mode == "align":
            torch._dynamo.reset()
            inductor = torch.compile(model, fullgraph=True)(x)
            torch.testing.assert_close(inductor, eager, **COMPILE_TOLERANCE)


def test_the_official_metric_is_the_released_codes_scoring_rule():
    """ToP-ViM's selector, transcribed from its description (SPEC §4): the backward branch's
    gated output alone, summed over channels, in flipped order and never flipped back, so
    token j is scored by the backward output at index j of the flipped sequence. Our
    "official" metric must keep exactly the tokens that rule ranks highest (class token
    protected in every row, as our models do)."""
    torch.manual_seed(0)
    model = models.create("vim_tiny", pruning=PruningConfig("align", (2,), 0.5, metric="official"), img_size=32,
                          depth=3, num_classes=3).eval()
    dense = models.create("vim_tiny", img_size=32, depth=3, num_classes=3).eval()
    dense.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    record = models.Recorder()
    with torch.no_grad():
        _, kept = model(x, return_kept=True)
        dense(x, record=record)
    backward_out = record.scans[2 * 1 + 1]["out"]            # layer 2 (index 1): its backward branch, flipped order
    scores = backward_out.double().sum(dim=1).numpy()        # token j <- flipped index j, not flipped back
    expected = R.select_tokens(scores, 0.5, protected=np.full((3, 1), model.cls_index), rule="ceil")
    np.testing.assert_array_equal(kept[0].numpy(), expected)
    with pytest.raises(ValueError, match="PlainMamba has none"):
        models.create("plainmamba_l1", pruning=PruningConfig("align", (1,), 0.5, metric="official"))
