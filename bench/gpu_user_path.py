"""The user's path on a GPU, for ``gpu_run``: what a ViM user runs first, each step with its
verdict, none given a backend (the scan must take the GPU's backend by itself).

- ``commands``: ``alignscan evaluate`` (two modes) and one ``alignscan finetune`` step on a
  generated ImageNet-style folder, each in its own process, as a user types them;
- ``half``: a bf16 autocast forward+backward of the op at the ViM-S layer shape and of a
  pruned ViM-S, time and peak memory against float32;
- ``export``: a pruned ViM-T exported on the CPU, run on CUDA tensors, against eager.

In a dry run the same steps run on the CPU at small sizes (the models two layers deep).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["commands", "half", "export"]

_IMAGENET_PACKAGES = ("torchvision", "timm", "PIL")


def _missing(packages):
    import importlib.util
    return [p for p in packages if importlib.util.find_spec(p) is None]


def _folder(root, classes=2, per_class=2, size=96):
    """An ImageNet-style folder of generated PNGs (class_00/img_0.png, ...)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True)
        for k in range(per_class):
            pixels = (rng.random((size, size, 3)) * 60 + 60 * c).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c:02d}" / f"img_{k}.png")
    return root


def _cli(args, env=None, timeout=600):
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "alignscan", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return run, time.monotonic() - start


def commands(dry, root_env=None):
    """evaluate (align, relabel) and one finetune step with no --backend; the verdict is that
    each exits 0 and its record names a backend that takes the device's tensors."""
    missing = _missing(_IMAGENET_PACKAGES)
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed here (the imagenet extra)", "passed": None}
    import torch

    from alignscan import models
    img = 64 if dry else 224
    name = "vim_tiny"
    out = {"model": name, "img_size": img, "steps": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = _folder(tmp / "data")
        checkpoint = tmp / "vim_tiny_random.pth"
        torch.manual_seed(0)
        torch.save({"model": models.create(name, num_classes=2, img_size=img).state_dict()}, checkpoint)
        common = ["--model", name, "--data", folder, "--img-size", img, "--workers", 0, "--batch", 2]
        for command, extra in (("evaluate", ["--checkpoint", checkpoint, "--modes", "align,relabel"]),
                               ("finetune", ["--checkpoint", checkpoint, "--mode", "align", "--epochs", 1,
                                             "--max-steps", 1])):
            where = tmp / command
            run, seconds = _cli([command, *common, *extra, "--out", where], env=root_env)
            record = where / f"{command}_run.json"
            backend = json.loads(record.read_text()).get("backend") if record.is_file() else None
            step = {"command": command, "returncode": run.returncode, "seconds": seconds, "backend": backend,
                    "passed": run.returncode == 0 and backend is not None
                    and backend["device"] == ("cpu" if dry else "cuda")}
            if run.returncode != 0:
                step["stderr_tail"] = run.stderr[-2000:]
            out["steps"].append(step)
    out["passed"] = all(s["passed"] for s in out["steps"])
    return out


def _peak_and_seconds(fn, device, timer):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = timer(fn)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return seconds, peak


def _in_both_dtypes(step_of, label, rows, device, timer):
    """Each dtype's result (float32 for comparing), and its time and peak memory in
    rows[label_dtype]."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        results[dtype] = step_of(dtype)().detach().float()
        seconds, peak = _peak_and_seconds(step_of(dtype), device, timer)
        rows[f"{label}_{dtype}"] = {"seconds": seconds, "peak_bytes": peak}
    return results


def half(dry, timer):
    """bf16 under autocast against float32: the op at the ViM-S layer shape (batch 8; 2 and
    dim 64 in a dry run) and a pruned ViM-S (align, paper preset; ViM-T at 64 px in a dry
    run), forward+backward: seconds and peak memory, and that bf16 stays near float32."""
    import torch

    from alignscan import models
    from alignscan.bridges import selective_scan_fn
    from alignscan.testing import vim_layer_problem
    device = "cpu" if dry else "cuda"
    p = vim_layer_problem(batch=2 if dry else 8, dim=64 if dry else 768, keep_ratio=0.7, alignment="prev")
    tensors = {k: torch.as_tensor(v, device=device) for k, v in p.kwargs(return_last_state=False).items()
               if hasattr(v, "shape")}
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}
    rest = {k: v for k, v in p.kwargs(return_last_state=False).items() if not hasattr(v, "shape")}
    rows = {}

    def op_step(dtype):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                inputs = {k: (v.to(torch.bfloat16) if dtype == "bfloat16" and k in ("u", "delta", "B", "C", "z")
                              else v) for k, v in leaves.items()}
                out = selective_scan_fn(**inputs, **rest)
            out.float().sum().backward()
            return out
        return run
    outs = _in_both_dtypes(op_step, "op", rows, device, timer)
    name = "vim_tiny" if dry else "vim_small"
    torch.manual_seed(0)
    model = (models.create(name, pruning=models.PruningConfig("align", (1,), 0.7), img_size=64, depth=2) if dry
             else models.create(name, pruning=models.paper_preset(name))).to(device)
    x = torch.randn(2 if dry else 64, 3, 64 if dry else 224, 64 if dry else 224, device=device)

    def model_step(dtype):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                logits = model(x)
            logits.float().logsumexp(-1).mean().backward()
            return logits
        return run
    logits = _in_both_dtypes(model_step, name, rows, device, timer)
    scale = lambda a: float(a.abs().max()) or 1.0
    op_dev = float((outs["bfloat16"] - outs["float32"]).abs().max()) / scale(outs["float32"])
    model_dev = float((logits["bfloat16"] - logits["float32"]).abs().max()) / scale(logits["float32"])
    # bf16 keeps 8 significant bits: a relative deviation of a few 1e-2 is its rounding.
    return {"rows": rows, "op_max_rel_dev": op_dev, "model_max_rel_dev": model_dev, "model": name,
            "passed": op_dev < 0.1 and model_dev < 0.1}


def export(dry):
    """A pruned ViM-T exported on the CPU (torch.export), its program run on this device's
    tensors, against the eager model here."""
    import torch

    from alignscan import models
    torch.manual_seed(0)
    model = (models.create("vim_tiny", pruning=models.PruningConfig("align", (1,), 0.7), img_size=64, depth=2)
             if dry else models.create("vim_tiny", pruning=models.paper_preset("vim_tiny"))).eval()
    x = torch.randn(2, 3, 64 if dry else 224, 64 if dry else 224)
    program = torch.export.export(model, (x,))
    device = "cpu" if dry else "cuda"
    from torch.export.passes import move_to_device_pass
    moved = move_to_device_pass(program, device).module()
    with torch.no_grad():
        got = moved(x.to(device)).cpu()
        eager = model.to(device)(x.to(device)).cpu()
    dev = float((got - eager).abs().max())
    return {"device": device, "max_abs_diff": dev, "passed": dev < 1e-3}
