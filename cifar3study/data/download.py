"""Fetch the CIFAR-10 archive and verify its MD5, with bounded time and size.

The archive goes to `<target>.part` first (resumed with an HTTP Range request
after a cut transfer) and is renamed over the target only once its MD5 is
right, so the target either is the verified archive or does not exist. The
whole download, retries included, must finish within a deadline (connecting,
the TLS handshake, status line and headers as much as the body), and no
more bytes are accepted than a CIFAR-10 archive can have: a trickling or
lying server costs neither hours nor disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cifar3study.data.cifar10_format import MAX_ARCHIVE_BYTES
from cifar3study.errors import StageError, quote
from cifar3study.files import file_md5

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class TransientError(Exception):
    """A failure worth retrying: connection trouble, a cut transfer, HTTP 5xx."""


class OversizeError(StageError):
    """The source is bigger than any CIFAR-10 archive: its partial file is worthless."""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout: float  # seconds, connect and each read
    retries: int  # attempts before giving up on transient errors
    deadline: float  # seconds for the whole download, retries included
    max_bytes: int = MAX_ARCHIVE_BYTES
    backoff: float = 1.0  # seconds before the first retry, doubled after each


def local_source(url: str) -> Path | None:
    """The file a `file://` URL or plain path names; None for http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path, maybe a Windows drive letter
        return Path(url)
    raise StageError(f"unsupported URL scheme {quote(parsed.scheme)} in {quote(url)}; use http(s)://, file:// or a path")


