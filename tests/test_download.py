"""Downloads: loopback HTTP, file:// and path sources, resume, retries, and clean failures."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cifar3study.data.download as module
from cifar3study.data.download import Limits, download
from cifar3study.errors import StageError

NAME = "cifar-10-python.tar.gz"


def fetch(url: str, target: Path, md5: str, retries: int = 3, **limits: float) -> bool:
    return download(url, target, md5, Limits(**{"timeout": 5, "retries": retries, "deadline": 60, "backoff": 0, **limits}))


def raw_dir_entries(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir()) if target.parent.exists() else []


@pytest.fixture
def served(http_server, archive) -> tuple[str, bytes, str]:
    """(url, archive bytes, md5) of the synthetic archive on the loopback server."""
    path, md5 = archive
    http_server.files[f"/{NAME}"] = path.read_bytes()
    return http_server.url(NAME), path.read_bytes(), md5


def test_http_download(served, tmp_path: Path) -> None:
    url, blob, md5 = served
    target = tmp_path / "raw" / NAME
    assert fetch(url, target, md5) is True
    assert target.read_bytes() == blob
    assert raw_dir_entries(target) == [NAME]  # no .part left


def test_file_url_source(archive, tmp_path: Path) -> None:
    path, md5 = archive
    target = tmp_path / "raw" / NAME
    assert fetch(path.as_uri(), target, md5) is True
    assert target.read_bytes() == path.read_bytes()


def test_plain_path_source(archive, tmp_path: Path) -> None:
    path, md5 = archive
    target = tmp_path / "raw" / NAME
    assert fetch(str(path), target, md5) is True
    assert target.read_bytes() == path.read_bytes()


def test_missing_local_source_fails(tmp_path: Path) -> None:
    target = tmp_path / "raw" / NAME
    with pytest.raises(StageError, match="does not exist"):
        fetch(str(tmp_path / "nope.tar.gz"), target, "0" * 32)
    assert raw_dir_entries(target) == []


def test_resume_after_cut_transfer(served, http_server, tmp_path: Path) -> None:
    url, blob, md5 = served
    http_server.cut_next = [len(blob) // 3]
    target = tmp_path / "raw" / NAME
    assert fetch(url, target, md5) is True
    assert [r["range"] for r in http_server.requests] == [None, f"bytes={len(blob) // 3}-"]
    assert hashlib.md5(target.read_bytes()).hexdigest() == md5
    assert raw_dir_entries(target) == [NAME]


def test_resume_of_part_left_by_earlier_run(served, http_server, tmp_path: Path) -> None:
    url, blob, md5 = served
    target = tmp_path / "raw" / NAME
    target.parent.mkdir()
    target.with_name(NAME + ".part").write_bytes(blob[:100])
    assert fetch(url, target, md5) is True
    assert [r["range"] for r in http_server.requests] == ["bytes=100-"]
    assert target.read_bytes() == blob


def test_http_404_is_one_line_error_and_leaves_nothing(http_server, tmp_path: Path) -> None:
    target = tmp_path / "raw" / NAME
    with pytest.raises(StageError, match="HTTP 404") as err:
        fetch(http_server.url("missing.tar.gz"), target, "0" * 32)
    assert "\n" not in str(err.value)
    assert len(http_server.requests) == 1  # a 4xx is not retried
    assert raw_dir_entries(target) == []


def test_wrong_md5_says_expected_and_got_and_deletes(served, tmp_path: Path) -> None:
    url, _, md5 = served
    target = tmp_path / "raw" / NAME
    with pytest.raises(StageError) as err:
        fetch(url, target, "f" * 32)
    message = str(err.value)
    assert f"expected MD5 {'f' * 32}" in message and f"got {md5}" in message and "\n" not in message
    assert raw_dir_entries(target) == []


def test_retries_exhausted(served, http_server, tmp_path: Path) -> None:
    url, _, md5 = served
    http_server.cut_next = [10] * 5
    target = tmp_path / "raw" / NAME
    with pytest.raises(StageError, match="failed after 2 attempts"):
        fetch(url, target, md5, retries=2)
    assert len(http_server.requests) == 2
    assert not target.exists()  # only a .part (resumed by the next run) may remain
    assert set(raw_dir_entries(target)) <= {NAME + ".part"}


def test_connection_refused_is_retried_then_fails(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StageError, match="failed after 2 attempts"):
        fetch(f"http://127.0.0.1:{port}/{NAME}", tmp_path / "raw" / NAME, "0" * 32, retries=2)


def test_5xx_is_retried_with_exponential_backoff(served, http_server, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, blob, md5 = served
    http_server.status_next = [503, 502]
    sleeps: list[float] = []
    monkeypatch.setattr(module.time, "sleep", sleeps.append)  # record the backoff instead of waiting it out
    assert download(url, tmp_path / "raw" / NAME, md5, Limits(timeout=7, retries=3, deadline=60, backoff=0.5)) is True
    assert len(http_server.requests) == 3 and sleeps == [0.5, 1.0]
    assert (tmp_path / "raw" / NAME).read_bytes() == blob


def test_read_timeout_is_retried_then_fails(tmp_path: Path) -> None:
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/{NAME}"
        with pytest.raises(StageError, match=r"failed after 2 attempts.*timed out"):
            fetch(url, tmp_path / "raw" / NAME, "0" * 32, retries=2, timeout=0.2)


def test_skips_when_target_already_verified(served, http_server, tmp_path: Path) -> None:
    url, blob, md5 = served
    target = tmp_path / "raw" / NAME
    target.parent.mkdir()
    target.write_bytes(blob)
    assert fetch(url, target, md5.upper()) is False
    assert http_server.requests == []


def test_replaces_target_with_wrong_md5(served, tmp_path: Path) -> None:
    url, blob, md5 = served
    target = tmp_path / "raw" / NAME
    target.parent.mkdir()
    target.write_bytes(b"stale")
    assert fetch(url, target, md5) is True
    assert target.read_bytes() == blob


def test_trickling_server_stops_at_the_deadline(http_server, tmp_path: Path) -> None:
    """A byte every 0.2 s never trips the read timeout; the overall deadline stops it."""
    http_server.hostile = "trickle"
    start = time.monotonic()
    with pytest.raises(StageError, match=r"did not finish within data\.deadline"):
        fetch(http_server.url(NAME), tmp_path / "raw" / NAME, "0" * 32, timeout=1, deadline=2)
    assert time.monotonic() - start < 6
    assert not (tmp_path / "raw" / NAME).exists()


class TrickleServer:
    """A raw loopback server that answers each request with `sent`, then `trickled` one byte every `pause` s.

    Each connection stops by itself after len(trickled) * pause seconds, or at once when the client hangs up.
    """

    def __init__(self, sent: bytes, trickled: bytes, pause: float = 0.25) -> None:
        self.sent, self.trickled, self.pause = sent, trickled, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/{NAME}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            conn.recv(65536)  # the GET request
            conn.sendall(self.sent)
            for byte in self.trickled:
                if self.stop.wait(self.pause):
                    return
                conn.sendall(bytes([byte]))
        except OSError:
            pass  # the client hung up, as it should


@pytest.fixture
def trickle_server(request: pytest.FixtureRequest) -> Iterator[TrickleServer]:
    server = TrickleServer(*request.param)
    server.thread.start()
    yield server
    server.stop.set()
    server.thread.join(10)
    server.listener.close()


@pytest.mark.parametrize("trickle_server", [
    (b"", b"HTTP/1.1 200 " + b"O" * 40),  # the status line
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n", b"X-Pad: " + b"a" * 40),  # the headers
], ids=["status-line", "headers"], indirect=True)
def test_trickled_status_line_or_headers_stop_at_the_deadline(trickle_server: TrickleServer, tmp_path: Path) -> None:
    """A byte every 0.25 s never trips the 1 s read timeout; the 3 s deadline covers the head too."""
    target = tmp_path / "raw" / NAME
    start = time.monotonic()
    with pytest.raises(StageError, match=r"did not finish within data\.deadline") as err:
        fetch(trickle_server.url(), target, "0" * 32, timeout=1, deadline=3)
    assert time.monotonic() - start < 3 + 1.5
    assert "\n" not in str(err.value)
    assert raw_dir_entries(target) == []  # no target, no empty .part


def test_body_without_length_stops_at_the_size_cap(http_server, tmp_path: Path) -> None:
    http_server.hostile = "endless"
    target = tmp_path / "raw" / NAME
    with pytest.raises(StageError, match="more bytes than any CIFAR-10 archive"):
        fetch(http_server.url(NAME), target, "0" * 32, max_bytes=1 << 20)
    assert raw_dir_entries(target) == []  # the oversize partial file is deleted


def test_lying_length_is_refused_before_reading(http_server, tmp_path: Path) -> None:
    http_server.hostile = "lying-length"
    target = tmp_path / "raw" / NAME
    with pytest.raises(StageError, match="announces 10,737,418,240 bytes"):
        fetch(http_server.url(NAME), target, "0" * 32)
    assert len(http_server.requests) == 1 and raw_dir_entries(target) == []


def test_oversized_local_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.tar.gz"
    big.write_bytes(b"\0" * 4096)
    with pytest.raises(StageError, match="more than any CIFAR-10 archive"):
        fetch(str(big), tmp_path / "raw" / NAME, "0" * 32, max_bytes=1024)
    assert raw_dir_entries(tmp_path / "raw" / NAME) == []
