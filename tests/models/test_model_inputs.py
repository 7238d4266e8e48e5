"""A model refuses what it would otherwise get silently wrong: a pruning schedule beyond its
depth, an image of another size, a keep plan of the wrong length or order, a schedule that
is not a sequence; and FLOPs of a pruning that removes nothing equal the dense count
exactly."""
import pytest
import torch

from alignscan import models
from alignscan.models.pruning import PruningConfig


def _vim(**kw):
    return models.create("vim_tiny", img_size=32, depth=4, num_classes=3, **kw).eval()


def test_a_schedule_beyond_the_depth_is_an_error_naming_schedule_and_the_depth():
    with pytest.raises(ValueError, match=r"schedule must name layers 1\.\.24 of this 24-layer model.*30"):
        models.create("vim_tiny", pruning=PruningConfig("align", (30,), 0.5))
    with pytest.raises(ValueError, match=r"schedule must name layers 1\.\.4"):
        models.create("plainmamba_l1", pruning=PruningConfig("align", (2, 5), 0.5), depth=4, img_size=32)
    with pytest.raises(ValueError, match="schedule"):
        models.flops("vim_tiny", PruningConfig("align", (30,), 0.5))


def test_pruning_that_removes_nothing_costs_exactly_the_dense_flops():
    for name in models.NAMES:
        dense = models.flops(name)
        assert models.flops(name, models.paper_preset(name, keep_ratio=1.0)) == dense, name
        assert models.flops(name, PruningConfig("align", (), 0.5)) == dense, name
        assert models.flops(name, models.paper_preset(name)) < dense, name


@pytest.mark.parametrize("size", [31, 33, 48, 64])
def test_an_image_of_another_size_is_refused_by_name(size):
    for model in (_vim(), models.create("plainmamba_l1", img_size=32, depth=2, num_classes=3).eval()):
        with pytest.raises(ValueError, match=r"images must have shape \(batch, 3, 32, 32\)"):
            model(torch.zeros(1, 3, size, size))
    with pytest.raises(ValueError, match="img_size must be a positive multiple of 16"):
        models.create("vim_tiny", img_size=65)


def test_keep_plan_errors_name_keep_plan():
    model = _vim(pruning=PruningConfig("align", (1, 2), 0.5))
    x = torch.zeros(2, 3, 32, 32)
    full = torch.arange(5).expand(2, 5)                              # 4 patches + the class token
    with pytest.raises(ValueError, match=r"keep_plan must have one entry per pruning stage \(2"):
        model(x, keep_plan=[full[:, :4]])
    with pytest.raises(ValueError, match=r"keep_plan\[0\] must be strictly increasing"):
        model(x, keep_plan=[torch.tensor([[2, 0, 1], [0, 1, 2]]), full[:, :2]])
    with pytest.raises(TypeError, match=r"keep_plan\[0\] must hold integer token indices"):
        model(x, keep_plan=[full.float(), full])
    with pytest.raises(TypeError, match="keep_plan must be a list"):
        model(x, keep_plan=full)


def test_a_schedule_that_is_not_a_sequence_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="schedule must be a sequence of 1-based layer indices.*int 5"):
        PruningConfig("align", 5, 0.5)
    with pytest.raises(TypeError, match="schedule must be a sequence"):
        PruningConfig("align", "5", 0.5)
