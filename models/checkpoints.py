"""Loading the official checkpoints: ViM's ``{"model": state_dict}`` and PlainMamba's mmcls
``{"state_dict": ...}`` (keys ``backbone.*`` / ``head.*``, with ``ema_*`` entries to drop)."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_checkpoint", "checkpoint_state_dict"]


def checkpoint_state_dict(obj):
    """The model weights inside a loaded checkpoint object, in the model's key layout."""
    if not isinstance(obj, dict):
        raise ValueError(f"a checkpoint must hold a dict, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        return dict(obj["model"])
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return {k: v for k, v in obj["state_dict"].items() if not k.startswith("ema_")}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError("unrecognised checkpoint layout: expected {'model': ...} (ViM), {'state_dict': ...} (mmcls) "
                     f"or a plain state dict; top-level keys: {sorted(obj)[:10]}")


def load_checkpoint(model, path):
    """Load official weights into ``model`` (strict). Missing or unexpected keys, or shape
    mismatches, raise ValueError listing them. Returns the model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing checkpoint file, got {str(path)!r}")
    state = checkpoint_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}")
        raise ValueError(f"checkpoint {path.name} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
