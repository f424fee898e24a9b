"""Tests, one module per library module (see helpers.py); stages/ and e2e/ run the real entry points and dvc."""
