"""A resumed fine-tuning run keeps the settings it was trained with: an option given another
value (learning rate, weight decay, optimizer, pruning mode, batch, epochs, ...) is refused in
one line that lists each with the checkpoint's value, exit 2, before any step and before the
log is touched; the same values, or none, resume."""
import json

import pytest

from alignscan import cli
from tests.imagenet.test_imagenet import official_files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    folder, checkpoint = official_files(root, classes=2, per_class=2)
    out = root / "run"
    assert cli.main(_finetune(folder, out, "--checkpoint", str(checkpoint))) == 0
    return folder, out


def _finetune(folder, out, *extra):
    return ["finetune", "--model", "vim_tiny", "--data", str(folder), "--img-size", "64", "--keep", "0.5",
            "--epochs", "1", "--max-steps", "1", "--batch", "2", "--workers", "0", "--out", str(out), *extra]


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("changed,named", [
    (["--lr", "1e-2", "--weight-decay", "0.5"], ["--lr 0.01 (checkpoint: 5e-06)", "--weight-decay 0.5 (checkpoint: 1e-08)"]),
    (["--opt", "sgd"], ["--opt sgd (checkpoint: adamw)"]),
    (["--mode", "relabel"], ["--mode relabel (checkpoint: align)"]),
    (["--epochs", "3"], ["--epochs 3 (checkpoint: 1)"]),
])
def test_a_changed_setting_is_refused_naming_each_with_the_checkpoints_value(trained, capsys, changed, named):
    folder, out = trained
    log = (out / "finetune_log.jsonl").read_text()
    saved = out / "checkpoint_vim_tiny_align.pth"
    error = _refused([*_finetune(folder, out, "--resume", str(saved)), *changed], capsys)
    for text in named:
        assert text in error, (text, error)
    assert "--checkpoint" in error
    assert (out / "finetune_log.jsonl").read_text() == log          # nothing logged, nothing trained


def test_the_same_settings_resume(trained):
    folder, out = trained
    saved = out / "checkpoint_vim_tiny_align.pth"
    assert cli.main([*_finetune(folder, out, "--resume", str(saved)), "--max-steps", "2"]) == 0
    records = [json.loads(line) for line in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert [r["run"] for r in records if "run" in r] == ["started", "resumed"]