class _Watchdog:
    """Shuts down every socket of one attempt at `stop_at`, whatever the attempt is waiting for.

    urllib's timeout bounds each socket operation, not their sum, so a server that sends its TLS handshake,
    status line, headers or body a byte at a time would never time out. shutdown() makes a blocked read return
    at once; it acts on the connection, so a dup() of the socket still reaches it after ssl takes the original.
    """

    def __init__(self, stop_at: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(max(stop_at - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _connect(self, address: tuple[str, int], timeout: float, source_address: object = None) -> socket.socket:
        sock = socket.create_connection(address, timeout, source_address)
        with self._lock:
            self._socks.append(sock.dup())
            if self.fired:
                sock.shutdown(socket.SHUT_RDWR)
        return sock

    def connection_class(self, http_class: type[http.client.HTTPConnection]) -> object:
        """`http_class`, opening its socket through the watchdog (http.client's own hook for that)."""
        def make(host: str, **kwargs: object) -> http.client.HTTPConnection:
            connection = http_class(host, **kwargs)
            connection._create_connection = self._connect
            return connection
        return make

    def opener(self) -> urllib.request.OpenerDirector:
        handlers = [_WatchedHTTPHandler(), _WatchedHTTPSHandler()]
        for handler in handlers:
            handler.watchdog = self
        return urllib.request.build_opener(*handlers)


class _Watched(urllib.request.AbstractHTTPHandler):
    """An HTTP(S) handler whose connections open their sockets through `watchdog`."""

    watchdog: _Watchdog

    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs: object) -> http.client.HTTPResponse:
        return super().do_open(self.watchdog.connection_class(http_class), req, **kwargs)


class _WatchedHTTPHandler(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_Watched, urllib.request.HTTPSHandler):
    pass


def _open(opener: urllib.request.OpenerDirector, url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "cifar3-pipeline"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code >= 500 or err.code in (408, 429):
            raise TransientError(f"HTTP {err.code} {err.reason}") from err
        if err.code == 416:  # our partial file is not a prefix of theirs: start over
            raise
        raise StageError(f"download of {quote(url)} failed: HTTP {err.code} {quote(err.reason)}; "
                         "check data.url or CIFAR10_URL") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise TransientError(str(getattr(err, "reason", err)) or type(err).__name__) from err


def _resume_offset(response: http.client.HTTPResponse, offset: int, part: Path) -> int:
    """Where the body starts in the file: `offset` if the server resumed there, 0 if it sent it all."""
    if not offset or response.status != 206:
        return 0
    if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        part.unlink()
        raise TransientError(f"server resumed at {quote(response.headers.get('Content-Range'))}, not byte {offset}")
    return offset


def _announced_total(response: http.client.HTTPResponse, offset: int, limits: Limits) -> int | None:
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    if total is not None and total > limits.max_bytes:
        raise OversizeError(f"the server announces {total:,} bytes, more than any CIFAR-10 archive "
                         f"({limits.max_bytes:,}); check data.url or CIFAR10_URL")
    return total


def _copy_body(response: http.client.HTTPResponse, out: BinaryIO, bar: tqdm, room: int) -> int:
    """Append the body to `out`; network errors are transient, write errors (disk full) are not."""
    received = 0
    while True:
        try:
            block = response.read1(CHUNK)
        except (http.client.HTTPException, OSError) as err:
            raise TransientError(f"transfer cut ({err})") from err
        if not block:
            return received
        received += len(block)
        if received > room:
            raise OversizeError("the server sent more bytes than any CIFAR-10 archive has; check data.url or CIFAR10_URL")
        out.write(block)
        bar.update(len(block))


def _past_deadline(part: Path, limits: Limits) -> StageError:
    if part.exists() and part.stat().st_size == 0:  # cut before any of the body came
        part.unlink()
    kept = "rerun to resume the partial file" if part.exists() else "rerun"
    return StageError(f"the download did not finish within data.deadline ({limits.deadline:g} s); {kept} "
                      "or raise data.deadline")


def fetch_http(url: str, part: Path, limits: Limits, stop_at: float) -> None:
    """One attempt, stopped at `stop_at`: append the rest of `url` to `part`, resuming where it ends."""
    with _Watchdog(stop_at) as watchdog:
        try:
            _attempt(watchdog.opener(), url, part, limits, stop_at)
        except TransientError:
            if not watchdog.fired:
                raise
    if watchdog.fired:  # the cut may have looked like an error or like the end of the headers or body
        raise _past_deadline(part, limits)


def _attempt(opener: urllib.request.OpenerDirector, url: str, part: Path, limits: Limits, stop_at: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(opener, url, offset, min(limits.timeout, max(stop_at - time.monotonic(), 0.1)))
    except urllib.error.HTTPError:
        part.unlink(missing_ok=True)
        raise TransientError("server refused to resume (HTTP 416); restarting") from None
    with response:
        offset = _resume_offset(response, offset, part)
        total = _announced_total(response, offset, limits)
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name, disable=None) as bar:
            size = offset + _copy_body(response, out, bar, limits.max_bytes - offset)
    if total is not None and size < total:
        raise TransientError(f"transfer cut after {size} of {total} bytes")


def fetch_with_retries(url: str, part: Path, limits: Limits, stop_at: float) -> None:
    for attempt in range(1, limits.retries + 1):
        try:
            fetch_http(url, part, limits, stop_at)
            return
        except TransientError as err:
            delay = limits.backoff * 2 ** (attempt - 1)
            if attempt == limits.retries or time.monotonic() + delay > stop_at:
                raise StageError(f"download of {quote(url)} failed after {attempt} attempts: {err}; check the network "
                                 "or the mirror and rerun (it resumes the partial file)") from err
            log.warning("attempt %d/%d failed (%s); retrying in %.1f s", attempt, limits.retries, err, delay)
            time.sleep(delay)


def copy_local(source: Path, part: Path, max_bytes: int) -> None:
    if not source.is_file():
        raise StageError(f"archive {quote(str(source))} does not exist; check data.url or CIFAR10_URL")
    if source.stat().st_size > max_bytes:
        raise OversizeError(f"{quote(str(source))} is {source.stat().st_size:,} bytes, more than any CIFAR-10 archive; "
                         "check data.url or CIFAR10_URL")
    with open(source, "rb") as src, open(part, "wb") as dst:
        while block := src.read(CHUNK):
            dst.write(block)


def verify_md5(path: Path, expected: str) -> None:
    got = file_md5(path)
    if got != expected:
        path.unlink()
        raise StageError(f"checksum mismatch for {path.name}: expected MD5 {expected}, got {got}; the file was deleted, "
                         "check data.md5 / CIFAR10_MD5 or the source")


def _fetch(url: str, part: Path, limits: Limits) -> None:
    source = local_source(url)
    try:
        if source is None:
            fetch_with_retries(url, part, limits, time.monotonic() + limits.deadline)
        else:
            copy_local(source, part, limits.max_bytes)
    except OSError as err:
        part.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StageError(f"no space left on device writing {part}; free some space and rerun") from err
        raise StageError(f"cannot write {part}: {err.strerror or err}") from err
    except OversizeError:
        part.unlink(missing_ok=True)
        raise


def download(url: str, target: Path, md5: str, limits: Limits) -> bool:
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
    log.info("fetching %s -> %s", url, target)
    _fetch(url, part, limits)
    verify_md5(part, md5)
    os.replace(part, target)
    log.info("verified MD5 %s", md5)
    return True
