"""Every file a user keeps (results, tables, plots, caches, checkpoints) is written to a
temporary file in the same directory and renamed into place (``os.replace``, atomic on one
file system): an interrupted run leaves the old file or none, never half a file."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

__all__ = ["write_bytes", "write_text", "write_json", "save_figure", "save_torch"]


def write_bytes(path, data):
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text):
    return write_bytes(path, text.encode())


def write_json(path, obj):
    return write_text(path, json.dumps(obj, indent=2))


def save_figure(fig, path, **kwargs):
    """A matplotlib figure, rendered in memory in the format of the path's suffix."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return write_bytes(path, buffer.getvalue())


def save_torch(obj, path):
    """``torch.save`` of ``obj``, atomically."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())
