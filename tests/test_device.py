"""set_numerics: the switches it sets, and the import it avoids (in a fresh interpreter: imports are per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from cifar3study.training.device import set_numerics
set_numerics({deterministic}, False)
print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
      torch.backends.cudnn.benchmark, "torch._inductor" in sys.modules)
"""


@pytest.mark.parametrize("deterministic", [True, False])
def test_switches_set_without_importing_inductor(deterministic: bool) -> None:
    """torch.use_deterministic_algorithms would import TorchInductor (3.8 s of evaluate's 12.5); nothing compiles."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(deterministic=deterministic)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == [str(deterministic), str(deterministic), str(not deterministic), "False"]
