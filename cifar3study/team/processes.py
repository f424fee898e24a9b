"""Plain process and file helpers for the servers a stack runs: checked commands, ports, process groups, private files."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil

from cifar3study.errors import StageError, one_line

HOST = "127.0.0.1"  # every server of the stack listens on loopback only


def write_private(target: Path, text: str) -> None:
    """Write `text` readable by its owner only, from the first byte, and rename it over `target`."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run_checked(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise StageError(f"{what} failed ({one_line(done.stderr or done.stdout, 200)}); see the stack's logs")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def alive(pid: int | None) -> bool:
    """Whether any process of the server's process group is still running (zombies do not count)."""
    if not pid:
        return False
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
