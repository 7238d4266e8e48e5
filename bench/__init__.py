"""Benchmarks and the main job: ``python -m bench`` (see ``python -m bench --help``)."""
