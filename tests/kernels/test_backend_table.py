"""Every backend, "torch" included, is declared in the one table (``cuda_kernels.backends``):
a fresh interpreter finds the torch entry, with its device and its probe, without importing
``bridges``; neither importing ``cuda_kernels`` nor asking the entry whether it can run imports
torch. Where torch is not installed, the entry says why."""
import json
import os
import subprocess
import sys
import textwrap

from tests import REPO


def _fresh(body):
    """Run ``body`` in a new interpreter (no ALIGNSCAN_BACKEND) and return its last line as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "ALIGNSCAN_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_torch_backend_is_declared_without_bridges_and_cuda_kernels_does_not_import_torch():
    seen = _fresh("""
        import json, sys
        import alignscan.cuda_kernels
        from alignscan.cuda_kernels import backends
        after_import = "torch" in sys.modules
        entry = backends.get("torch")
        listed = "torch" in backends.names() and "torch" not in backends.names(kernels_only=True)
        before_probe = "torch" in sys.modules
        reason = entry.reason()
        after_probe = "torch" in sys.modules
        print(json.dumps({"after_import": after_import, "before_probe": before_probe, "reason": reason,
                          "after_probe": after_probe,
                          "device": entry.device, "module": entry.module, "purpose": entry.purpose,
                          "default": entry.default, "listed": listed, "order": list(backends.names()),
                          "resolved": backends.resolve("torch", "cpu"),
                          "bridges": "alignscan.bridges" in sys.modules}))
    """)
    assert not seen["after_import"], "importing alignscan.cuda_kernels imported torch"
    assert not seen["before_probe"], "looking up the torch entry imported torch"
    assert not seen["after_probe"], "probing the torch entry imported torch"
    assert seen["reason"] is None and seen["resolved"] == "torch"
    assert seen["device"] == "any" and seen["module"] is None and "autograd" in seen["purpose"] and seen["default"]
    assert seen["listed"] and seen["order"][-1] == "torch", "torch is the last choice (the GPU fallback)"
    assert not seen["bridges"], "the torch entry needed bridges"


def test_without_torch_the_entry_says_why_and_asking_for_it_is_refused_with_the_reason():
    seen = _fresh("""
        import json, sys
        sys.modules["torch"] = None            # makes `import torch` fail, as on a machine without it
        from alignscan.cuda_kernels import BackendUnavailable, backends
        reason = backends.get("torch").reason()
        try:
            backends.resolve("torch", "cpu")
            refused = None
        except BackendUnavailable as exc:
            refused = str(exc)
        print(json.dumps({"reason": reason, "refused": refused, "cpu": backends.resolve(None, "cpu")}))
    """)
    assert "torch is not installed" in seen["reason"] and "'torch' extra" in seen["reason"]
    assert seen["refused"] is not None and "torch is not installed" in seen["refused"]
    assert seen["cpu"] == "numba-cpu", "the CPU default does not need torch"
