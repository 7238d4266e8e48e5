"""One way to build a model: ``models.create(name, **kwargs)`` picks the class from the
registry card's family, builds it with the card's config and then the caller's kwargs, and
sets ``arch_name``; the per-model functions (``vim_tiny`` ...) and timm's entry points are
that call, so they give the same architecture; a bad name is refused naming the argument."""
import pytest
import torch

from alignscan import models, registry
from alignscan.models import plainmamba, vim

CLASSES = {"vim": models.VisionMamba, "plainmamba": models.PlainMamba}
FUNCTIONS = {"vim_tiny": models.vim_tiny, "vim_small": models.vim_small, "plainmamba_l1": models.plainmamba_l1,
             "plainmamba_l2": models.plainmamba_l2, "plainmamba_l3": models.plainmamba_l3}
# Small enough to build fast; the card's width and stem stay.
SMALL = dict(depth=2, img_size=32, num_classes=3)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", registry.NAMES)
def test_create_builds_the_cards_class_with_its_config_and_arch_name(name):
    card = registry.card(name)
    model = models.create(name, **SMALL)
    assert type(model) is CLASSES[card.family]
    assert model.arch_name == name
    assert model.embed_dim == card.config["embed_dim"]
    layers = model.layers if card.family == "vim" else model.backbone.layers
    assert len(layers) == SMALL["depth"], "a kwarg overrides the card"
    assert model.num_classes == 3 and model.pruning == models.PruningConfig()
    if card.family == "plainmamba":
        stem = sum(isinstance(m, torch.nn.Conv2d) for m in model.backbone.patch_embed.convs)
        assert stem == card.config["stem_convs"] and hasattr(layers[0], "dw") == card.config["dw_after_first"]


def test_create_keeps_the_classes_defaults_and_keywords():
    model = models.create("vim_tiny", img_size=32, depth=1)
    assert model.num_classes == 1000 and model.backend is None and not model.pruning.active
    preset = models.paper_preset("plainmamba_l1", mode="relabel")
    pm = models.create("plainmamba_l1", pruning=preset, backend="torch", img_size=32, depth=12, channels=1)
    assert pm.pruning == preset and pm.backend == "torch" and pm.backbone.patch_embed.stem[0].in_channels == 1
    with pytest.raises(TypeError):
        models.create("vim_tiny", no_such_keyword=1)


def test_a_bad_name_is_refused_naming_the_argument_and_the_known_names():
    with pytest.raises(ValueError, match=r"name must be one of .*vim_tiny.*plainmamba_l3.*got 'vim_huge'"):
        models.create("vim_huge")


@pytest.mark.parametrize("name", registry.NAMES)
def test_the_per_model_function_is_create(name):
    torch.manual_seed(0)
    ours = models.create(name, **SMALL)
    theirs = FUNCTIONS[name](**SMALL)
    assert type(theirs) is type(ours) and theirs.arch_name == name
    assert _shapes(theirs) == _shapes(ours)
    pruning = models.PruningConfig("align", (1,), 0.5)
    positional = FUNCTIONS[name](pruning, 5, depth=SMALL["depth"], img_size=32)      # (pruning, num_classes)
    assert positional.pruning == pruning and positional.num_classes == 5
    assert getattr(vim if registry.family(name) == "vim" else plainmamba, name) is FUNCTIONS[name]


@pytest.mark.parametrize("name", registry.NAMES)
@pytest.mark.parametrize("preset", [False, True], ids=["dense", "paper preset"])
def test_the_timm_entry_points_are_create(name, preset):
    timm_models = pytest.importorskip("alignscan.models.timm_models")
    small = {**SMALL, "depth": registry.card(name).schedule[-1]}          # deep enough for the preset's stages
    ours = models.create(name, pruning=models.paper_preset(name) if preset else None, **small)
    theirs = getattr(timm_models, timm_models.timm_name(name, preset))(**small)
    assert type(theirs) is type(ours) and theirs.arch_name == name and theirs.pruning == ours.pruning
    assert _shapes(theirs) == _shapes(ours)
