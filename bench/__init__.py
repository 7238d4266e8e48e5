"""Benchmarks and the main job: ``python -m alignscan.bench`` (see ``python -m alignscan.bench --help``)."""
