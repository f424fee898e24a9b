"""Tests; a package so `python -m tests.benchmarks.train_speed` works from the root."""
