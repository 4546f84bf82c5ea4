"""Benchmarks: one script per measurement, each runnable as ``python -m benchmarks.NAME``."""
