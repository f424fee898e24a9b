"""How every stage runs: logging, signals, and failures as one line and a non-zero exit."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from cifar3study.errors import StageError, one_line

log = logging.getLogger("stage")
DEBUG_ENV = "CIFAR3_DEBUG"  # set to 1 to see the traceback of an unexpected error
# Errors of the MLflow client and the HTTP stack under it; matched by module, as most stages never import them.
TRACKING_ERRORS = ("mlflow.", "requests.", "urllib3.")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(message: str, status: int) -> None:
    log.error("error: %s", one_line(message))
    sys.exit(status)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); every failure becomes one line on stderr and a non-zero exit."""
    setup_logging()
    # A `kill` or CI timeout then unwinds like Ctrl-C: runs end KILLED, temp files go.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except StageError as err:
        _fail(str(err), 1)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}; free space or fix permissions and rerun", 1)
    except KeyboardInterrupt:
        _fail("interrupted; no output was written (a partial download resumes); rerun", 130)
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        if type(err).__module__.startswith(TRACKING_ERRORS):
            _fail(f"MLflow request failed ({err}); check that the tracking server and its artifact store "
                  f"(bucket, credentials) are up, then rerun", 1)
        _fail(f"unexpected {type(err).__name__}: {err}; rerun with {DEBUG_ENV}=1 for the traceback and report it", 2)
