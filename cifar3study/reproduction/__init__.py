"""Reproducing a recorded run: a scratch clone at its commit, the rerun, and the verdict against its record."""
