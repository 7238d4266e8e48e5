"""Pretrained weights through timm's own loader, offline, from local files in the official
layouts (written here from randomly initialised models): another number of classes gets a
fresh head (with a notice), another image size a resampled position embedding (ViM's class
token kept in the middle; the same size is the identity), the pretrained configs name the
released files on the Hugging Face Hub and timm's hub path reads them as a local file."""
import logging

import pytest
import torch

from alignscan import models, vision
from alignscan.models import timm_models
from alignscan.models.layers import resample_pos_embed

timm = vision.timm()          # torchvision first, as alignscan.vision explains
from timm.models._builder import _resolve_pretrained_source  # noqa: E402


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """ViM-T and PlainMamba-L1 at 224 px with 1000 classes, saved as their releases are laid out."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    vim = models.create("vim_tiny").eval()
    torch.save({"model": vim.state_dict(), "epoch": 299}, root / "vim_t_midclstok_76p1acc.pth")
    pm = models.create("plainmamba_l1").eval()
    state = dict(pm.state_dict())
    state["ema_backbone_pos_embed"] = torch.zeros(1)                         # mmcv's EMAHook entries: dropped
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, root / "l1.pth")
    return {"vim_tiny": (vim, root / "vim_t_midclstok_76p1acc.pth"), "plainmamba_l1": (pm, root / "l1.pth")}


def _same_except(loaded, source, skip=()):
    theirs = source.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith(skip):
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["vim_tiny", "plainmamba_l1"])
def test_another_number_of_classes_gets_a_fresh_head_with_a_notice(released, name, caplog):
    source, path = released[name]
    with caplog.at_level(logging.INFO, logger="alignscan.models.checkpoints"):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10)
    notices = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert len(notices) == 1 and "1000 classes, the model 10" in notices[0] and str(path) in notices[0]
    head = model.get_classifier()
    assert head.out_features == 10 and model.num_classes == 10
    _same_except(model, source, skip=("head",))
    assert model.checkpoint_weights == ("model" if name.startswith("vim") else "state_dict")
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    same = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _same_except(same, source)                                       # 1000 classes: everything, the head too


def test_vim_at_another_image_size_resamples_pos_embed_around_the_middle_class_token(released):
    source, path = released["vim_tiny"]
    model = timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_size=256).eval()
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 192) and model.cls_index == 128
    # the class token's row moves from the middle of 14 x 14 patches to the middle of 16 x 16
    torch.testing.assert_close(model.pos_embed[:, 128], source.pos_embed[:, 98], rtol=0, atol=0)
    patches = torch.cat([source.pos_embed[:, :98], source.pos_embed[:, 99:]], dim=1)
    expected = timm.layers.resample_abs_pos_embed(patches, [16, 16], [14, 14], num_prefix_tokens=0)
    torch.testing.assert_close(torch.cat([model.pos_embed[:, :128], model.pos_embed[:, 129:]], dim=1), expected,
                               rtol=0, atol=0)
    _same_except(model, source, skip=("pos_embed",))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 256, 256))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    # at the checkpoint's own size the resampling is the identity
    assert resample_pos_embed(source.pos_embed, 14, middle_token=True) is source.pos_embed
    at_224 = timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=224)
    torch.testing.assert_close(at_224.pos_embed, source.pos_embed, rtol=0, atol=0)


def test_plainmamba_at_another_image_size_resamples_its_grid_position_embedding(tmp_path):
    torch.manual_seed(0)
    source = models.create("plainmamba_l1", embed_dim=32, depth=2, img_size=64)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "pm.pth")
    model = models.create("plainmamba_l1", embed_dim=32, depth=2, img_size=96)
    model.load_pretrained(tmp_path / "pm.pth")
    expected = timm.layers.resample_abs_pos_embed(source.backbone.pos_embed, [6, 6], [4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(model.backbone.pos_embed, expected, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 96, 96))).all()
    with pytest.raises(ValueError, match="shape mismatches"):             # without adapt: a clear error, as before
        models.load_checkpoint(models.create("plainmamba_l1", embed_dim=32, depth=2, img_size=96), tmp_path / "pm.pth")


def test_a_position_embedding_that_is_no_square_grid_is_refused():
    with pytest.raises(ValueError, match="pos_embed must be"):
        resample_pos_embed(torch.zeros(1, 15, 8), 4)
    with pytest.raises(ValueError, match="plus the class token"):
        resample_pos_embed(torch.zeros(1, 16, 8), 4, middle_token=True)


def test_pretrained_reads_the_plain_weights_not_the_ema(tmp_path):
    torch.manual_seed(0)
    plain, ema = (models.create("vim_tiny", embed_dim=32, depth=2, img_size=64) for _ in range(2))
    torch.save({"model": plain.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "both.pth")
    model = timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "both.pth")),
                              embed_dim=32, depth=2, img_size=64)
    assert model.checkpoint_weights == "model"
    _same_except(model, plain)


def test_the_pretrained_configs_name_the_released_files_on_the_hub():
    expected = {"vim_tiny": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
                "vim_small": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
                "plainmamba_l1": ("ChenhongyiYang/PlainMamba", "l1.pth"),
                "plainmamba_l2": ("ChenhongyiYang/PlainMamba", "l2.pth"),
                "plainmamba_l3": ("ChenhongyiYang/PlainMamba", "l3.pth")}
    assert timm_models.RELEASES == expected
    assert set(timm.list_models(pretrained=True)) >= set(timm_models.TIMM_NAMES)
    for name, (repo, file) in expected.items():
        for variant in (name, f"{name}_paper"):
            cfg = timm.models.get_pretrained_cfg(variant).to_dict()
            assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == (repo, file)
            assert _resolve_pretrained_source(cfg) == ("hf-hub", (repo, file))     # what pretrained=True fetches
            assert cfg["classifier"] in ("head", "head.fc") and cfg["num_classes"] == 1000


def test_pretrained_true_goes_through_timms_hub_loader(released, monkeypatch):
    """timm's hf_hub_download stands in for the network: it hands back the local file, which
    the model's load_pretrained reads (head and size adapted as for a local file)."""
    source, path = released["vim_tiny"]
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(path)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    model = timm.create_model("vim_tiny_paper", pretrained=True, num_classes=3, img_size=64)
    assert asked == [("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")]
    assert model.get_classifier().out_features == 3 and model.pos_embed.shape == (1, 17, 192)
    _same_except(model, source, skip=("head", "pos_embed"))

    def offline(repo_id, filename, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("plainmamba_l1", pretrained=True)


def test_a_state_dict_handed_over_goes_through_the_filter(released):
    source, _ = released["plainmamba_l1"]
    state = {"state_dict": source.state_dict(), "meta": {}}
    model = timm.create_model("plainmamba_l1", pretrained=True, pretrained_cfg_overlay=dict(state_dict=state),
                              num_classes=4)
    assert model.get_classifier().out_features == 4
    _same_except(model, source, skip=("head",))


def test_one_input_channel_adapts_the_first_convolution(released):
    source, path = released["vim_tiny"]
    model = timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1)
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))


def test_timm_keywords_are_checked():
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("vim_tiny", global_pool="avg")
    with pytest.raises(ValueError, match="img_size must be square"):
        timm.create_model("plainmamba_l1", img_size=(64, 96))
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("vim_tiny", features_only=True)
    model = timm.create_model("plainmamba_l1", global_pool="avg", img_size=(64, 64), num_classes=0)
    assert model.img_size == 64 and model.num_classes == 0
