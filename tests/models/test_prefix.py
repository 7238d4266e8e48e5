"""``VisionMamba.prefix``: the layers before the first pruning stage, computed once and
shared by every mode and keep plan on the same images (the zero-shot grid runs them so). A
forward from the prefix gives the logits and kept tokens of the whole forward, in every
pruning setting the experiment uses; a prefix that does not fit is refused."""
import numpy as np
import pytest
import torch

from alignscan import models
from alignscan import reference as R
from alignscan.models.pruning import PruningConfig

TINY_VIM = dict(embed_dim=32, depth=4, img_size=64, num_classes=10)       # 16 patches + class token at 8
SCHEDULE = (2, 3)
# The experiment's rows (science.design.MODE_SETTINGS): the alignments with both convs, the
# baselines and the released code's selector with the compact one.
CASES = [dict(mode=m, conv=c) for m in ("align", "hold", "self", "relabel", "mask") for c in ("compact", "position_aware")] + \
    [dict(mode=m, pruned_tokens=t) for m in ("align", "relabel") for t in ("fuse", "merge")] + \
    [dict(mode="relabel", metric="official", recenter_cls=True)]
TOL = R.tolerance(np.float32)


def _vim(**cfg):
    torch.manual_seed(0)
    return models.vim_tiny(pruning=PruningConfig(schedule=SCHEDULE, keep_ratio=0.6, **cfg) if cfg else None,
                           **TINY_VIM).eval()


def _plan(n, ratio=0.6, seed=3):
    """Nested random keep plans of the experiment's size, the class token (8) in every stage."""
    rng = np.random.default_rng(seed)
    current, plan = np.tile(np.arange(17), (n, 1)), []
    for _ in SCHEDULE:
        k = R.keep_count(current.shape[1], ratio, n_protected=1)
        current = np.stack([np.sort(np.append(rng.choice(row[row != 8], k - 1, replace=False), 8)) for row in current])
        plan.append(torch.as_tensor(current))
    return plan


@pytest.mark.parametrize("setting", CASES, ids=lambda s: "+".join(map(str, s.values())))
@pytest.mark.parametrize("planned", [False, True], ids=["own selection", "keep plan"])
def test_a_forward_from_the_prefix_is_the_whole_forward(setting, planned):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    dense, pruned = _vim(), _vim(**setting)
    plan = _plan(len(images)) if planned else None
    with torch.no_grad():
        prefix = dense.prefix(images, SCHEDULE[0])
        whole, kept = pruned(images, return_kept=True, keep_plan=plan)
        started, kept_started = pruned(images, return_kept=True, keep_plan=plan, prefix=prefix)
        rows = torch.tensor([2, 0])
        part = pruned(images[rows], keep_plan=None if plan is None else [s[rows] for s in plan], prefix=prefix[rows])
        others = images.flip(0) * 0.5
        used = pruned(images, keep_plan=plan, prefix=dense.prefix(others, SCHEDULE[0]))   # the prefix, not the images
        assert not torch.allclose(used, whole)
        torch.testing.assert_close(used, pruned(others, keep_plan=plan), **TOL)
    torch.testing.assert_close(started, whole, **TOL)
    torch.testing.assert_close(part, whole[rows], **TOL)
    for a, b in zip(kept_started, kept):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)


def test_the_dense_model_runs_its_remaining_layers_from_a_prefix():
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    dense = _vim()
    with torch.no_grad():
        for layers in (1, 4):
            torch.testing.assert_close(dense(images, prefix=dense.prefix(images, layers)), dense(images), **TOL)


def test_a_prefix_that_does_not_fit_is_refused():
    images = torch.randn(3, 3, 64, 64)
    dense, pruned = _vim(), _vim(mode="align")
    with torch.no_grad():
        late = dense.prefix(images, 3)
        with pytest.raises(ValueError, match="prefix must end at or before the first pruning stage"):
            pruned(images, prefix=late)
        with pytest.raises(ValueError, match="prefix must be of these 2 images"):
            pruned(images[:2], prefix=dense.prefix(images, 2))
        with pytest.raises(TypeError, match="prefix must be a Prefix"):
            pruned(images, prefix=(1, 2))
        with pytest.raises(ValueError, match=r"layers must be an int in \[1, 4\]"):
            dense.prefix(images, 0)
        with pytest.raises(ValueError, match="record= cannot be given with prefix="):
            pruned(images, prefix=dense.prefix(images, 2), record=models.Recorder())
