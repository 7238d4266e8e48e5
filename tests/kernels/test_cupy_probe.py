"""The CuPy backend is chosen only where CuPy can compile and launch its kernels: a GPU whose
NVRTC or driver does not fit the installed cupy wheel makes the backend unavailable with the
reason, and the registry falls back to the next backend for CUDA tensors. No GPU here: CuPy
is made to see one device, and the compile (or the launch) is made to fail."""
import pytest

from alignscan.cuda_kernels import backends, cupy_raw

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (the cuda12/cuda13 extra)")


@pytest.fixture
def one_device(monkeypatch):
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    cupy_raw._module.cache_clear()
    yield
    cupy_raw._module.cache_clear()


@pytest.fixture
def unprobed(monkeypatch):
    """Every backend's probe runs afresh in the test, and the cached answers come back after."""
    for entry in backends._REGISTRY.values():
        monkeypatch.setattr(entry, "_reason", ...)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)


class _NoNvrtc(RuntimeError):
    pass


def test_a_failed_compile_makes_cupy_unavailable_with_its_reason(one_device, monkeypatch):
    def refuse(*args, **kwargs):
        raise _NoNvrtc("nvrtc: libnvrtc.so.12 cannot be loaded")
    monkeypatch.setattr(cupy, "RawModule", refuse)
    reason = cupy_raw.unavailable_reason()
    assert reason is not None and "cannot compile scan.cu" in reason and "libnvrtc.so.12" in reason


def test_a_failed_launch_makes_cupy_unavailable_with_its_reason(one_device, monkeypatch):
    monkeypatch.setattr(cupy, "RawModule", lambda *args, **kwargs: object())

    class Kernel:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError("cudaErrorNoKernelImageForDevice")
    monkeypatch.setattr(cupy, "RawKernel", Kernel)
    monkeypatch.setattr(cupy, "zeros", lambda *args, **kwargs: None)
    reason = cupy_raw.unavailable_reason()
    assert reason is not None and "cannot launch" in reason and "NoKernelImage" in reason


def test_the_registry_falls_back_past_cupy_when_it_cannot_compile(one_device, unprobed, monkeypatch):
    from alignscan import bridges  # noqa: F401  (the "torch" backend, the last CUDA fallback)

    def refuse(*args, **kwargs):
        raise _NoNvrtc("nvrtc mismatch")
    monkeypatch.setattr(cupy, "RawModule", refuse)
    chosen = backends.resolve(None, "cuda")
    assert chosen != "cupy" and backends.get(chosen).takes("cuda")
    assert "nvrtc mismatch" in backends.get("cupy").reason()
    with pytest.raises(backends.BackendUnavailable, match="nvrtc mismatch"):
        backends.resolve("cupy", "cuda")
