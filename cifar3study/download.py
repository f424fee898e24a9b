"""Fetch the CIFAR-10 archive and verify its MD5.

The archive goes to `<target>.part` first (resumed with an HTTP Range request
after a cut transfer) and is renamed over the target only once its MD5 is
right, so the target either is the verified archive or does not exist.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cifar3study.errors import StageError
from cifar3study.files import file_md5

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class TransientError(Exception):
    """A failure worth retrying: connection trouble, a cut transfer, HTTP 5xx."""


def local_source(url: str) -> Path | None:
    """The file a `file://` URL or plain path names; None for http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path, maybe a Windows drive letter
        return Path(url)
    raise StageError(f"unsupported URL scheme '{parsed.scheme}' in {url}; use http(s)://, file:// or a local path")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "cifar3-pipeline"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code >= 500 or err.code in (408, 429):
            raise TransientError(f"HTTP {err.code} {err.reason}") from err
        if err.code == 416:  # our partial file is not a prefix of theirs: start over
            raise
        raise StageError(f"download of {url} failed: HTTP {err.code} {err.reason}; check data.url or CIFAR10_URL") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise TransientError(str(getattr(err, "reason", err)) or type(err).__name__) from err


def _resume_offset(response: http.client.HTTPResponse, offset: int, part: Path) -> int:
    """Where the body starts in the file: `offset` if the server resumed there, 0 if it sent it all."""
    if not offset or response.status != 206:
        return 0
    if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        part.unlink()
        raise TransientError(f"server resumed at {response.headers.get('Content-Range')!r}, not byte {offset}; restarting")
    return offset


def _copy_body(response: http.client.HTTPResponse, out: BinaryIO, bar: tqdm) -> int:
    """Append the body to `out`; network errors are transient, write errors (disk full) are not."""
    received = 0
    while True:
        try:
            block = response.read(CHUNK)
        except (http.client.HTTPException, OSError) as err:
            raise TransientError(f"transfer cut ({err})") from err
        if not block:
            return received
        out.write(block)
        received += len(block)
        bar.update(len(block))


def fetch_http(url: str, part: Path, timeout: float) -> None:
    """One attempt: append the rest of `url` to `part`, resuming where it ends."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError:
        part.unlink(missing_ok=True)
        raise TransientError("server refused to resume (HTTP 416); restarting") from None
    with response:
        offset = _resume_offset(response, offset, part)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name, disable=None
        ) as bar:
            size = offset + _copy_body(response, out, bar)
    if total is not None and size < total:
        raise TransientError(f"transfer cut after {size} of {total} bytes")


def fetch_with_retries(url: str, part: Path, timeout: float, retries: int, backoff: float) -> None:
    for attempt in range(1, retries + 1):
        try:
            fetch_http(url, part, timeout)
            return
        except TransientError as err:
            if attempt == retries:
                raise StageError(
                    f"download of {url} failed after {retries} attempts: {err}; check the network or the mirror and rerun"
                    " (it resumes the partial file)"
                ) from err
            delay = backoff * 2 ** (attempt - 1)
            log.warning("attempt %d/%d failed (%s); retrying in %.1f s", attempt, retries, err, delay)
            time.sleep(delay)


def copy_local(source: Path, part: Path) -> None:
    if not source.is_file():
        raise StageError(f"archive {source} does not exist; check data.url or CIFAR10_URL")
    with open(source, "rb") as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def verify_md5(path: Path, expected: str) -> None:
    got = file_md5(path)
    if got != expected:
        path.unlink()
        raise StageError(
            f"checksum mismatch for {path.name}: expected MD5 {expected}, got {got}; the file was deleted,"
            " check data.md5 / CIFAR10_MD5 or the source"
        )


def download(url: str, target: Path, md5: str, timeout: float, retries: int, backoff: float = 1.0) -> bool:
    """Make `target` the archive at `url` with MD5 `md5`; False if it already was."""
    target, md5 = Path(target), md5.lower()
    if target.is_file():
        if file_md5(target) == md5:
            log.info("%s already present with MD5 %s; skipping download", target, md5)
            return False
        log.warning("%s has the wrong MD5; deleting it and downloading again", target)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    source = local_source(url)
    log.info("fetching %s -> %s", url, target)
    try:
        if source is None:
            fetch_with_retries(url, part, timeout, retries, backoff)
        else:
            copy_local(source, part)
    except OSError as err:
        part.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StageError(f"no space left on device writing {part}; free some space and rerun") from err
        raise StageError(f"cannot write {part}: {err.strerror or err}") from err
    verify_md5(part, md5)
    os.replace(part, target)
    log.info("verified MD5 %s", md5)
    return True

