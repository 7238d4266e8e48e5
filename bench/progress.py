"""Progress bars: tqdm where it is installed (it is a dependency of the package); plain lines
where it is not: the lent GPU machine's image has no tqdm, and ``bench.gpu_run`` must run
there as it is."""
from __future__ import annotations

import sys

__all__ = ["progress_bar"]

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
