"""The official checkpoint layouts, read and written in this one module: ViM's ``{"model": state_dict}`` and PlainMamba's mmcls
``{"state_dict": ...}`` (keys ``backbone.*`` / ``head.*``, with ``ema_*`` entries to drop).

A damaged file is a clear ValueError naming it, never a raw loader error or silently wrong
weights: an empty file, a truncated one, a byte flipped inside a tensor (torch's zip
checkpoints carry a CRC per entry, which torch does not check: ``zipfile`` does), an entry
that is not a tensor. Files are read with ``weights_only=True``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

__all__ = ["load_checkpoint", "checkpoint_state_dict", "read_checkpoint", "write_checkpoint", "describe_mismatch"]


def checkpoint_state_dict(obj, path="checkpoint"):
    """The model weights inside a loaded checkpoint object, in the model's key layout."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} must hold a dict, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        state = dict(obj["model"])
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = {k: v for k, v in obj["state_dict"].items() if not k.startswith("ema_")}
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        raise ValueError(f"checkpoint {path}: unrecognised layout: expected {{'model': ...}} (ViM), "
                         f"{{'state_dict': ...}} (mmcls) or a plain state dict; top-level keys: {sorted(obj)[:10]}")
    wrong = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if wrong:
        raise ValueError(f"checkpoint {path}: entry {wrong[0]!r} is a {type(state[wrong[0]]).__name__}, not a tensor"
                         + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    return state


def read_checkpoint(path, whole=False):
    """The weights in a checkpoint file (``whole``: the whole object), after checking it.

    Raises:
        ValueError: naming the file, when it is missing, empty, truncated, fails its CRC
            check, cannot be unpickled with weights_only, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing checkpoint file, got {str(path)!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()          # reads every entry and checks its CRC-32
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
            raise ValueError(f"checkpoint {path} is damaged: {exc}") from None
        if damaged is not None:
            raise ValueError(f"checkpoint {path} is damaged: entry {damaged} fails its CRC check (changed bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:       # miniz's RuntimeError for a truncated file, EOFError, UnpicklingError, ...
        raise ValueError(f"checkpoint {path} cannot be read, it is truncated or not a torch checkpoint "
                         f"({type(exc).__name__}: {str(exc)[:200] or 'no detail'})") from None
    return obj if whole else checkpoint_state_dict(obj, path)


def load_checkpoint(model, path):
    """Load official weights into ``model`` (strict). A damaged file, missing or unexpected
    keys, or shape mismatches raise ValueError naming the file and listing them. Returns the
    model."""
    path = Path(path)
    state = read_checkpoint(path)
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
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def write_checkpoint(path, name, state, extra):
    """Write ``state`` (and ``extra``: epoch, optimizer, ...) atomically in the released layout
    of the model name's family (``alignscan.registry``): ViM ``{"model": ...}``, PlainMamba
    (mmcls) ``{"state_dict": ..., "meta": ...}``. ``load_checkpoint`` reads it back."""
    from alignscan import registry
    from alignscan.outputs import save_torch
    if registry.card(name).checkpoint_layout == "model":
        blob = {"model": state, **extra}
    else:
        blob = {"state_dict": state, "meta": extra.get("meta", {}), **extra}
    return save_torch(blob, path)


def describe_mismatch(model, checkpoint_state, num_classes):
    """What differs between a checkpoint and the model, in words (architecture, classes)."""
    own = model.state_dict()
    head = "head.weight" if "head.weight" in own else "head.fc.weight"
    prefix_model = sorted({k.split(".")[0] for k in own})
    prefix_ckpt = sorted({k.split(".")[0] for k in checkpoint_state})
    notes = []
    if prefix_model != prefix_ckpt:
        notes.append(f"the checkpoint's weights are named {prefix_ckpt[:6]} but {type(model).__name__} has "
                     f"{prefix_model[:6]}: it is for another architecture")
    elif len(own) != len(checkpoint_state):
        notes.append(f"the checkpoint has {len(checkpoint_state)} weights, the model {len(own)}: another depth or size")
    if head in checkpoint_state and head in own and checkpoint_state[head].shape[0] != own[head].shape[0]:
        notes.append(f"the checkpoint has {checkpoint_state[head].shape[0]} classes, the data folder {num_classes}")
    widths = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in checkpoint_state.items()
              if k in own and k != head and not k.startswith("head") and tuple(v.shape) != tuple(own[k].shape)}
    pos = next((k for k in widths if k.endswith("pos_embed")), None)
    if pos is not None and widths[pos][0][-1] == widths[pos][1][-1]:
        # Same width, another number of tokens: the checkpoint was made at another image size.
        (ckpt_tokens, model_tokens), rest = (widths[pos][0][1], widths[pos][1][1]), len(widths) - 1
        notes.append(f"the checkpoint was made for another image size: its {pos} has {ckpt_tokens} tokens, "
                     f"this model {model_tokens} (set the image size the checkpoint was trained at)"
                     + (f"; {rest} other weights differ in shape too" if rest else ""))
        widths = {}
    if widths:
        key, (a, b) = next(iter(widths.items()))
        notes.append(f"{len(widths)} weights differ in shape (e.g. {key}: checkpoint {a}, model {b}): another width")
    return "; ".join(notes)
