"""timm's model API on both families: forward_features / forward_head compose to forward
(pruned too), get_classifier / reset_classifier, no_weight_decay as timm's optimizer factory
reads it, gradient checkpointing with the same gradients, and the layer groups."""
import pytest
import torch
from torch import nn

from alignscan import models, vision
from alignscan.models.pruning import PruningConfig

timm = vision.timm()          # torchvision first, as alignscan.vision explains
from timm.optim import create_optimizer_v2  # noqa: E402

TINY = dict(embed_dim=32, depth=4, img_size=64, num_classes=10)        # 16 patches (+ ViM's class token)
FAMILIES = ["vim_tiny", "plainmamba_l1"]


def _images(n=3, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _model(name, pruning=None, **kwargs):
    torch.manual_seed(0)
    return models.create(name, pruning=pruning, **{**TINY, **kwargs})


PRUNINGS = {"dense": None, "align": PruningConfig(mode="align", schedule=(1, 3), keep_ratio=0.5),
            "relabel": PruningConfig(mode="relabel", schedule=(2,), keep_ratio=0.6)}


@pytest.mark.parametrize("pruning", list(PRUNINGS))
@pytest.mark.parametrize("name", FAMILIES)
def test_forward_head_of_forward_features_is_forward(name, pruning):
    model = _model(name, PRUNINGS[pruning]).eval()
    x = _images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (3, 32)
        torch.testing.assert_close(model.forward_head(features), model(x), rtol=0, atol=0)
        assert model.forward_head(features, pre_logits=True) is features
    assert model.num_features == model.head_hidden_size == 32


def test_vim_forward_features_is_the_class_token_where_pruning_left_it():
    model = _model("vim_tiny", PRUNINGS["align"]).eval()
    x = _images(2)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.head(features), model(x), rtol=0, atol=0)
        # merge keeps each image's own token count: the features go through the same per-image path
        # (forward applies the head per group of images, forward_head to the batch: a matmul's rounding apart)
        merge = _model("vim_tiny", PruningConfig(mode="relabel", schedule=(1,), keep_ratio=0.5,
                                                 pruned_tokens="merge")).eval()
        torch.testing.assert_close(merge.forward_head(merge.forward_features(x)), merge(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_get_and_reset_classifier(name):
    model = _model(name).eval()
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert head is (model.head if name.startswith("vim") else model.head.fc)
    x = _images(2)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(5)
        assert model.num_classes == 5 and model.get_classifier().out_features == 5
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        torch.testing.assert_close(model(x), features, rtol=0, atol=0)      # no head: the features
    model.reset_classifier(3, global_pool=model.global_pool)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    assert isinstance(models.create(name, **{**TINY, "num_classes": 0}).get_classifier(), nn.Identity)


def test_no_weight_decay_names_the_embedding_and_the_ssm_a_and_d():
    vim = _model("vim_tiny")
    expected = {"pos_embed", "cls_token"} | {f"layers.{i}.mixer.{p}" for i in range(4)
                                             for p in ("A_log", "D", "A_b_log", "D_b")}
    assert vim.no_weight_decay() == expected
    pm = _model("plainmamba_l1")
    assert pm.no_weight_decay() == {"backbone.pos_embed"} | {f"backbone.layers.{i}.mamba.{p}" for i in range(4)
                                                             for p in ("A_log", "D")}
    for model in (vim, pm):
        params = dict(model.named_parameters())
        assert model.no_weight_decay() <= set(params)
        assert all(getattr(params[n], "_no_weight_decay", False) for n in model.no_weight_decay()
                   if n.endswith(("A_log", "D", "D_b")))                  # mamba's own mark, as the official mixers
        # timm's optimizer factory reads the list: those parameters get no weight decay
        optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
        undecayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert all(id(params[n]) in undecayed for n in model.no_weight_decay())
        assert id(params["patch_embed.proj.weight" if model is vim else "backbone.patch_embed.projection.weight"]) \
            not in undecayed


@pytest.mark.parametrize("pruning", ["dense", "align"])
@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(name, pruning):
    """In training, with stochastic depth drawing (its draws replayed in the recomputation) and
    PlainMamba-L1's BatchNorm (its running statistics updated once)."""
    x, target = _images(2), torch.tensor([1, 7])
    results = []
    for enable in (False, True):
        model = _model(name, PRUNINGS[pruning], drop_path_rate=0.3).train()
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable
        layers = model.layers if name.startswith("vim") else model.backbone.layers
        calls, forward = [], layers[2].forward
        layers[2].forward = lambda *args: calls.append(1) or forward(*args)     # (hooks do not see a recomputation)
        torch.manual_seed(5)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        assert len(calls) == (2 if enable else 1)                   # recomputed in the backward pass
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        {n: b.clone() for n, b in model.named_buffers()}))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(dict(model.named_parameters()))
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-6, atol=1e-7, msg=n)
    for n in buffers_a:
        torch.testing.assert_close(buffers_b[n], buffers_a[n], rtol=0, atol=0, msg=n)


def test_gradient_checkpointing_is_off_where_it_cannot_apply():
    from alignscan.models import Recorder
    model = _model("vim_tiny").train()
    model.set_grad_checkpointing()
    record = Recorder()
    model(_images(1), record=record)                  # recorded scans: once per branch and layer, not twice
    assert len(record.scans) == 2 * 4
    with torch.no_grad():
        model.eval()(_images(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_group_matcher_puts_every_parameter_in_a_group(name):
    model = _model(name)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(dict(model.named_parameters()))
    assert len(groups) == 4 + 2            # the embedding, one per layer, the final norm (with the head)
