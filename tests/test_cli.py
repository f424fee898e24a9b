"""Every stage failure is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT


def run_main(body: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = ("from cifar3study.cli import run_stage\nfrom cifar3study.errors import StageError\ndef main():\n"
            + textwrap.indent(body, "    ") + "\nrun_stage(main)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_stage_error_is_one_line_exit_1() -> None:
    done = run_main("raise StageError('bad thing\\nsecond line; fix it')")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.strip().endswith("error: bad thing second line; fix it")


def test_unexpected_error_is_one_bounded_line_exit_2() -> None:
    done = run_main("raise RuntimeError('x' * 100000 + '\\nmore')")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and len(line) < 600 and "CIFAR3_DEBUG=1" in line


def test_debug_env_shows_the_traceback() -> None:
    done = run_main("raise RuntimeError('boom')", env={"CIFAR3_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_sigterm_unwinds_like_ctrl_c() -> None:
    done = run_main("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nimport time; time.sleep(5)")
    assert done.returncode == 130 and "interrupted" in done.stderr and "Traceback" not in done.stderr


def test_os_error_names_the_file() -> None:
    done = run_main("open('/nonexistent-dir/x', 'w')")
    assert done.returncode == 1 and "/nonexistent-dir/x" in done.stderr and "Traceback" not in done.stderr
