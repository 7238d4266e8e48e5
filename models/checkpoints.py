"""The official checkpoint layouts, read and written in this one module: ViM's ``{"model": state_dict}`` and PlainMamba's mmcls
``{"state_dict": ...}`` (keys ``backbone.*`` / ``head.*``, with ``ema_*`` entries to drop).

Which weights: a checkpoint may also hold ``model_ema``, the exponential moving average of
the weights (Vim's training script and ``alignscan finetune`` write both). ``ema=False``
(the default) reads the plain weights, the ones the released accuracies are measured with
(Vim evaluates ``checkpoint["model"]``); ``ema=True`` reads ``model_ema`` and is a
ValueError naming the file when there is none; ``ema="auto"`` reads ``model_ema`` when
present, else the plain weights, and says which in the log. ``load_checkpoint`` records the
entry it read in ``model.checkpoint_weights``. (mmcv's EMAHook keeps its averages as
``ema_*`` entries inside ``state_dict``, swapped in and out of the model around evaluation,
so which of the two a saved file calls which depends on the hooks' order: they are dropped,
never read as the EMA.)

Adapting a checkpoint to a model (``checkpoint_filter_fn``, timm's ``pretrained_filter_fn``,
and ``load_checkpoint(adapt=True)``, timm's ``load_pretrained``), as timm does for its own
models: a head for another number of classes is dropped (the model's freshly initialised
head stays, with a one-line notice), the position embedding is resampled to the model's
image size (``model.resample_pos_embed``: ViM keeps its class token in the middle), and the
first convolution is adapted to another number of input channels (timm's
``adapt_input_conv``). Without ``adapt`` nothing is changed and a mismatch is an error.

A damaged file is a clear ValueError naming it, never a raw loader error or silently wrong
weights: an empty file, a truncated one, a byte flipped inside a tensor (torch's zip
checkpoints carry a CRC per entry, which torch does not check: ``zipfile`` does), an entry
that is not a tensor. Files are read with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import logging
import zipfile
from pathlib import Path

import torch

__all__ = ["load_checkpoint", "checkpoint_state_dict", "select_weights", "checkpoint_filter_fn", "adapt_state_dict",
           "read_checkpoint", "write_checkpoint", "describe_mismatch", "EMA_CHOICES", "WHOLE_FILE"]

_logger = logging.getLogger(__name__)

EMA_CHOICES = (False, True, "auto")
WHOLE_FILE = "(whole file)"          # the entry name of a file that is a plain state dict


def _check_ema(ema):
    if not (isinstance(ema, bool) or ema == "auto"):
        raise ValueError(f"ema must be False, True or 'auto', got {ema!r}")
    return ema


def select_weights(obj, path="checkpoint", ema=False):
    """(state dict, entry): the weights inside a loaded checkpoint object, in the model's key
    layout, and the name of the entry they came from ("model", "state_dict", "model_ema", or
    ``WHOLE_FILE`` for a plain state dict). ``ema``: False, True or "auto" (module docstring).

    Raises:
        ValueError: naming the file, for a layout it does not know, an entry that is not a
            tensor, or ``ema=True`` without ``model_ema``.
    """
    _check_ema(ema)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} must hold a dict, got {type(obj).__name__}")
    has_ema = isinstance(obj.get("model_ema"), dict)
    if ema is True and not has_ema:
        raise ValueError(f"ema=True but checkpoint {path} holds no 'model_ema' (the EMA weights); its top-level "
                         f"keys: {sorted(map(str, obj))[:10]}; use ema=False for its plain weights")
    if ema and has_ema:
        state, entry = dict(obj["model_ema"]), "model_ema"
    elif "model" in obj and isinstance(obj["model"], dict):
        state, entry = dict(obj["model"]), "model"
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state, entry = dict(obj["state_dict"]), "state_dict"
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, entry = dict(obj), WHOLE_FILE
    else:
        raise ValueError(f"checkpoint {path}: unrecognised layout: expected {{'model': ...}} (ViM), "
                         f"{{'state_dict': ...}} (mmcls) or a plain state dict; top-level keys: {sorted(obj)[:10]}")
    # mmcv's EMAHook entries: never the model's own keys (see the module docstring).
    state = {k: v for k, v in state.items() if not k.startswith("ema_")}
    wrong = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if wrong:
        raise ValueError(f"checkpoint {path}: entry {wrong[0]!r} is a {type(state[wrong[0]]).__name__}, not a tensor"
                         + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    return state, entry


def checkpoint_state_dict(obj, path="checkpoint", ema=False):
    """The model weights inside a loaded checkpoint object, in the model's key layout
    (``select_weights`` without the entry's name)."""
    return select_weights(obj, path, ema)[0]


def adapt_state_dict(state, model, path="checkpoint"):
    """``state`` (a state dict) made to fit ``model`` where timm adapts pretrained weights: a
    head of another number of classes dropped (with a one-line notice), the position
    embedding resampled to the model's grid (``model.resample_pos_embed``), the first
    convolution adapted to the model's input channels (timm's ``adapt_input_conv``). Every
    other key is left as it is (a mismatch there is another architecture). Returns a new dict."""
    state, own = dict(state), model.state_dict()
    head = [f"{model.classifier_name}.{p}" for p in ("weight", "bias")]
    dropped = [k for k in head if k in state and (k not in own or own[k].shape != state[k].shape)]
    if dropped:
        _logger.info("checkpoint %s: its head has %d classes, the model %d: the head is freshly initialised, "
                     "not loaded", path, state[dropped[0]].shape[0], model.num_classes)
        for k in dropped:
            del state[k]
    key = model.pos_embed_name
    if key in state and key in own and state[key].shape != own[key].shape:
        before = tuple(state[key].shape)
        state[key] = model.resample_pos_embed(state[key])
        _logger.info("checkpoint %s: %s resampled from %s to %s for img_size %d", path, key, before,
                     tuple(state[key].shape), model.img_size)
    conv = f"{model.first_conv}.weight"
    if conv in state and conv in own and state[conv].shape[1] != own[conv].shape[1] \
            and state[conv].shape[0] == own[conv].shape[0] and state[conv].shape[2:] == own[conv].shape[2:]:
        from alignscan import vision
        vision.timm()
        from timm.models import adapt_input_conv
        state[conv] = adapt_input_conv(own[conv].shape[1], state[conv])
    return state


def checkpoint_filter_fn(state_dict, model, ema=False):
    """timm's ``pretrained_filter_fn`` for both families: a checkpoint object in either
    official layout (or the state dict timm's own loader took out of it) made to fit
    ``model`` (``select_weights``, then ``adapt_state_dict``)."""
    return adapt_state_dict(select_weights(state_dict, "checkpoint", ema)[0], model)


def read_checkpoint(path, whole=False, ema=False):
    """The weights in a checkpoint file (``whole``: the whole object; ``ema``: which weights,
    as ``select_weights``), after checking it.

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
        # Training scripts (Vim's, timm's) save their argparse.Namespace beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:       # miniz's RuntimeError for a truncated file, EOFError, UnpicklingError, ...
        raise ValueError(f"checkpoint {path} cannot be read, it is truncated or not a torch checkpoint "
                         f"({type(exc).__name__}: {str(exc)[:200] or 'no detail'})") from None
    return obj if whole else checkpoint_state_dict(obj, path, ema)


def load_checkpoint(model, path, ema=False, adapt=False):
    """Load official weights into ``model`` (strict) and return the model.

    ema: False (the plain weights, ``model`` or ``state_dict``), True (``model_ema``; a
        ValueError naming the file when it has none) or "auto" (``model_ema`` when present,
        logged). ``model.checkpoint_weights`` is set to the entry read.
    adapt: first fit the weights to the model as timm does (``adapt_state_dict``: another
        number of classes leaves the model's fresh head, another img_size resamples the
        position embedding); without it any difference is an error.

    A damaged file, missing or unexpected keys, or shape mismatches raise ValueError naming
    the file and listing them.
    """
    _check_ema(ema)
    path = Path(path)
    state, entry = select_weights(read_checkpoint(path, whole=True), path, ema)
    own = model.state_dict()
    if adapt:
        state = adapt_state_dict(state, model, path)
        for k in (f"{model.classifier_name}.{p}" for p in ("weight", "bias")):
            if k in own and k not in state:
                state[k] = own[k]          # the head dropped for another number of classes: the model's own
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
    model.checkpoint_weights = entry
    if ema == "auto":
        _logger.info("checkpoint %s: ema='auto' loaded %s (%s)", path, entry,
                     "the EMA weights" if entry == "model_ema" else "the plain weights: it holds no model_ema")
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
