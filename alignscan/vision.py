"""torchvision and timm, imported so that they work beside a CPU build of torch.

PyPI's torchvision wheels for Linux are linked against the CUDA build of torch
(``libtorch_cuda.so``). Beside the CPU build (``torch==2.13.0+cpu`` on this project's
machines, ``--index-url .../whl/cpu`` elsewhere) their compiled detection operators cannot
load; torchvision then still works for what this project uses (``datasets.ImageFolder``,
``transforms.v2``: pure Python over PIL and torch), except that its import stops at
``register_fake("torchvision::nms")``, which needs the operator's schema to exist
("operator torchvision::nms does not exist"). timm imports torchvision, so it stops too.

``torchvision()`` and ``timm()`` import them; only where torchvision's compiled operators
cannot be loaded do they first declare the schemas of the two operators torchvision
registers unconditionally (``nms`` and ``qnms``), with no kernel: calling a detection
operator raises torchvision's own "Couldn't load custom C++ ops" error; everything else is
torchvision's own code, untouched. With a
torchvision that matches its torch (a CUDA pair, or a source build), nothing is declared.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["torchvision", "timm", "declared_schemas"]

# torchvision's own schemas of the operators its _meta_registrations.py registers fakes for
# whatever its extension did (torchvision/csrc/ops/nms.cpp, qnms in quantized/cpu).
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None          # the torch.library.Library holding the declared schemas (kept alive)


def declared_schemas():
    """The schemas declared here (empty when torchvision's own operators loaded)."""
    return () if _library is None else _SCHEMAS


def _extension_loads(spec):
    """True when torchvision's compiled operators load beside this torch."""
    import torch
    folder = os.path.dirname(spec.origin)
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return True
            except OSError:
                return False
    return False


def torchvision():
    """``import torchvision``, working beside a CPU build of torch (see the module docstring).

    Raises ImportError naming the install command when torchvision is not installed."""
    global _library
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed: pip install torchvision==0.28.0 (the release that pairs "
                          "with torch 2.13.0; see the README's command 1)")
    import torch
    if _library is None and not _extension_loads(spec):
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        except RuntimeError:                      # no schema yet (nobody declared it): declare both
            _library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                _library.define(schema)
    return importlib.import_module("torchvision")


def timm():
    """``import timm`` (torchvision imported first, as ``torchvision()`` does)."""
    torchvision()
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed: pip install -e '.[all]' (or pip install timm)")
    return importlib.import_module("timm")
