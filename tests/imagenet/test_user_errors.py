"""Every user error of evaluate/finetune is one line naming the file or option, exit 2, no
traceback (the input is what needs fixing, not the program); a fresh run never appends to or
overwrites an earlier one."""
import json
import subprocess
import sys

import pytest
import torch

from tests import REPO
from tests.imagenet.test_imagenet import make_folder, official_files, save_official


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    folder, checkpoint = official_files(root, classes=2, per_class=2)
    return root, folder, checkpoint


def _run(*args):
    return subprocess.run([sys.executable, "-m", "alignscan", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _one_line_exit_2(run, *needles):
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    error = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, run.stderr
    for needle in needles:
        assert needle in error[0], (needle, error[0])


def _finetune(folder, out, *extra):
    return _run("finetune", "--model", "vim_tiny", "--data", folder, "--img-size", 64, "--keep", 0.5, "--epochs", 1,
                "--max-steps", 1, "--batch", 2, "--workers", 0, "--out", out, *extra)


def test_finetune_stops_on_an_unreadable_image_and_skips_it_when_asked(files, tmp_path):
    _, _, checkpoint = files
    broken = make_folder(tmp_path / "broken", classes=2, per_class=2)
    (broken / "class_00" / "img_0.png").write_bytes(b"not a png")
    _one_line_exit_2(_finetune(broken, tmp_path / "a", "--checkpoint", checkpoint, "--max-steps", 2),
                     "unreadable image", "img_0.png", "--skip-unreadable")
    run = _finetune(broken, tmp_path / "b", "--checkpoint", checkpoint, "--max-steps", 2, "--skip-unreadable")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "finetune_run.json").read_text())["finetune"]["unreadable_skipped"] == 1


def test_resume_from_a_released_checkpoint_says_what_it_lacks(files, tmp_path):
    _, folder, checkpoint = files
    _one_line_exit_2(_finetune(folder, tmp_path, "--resume", checkpoint), "--resume", "'optimizer'", "--checkpoint")


def test_a_fresh_run_into_a_used_out_refuses_unless_resume_or_overwrite(files, tmp_path):
    _, folder, checkpoint = files
    assert _finetune(folder, tmp_path, "--checkpoint", checkpoint).returncode == 0
    log = tmp_path / "finetune_log.jsonl"
    first = log.read_text()
    _one_line_exit_2(_finetune(folder, tmp_path, "--checkpoint", checkpoint), "--out", "--resume", "--overwrite")
    assert log.read_text() == first                                   # nothing appended, nothing replaced
    assert _finetune(folder, tmp_path, "--checkpoint", checkpoint, "--overwrite").returncode == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("run") for r in records if "run" in r] == ["started"]            # a new log, not appended
    saved = tmp_path / "checkpoint_vim_tiny_align.pth"
    run = _finetune(folder, tmp_path, "--resume", saved, "--max-steps", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("run") for r in records if "run" in r] == ["started", "resumed"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_training_from_random_weights_needs_the_flag_and_says_so(files, tmp_path):
    _, folder, _ = files
    _one_line_exit_2(_finetune(folder, tmp_path / "a"), "--checkpoint", "--from-scratch")
    run = _finetune(folder, tmp_path / "b", "--from-scratch")
    assert run.returncode == 0 and "from random weights" in run.stdout, run.stderr[-3000:]


def test_a_checkpoint_of_another_image_size_is_diagnosed_as_such(files, tmp_path):
    _, folder, _ = files
    other = tmp_path / "vim_tiny_32.pth"
    save_official(other, "vim_tiny", 2, 32)
    run = _run("evaluate", "--model", "vim_tiny", "--checkpoint", other, "--data", folder, "--img-size", 64,
               "--modes", "dense", "--workers", 0, "--out", tmp_path / "o")
    _one_line_exit_2(run, str(other), "another image size", "pos_embed")
    assert "another width" not in run.stderr


def test_data_and_checkpoint_problems_exit_2_in_one_line(files, tmp_path):
    _, folder, checkpoint = files
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(checkpoint.read_bytes()[:1000])
    base = ["evaluate", "--model", "vim_tiny", "--data", folder, "--img-size", 64, "--modes", "dense", "--workers", 0]
    _one_line_exit_2(_run(*base, "--checkpoint", damaged, "--out", tmp_path / "a"), str(damaged))
    wrong = tmp_path / "pm.pth"
    save_official(wrong, "plainmamba_l1", 2, 64)
    _one_line_exit_2(_run(*base, "--checkpoint", wrong, "--out", tmp_path / "b"), "another architecture")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    _one_line_exit_2(_run(*[a if a is not folder else tmp_path / "empty" for a in base], "--checkpoint", checkpoint,
                          "--out", tmp_path / "c"), "--data", "no images")


def test_outputs_honour_the_umask(tmp_path):
    """Files the programs keep get the mode any file the user creates gets: written to a
    temporary file and renamed into place, they must not keep the temporary file's 0600."""
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); from alignscan.outputs import write_json, save_torch; "
            "write_json(sys.argv[2] + '/a.json', {}); import torch; save_torch({}, sys.argv[2] + '/b.pth'); "
            "open(sys.argv[2] + '/c.log', 'w').close()")
    for umask, mode in (("022", 0o644), ("077", 0o600), ("002", 0o664)):
        out = tmp_path / umask
        out.mkdir()
        subprocess.run([sys.executable, "-c", code, umask, str(out)], check=True, timeout=120)
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert modes == {"a.json": mode, "b.pth": mode, "c.log": mode}, (umask, modes)
    assert torch is not None
