"""The scan backend follows the device the models run on: on a GPU, evaluate and finetune
build models whose scans take a CUDA backend (no --backend needed), an explicit --backend
is checked against that device before any work, and the run record names what ran.

No GPU here: the process is made to believe it has one (torch.cuda.is_available and
set_device are replaced) and each command is stopped right after it builds its first model,
before anything would be moved to the device."""
import importlib
import json

import pytest
import torch

from alignscan import cli
from alignscan.cuda_kernels import backends
from tests.imagenet.test_imagenet import official_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder, checkpoint = official_files(tmp_path_factory.mktemp("device"), classes=2, per_class=1)
    return folder, checkpoint


@pytest.fixture
def a_gpu_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)


class _Built(Exception):
    """Raised by the wrapped builder: the command built its model and goes no further."""


def _arguments(command, files, out):
    folder, checkpoint = files
    common = ["--model", "vim_tiny", "--data", str(folder), "--img-size", "64", "--workers", "0", "--out", str(out)]
    if command == "evaluate":
        return ["evaluate", *common, "--checkpoint", str(checkpoint), "--modes", "align"]
    return ["finetune", *common, "--checkpoint", str(checkpoint), "--mode", "align", "--keep", "0.5",
            "--epochs", "1", "--max-steps", "1", "--batch", "2"]


def _built_models(command, argv, monkeypatch):
    module = importlib.import_module(f"alignscan.imagenet.{command}")
    real, built = module.build, []

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        raise _Built
    monkeypatch.setattr(module, "build", build)
    with pytest.raises(_Built):
        cli.main(argv)
    return built


@pytest.mark.parametrize("command", ["evaluate", "finetune"])
def test_on_a_gpu_the_models_scan_with_a_cuda_backend(command, files, tmp_path, a_gpu_process, monkeypatch):
    (model,) = _built_models(command, _arguments(command, files, tmp_path), monkeypatch)
    # The op resolves the backend per call from its tensors' device: on CUDA tensors this one
    # must be a backend that takes them (before, the CLI's CPU default "numba-cpu" was baked in).
    name = backends.resolve(model.backend, "cuda")
    assert backends.get(name).takes("cuda"), name


@pytest.mark.parametrize("command", ["evaluate", "finetune", "models"])
def test_a_cpu_backend_asked_for_on_a_gpu_is_a_usage_error_before_any_work(command, files, tmp_path, a_gpu_process,
                                                                           capsys):
    argv = ["models", "--quick", "--out", str(tmp_path)] if command == "models" \
        else _arguments(command, files, tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--backend", "numba-cpu"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "numba-cpu" in error and "cuda" in error and "GPU" in error
    assert not list(tmp_path.iterdir())


def test_the_variable_is_checked_against_the_device_too(files, tmp_path, a_gpu_process, monkeypatch, capsys):
    monkeypatch.setenv(backends.ENV_BACKEND, "numba-cpu")
    with pytest.raises(SystemExit) as stop:
        cli.main(_arguments("evaluate", files, tmp_path))
    assert stop.value.code == 2 and backends.ENV_BACKEND in capsys.readouterr().err


def test_on_the_cpu_the_record_names_the_backend_that_ran(files, tmp_path, monkeypatch):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    assert cli.main(_arguments("evaluate", files, tmp_path)) == 0
    record = json.loads((tmp_path / "evaluate_run.json").read_text())
    assert record["backend"] == {"name": "numba-cpu", "device": "cpu", "requested": None}
    assert json.loads((tmp_path / "evaluate.json").read_text())["backend"] == "numba-cpu"
