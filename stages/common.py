"""Pieces every stage shares: one-line errors, logging, atomic writes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class StageError(Exception):
    """A failure the user can fix; shown as one line, exit status 1."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); user errors become one line and a non-zero exit."""
    setup_logging()
    # A `kill` or CI timeout then unwinds like Ctrl-C: runs end KILLED, temp files go.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except StageError as err:
        logging.getLogger("stage").error("error: %s", err)
        sys.exit(1)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        logging.getLogger("stage").error("error: %s%s; free space or fix permissions and rerun", where, err.strerror or err)
        sys.exit(1)
    except KeyboardInterrupt:
        logging.getLogger("stage").error("error: interrupted; no output was written (a partial download resumes); rerun")
        sys.exit(130)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success.

    Renaming within one directory is atomic, so readers (and DVC) never see a
    half-written file, whatever interrupts the writer.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, data: object) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
