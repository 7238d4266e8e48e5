"""The benchmark grid runs only when asked for (``--benchmark-only``): the test command skips it
(it takes minutes), with the reason shown."""
import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run with pytest tests/benchmarks --benchmark-only")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
