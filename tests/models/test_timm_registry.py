"""The five models in timm's registry: ``timm.create_model`` builds the same architecture as
``models.create`` (same parameters, same outputs from the same weights), dense and with the
paper's preset; their data config is the released checkpoints' transform; a timm-style
script runs them through the launcher."""
import subprocess
import sys

import pytest
import torch

from alignscan import models, registry, vision
from alignscan.models import timm_models
from tests import REPO

timm = vision.timm()          # torchvision first, as alignscan.vision explains


@pytest.mark.parametrize("name", registry.NAMES)
@pytest.mark.parametrize("preset", [False, True], ids=["dense", "paper preset"])
def test_timm_creates_the_same_architecture_as_models_create(name, preset):
    torch.manual_seed(0)
    ours = models.create(name, pruning=models.paper_preset(name) if preset else None, img_size=64, num_classes=7)
    theirs = timm.create_model(timm_models.timm_name(name, preset), img_size=64, num_classes=7)
    assert type(theirs) is type(ours)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert theirs.pruning == ours.pruning
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=0, atol=0)


def test_timm_keywords_and_the_released_transform():
    m = timm.create_model("vim_tiny", pruning="relabel", img_size=64, num_classes=None, in_chans=3,
                          drop_path_rate=0.1)
    assert m.pruning == models.paper_preset("vim_tiny", mode="relabel") and m.num_classes == 1000
    assert m.layers[-1].drop_path.drop_prob > 0
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("plainmamba_l1_paper"))
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"]) == ((3, 224, 224), "bicubic", 0.875)
    assert set(timm.list_models("vim_*") + timm.list_models("plainmamba_*")) >= set(timm_models.TIMM_NAMES)
    with pytest.raises(TypeError, match="pruning must be"):
        timm.create_model("vim_tiny", pruning=0.5)


def test_pretrained_reads_a_local_checkpoint_in_the_official_layout(tmp_path):
    torch.manual_seed(1)
    source = models.create("plainmamba_l1", img_size=64, num_classes=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "pm.pth")          # mmcls layout
    loaded = timm.create_model("plainmamba_l1", pretrained=True, img_size=64, num_classes=3,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "pm.pth")))
    for a, b in zip(loaded.state_dict().values(), source.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    vim = models.create("vim_tiny", img_size=64, num_classes=3)
    torch.save({"model": vim.state_dict()}, tmp_path / "vim.pth")                    # ViM's layout, timm's loader
    read = timm.create_model("vim_tiny_paper", img_size=64, num_classes=3, checkpoint_path=str(tmp_path / "vim.pth"))
    for a, b in zip(read.state_dict().values(), vim.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


SCRIPT = '''
import argparse, torch, timm
from timm.data import create_transform, resolve_data_config
p = argparse.ArgumentParser(); p.add_argument("--model"); p.add_argument("--img-size", type=int)
args = p.parse_args()
model = timm.create_model(args.model, pretrained=False, num_classes=None, in_chans=3, global_pool=None,
                          img_size=args.img_size).eval()
config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
transform = create_transform(**config)
from PIL import Image
image = Image.new("RGB", (90, 80), (120, 30, 200))
with torch.no_grad():
    print("logits", tuple(model(transform(image)[None]).shape), config["interpolation"], config["crop_pct"])
'''


def test_a_timm_script_runs_the_models_through_the_launcher(tmp_path):
    script = tmp_path / "validate_like.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, "-m", "alignscan.models.timm_models", str(script), "--model",
                          "vim_tiny_paper", "--img-size", "64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "logits (1, 1000) bicubic 0.875" in run.stdout


def test_drop_path_follows_the_official_schedules_and_is_off_in_eval():
    from alignscan.models.layers import drop_paths
    vim = models.create("vim_tiny", img_size=64, num_classes=3, drop_path_rate=0.2)
    rates = [0.0 if isinstance(b.drop_path, torch.nn.Identity) else b.drop_path.drop_prob for b in vim.layers]
    assert rates[:2] == [0.0, 0.0] and rates[-1] == pytest.approx(0.2 * 22 / 23)     # [0] + linspace(0, r, depth)
    pm = models.create("plainmamba_l1", img_size=64, num_classes=3, drop_path_rate=0.2)
    assert pm.backbone.layers[-1].drop_path.drop_prob == pytest.approx(0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(vim.eval()(x), vim(x), rtol=0, atol=0)
        vim.train()
        torch.manual_seed(0)
        a = vim(x)
        torch.manual_seed(1)
        assert not torch.equal(a, vim(x))                                   # stochastic depth while training
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="drop_path_rate"):
            drop_paths(bad, 4)


def test_torchvision_and_timm_import_beside_this_torch():
    tv = vision.torchvision()
    from torchvision.transforms import v2
    assert hasattr(tv.datasets, "ImageFolder") and v2.Compose([v2.CenterCrop(4)])(torch.zeros(3, 8, 8)).shape == (3, 4, 4)
    try:                                   # the wheel's compiled operators: present, or declared without kernels
        tv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
        assert vision.declared_schemas() == ()
    except (NotImplementedError, RuntimeError) as exc:
        assert vision.declared_schemas() and "custom C++ ops" in str(exc)
