"""What every program of the project writes and shows: files written atomically, and progress.

Every file a user keeps (results, tables, plots, caches, checkpoints) is written to a
temporary file in the same directory and renamed into place (``os.replace``, atomic on one
file system): an interrupted run leaves the old file or none, never half a file. The file
gets the mode any file the user creates gets (0666 less the umask), not mkstemp's 0600.

Progress bars are tqdm's where it is installed (a dependency of the package), plain lines
where it is not: the lent GPU machine's image has no tqdm, and ``alignscan.bench.gpu_run``
must run there as it is.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["write_bytes", "write_text", "write_json", "save_figure", "save_torch", "progress_bar", "file_mode",
           "hold_folder", "FolderInUse"]

LOCK_NAME = ".alignscan.lock"


class FolderInUse(Exception):
    """Another live process holds the output folder (its message names it)."""


@contextlib.contextmanager
def hold_folder(folder, what):
    """Hold ``folder`` for this run: an exclusive lock on ``folder``/.alignscan.lock, which
    records this process's id and ``what`` it runs. A second run into the same folder raises
    FolderInUse naming the first. The lock is the operating system's (``flock``): it ends
    with the process that held it, however it ended, so a lock file left by a dead process is
    simply taken over. Where flock does not exist (Windows) the folder is not locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its id yet"
            raise FolderInUse(f"{folder} is in use by another alignscan run ({holder}); wait for it, or choose "
                              f"another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: {what}")
        handle.flush()
        yield
    finally:
        handle.close()



def file_mode():
    """The mode a newly created file gets here: 0o666 less the process's umask. Read from
    /proc on Linux; elsewhere by setting and restoring it (a brief change another thread
    could see, hence not the first choice)."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def write_bytes(path, data):
    """Write ``data`` to ``path`` atomically, with the umask's mode; returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
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


try:
    from tqdm.auto import tqdm as progress_bar
except ImportError:      # pragma: no cover - exercised by tests/bench/test_gpu_run.py in a subprocess
    class progress_bar:
        """A few lines instead of a bar: at the start, every tenth of the way, and at the end."""

        def __init__(self, iterable=None, desc="", total=None, disable=False, leave=True, **_):
            self.iterable, self.desc, self.disable, self.n = iterable, desc, disable, 0
            self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.update(1)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            before, self.n = self.n, self.n + n
            if self.disable or not self.total:
                return
            if self.n == self.total or (10 * self.n) // self.total != (10 * before) // self.total:
                print(f"  {self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

        def set_postfix(self, **_):
            pass

        def close(self):
            pass
