"""Helpers the tests share: synthetic CIFAR archives, a loopback HTTP server, tiny params, stage runs."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR3_CLASSES = ("airplane", "automobile", "ship")


def synthetic_batch(n_per_class: int, seed: int) -> dict:
    """A batch whose classes differ in mean colour, so a model can learn them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    rng.shuffle(labels)
    base = rng.integers(0, 96, size=(len(labels), 3, 32, 32))
    tint = np.stack([(labels * 37) % 160, (labels * 71) % 160, (labels * 113) % 160], axis=1)[:, :, None, None]
    data = (base + tint).clip(0, 255).astype(np.uint8).reshape(len(labels), 3072)
    return {"batch_label": f"synthetic {seed}", "labels": labels.tolist(), "data": data,
            "filenames": [f"img_{seed}_{i}.png" for i in range(len(labels))]}


def archive_files(n_per_class: int = 4) -> dict[str, bytes]:
    """Pickled meta and batches in the official python layout (protocol 2)."""
    files = {f"data_batch_{i}": pickle.dumps(synthetic_batch(n_per_class, i), protocol=2) for i in range(1, 6)}
    files["test_batch"] = pickle.dumps(synthetic_batch(n_per_class, 99), protocol=2)
    files["batches.meta"] = pickle.dumps({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10 * n_per_class,
                                          "num_vis": 3072}, protocol=2)
    return files


def write_archive(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> str:
    """Write a .tar.gz of `files` under cifar-10-batches-py/ (plus raw `extra` members); returns its MD5."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()


class FileServer(ThreadingHTTPServer):
    """Serves `files` by URL path, honours `Range: bytes=N-`, and can cut transfers short."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_next: list[int] = []  # byte counts after which the next responses are cut
        self.status_next: list[int] = []  # HTTP error statuses the next requests get instead of the file
        self.hostile: str | None = None  # "trickle" (a byte every 0.2 s), "endless" (no length), "lying-length"
        self.requests: list[dict] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path.lstrip('/')}"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def _hostile(self) -> None:
        """Bounded misbehaviour: each loop stops by itself within seconds or a few MB."""
        self.send_response(200)
        if self.server.hostile == "lying-length":
            self.send_header("Content-Length", str(10 << 30))  # claims 10 GiB
        self.end_headers()
        chunk, pause, rounds = (b"x", 0.2, 100) if self.server.hostile == "trickle" else (b"\0" * 65536, 0.0, 200)
        try:
            for _ in range(rounds):
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass  # the client hung up, as it should
        self.close_connection = True

    def do_GET(self) -> None:
        self.server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if self.server.hostile:
            self._hostile()
            return
        if self.server.status_next:
            self.send_error(self.server.status_next.pop(0))
            return
        blob = self.server.files.get(self.path)
        if blob is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers.get("Range") else 0
        body = blob[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        self.end_headers()
        if self.server.cut_next:
            self.wfile.write(body[: self.server.cut_next.pop(0)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """Run `server` in a thread for the block."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def tiny_params(tmp_path: Path, **train: object) -> Path:
    """The repo's params.yaml with a short training run of two seeds; `train` overrides train.* keys."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({"epochs": 2, "batch_size": 32, "seeds": [0, 1], **train})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_stage(name: str, *args: object, env: dict[str, str] | None = None, timeout: float = 300) \
        -> subprocess.CompletedProcess:
    """`python -m stages.<name> ARGS` from the repository root, as DVC runs it."""
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *map(str, args)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


# Runs a command and prints the largest resident set of it (KiB on Linux): a fresh process has no other children.
PEAK_RSS = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(done.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(done.returncode)")
GIB_IN_KIB = 1 << 20


def with_peak_rss(stage: str, *args: object, env: dict[str, str] | None = None) \
        -> tuple[subprocess.CompletedProcess, int]:
    """Run a stage as a process, as `run_stage` does; its result and its peak resident set in KiB."""
    command = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", f"stages.{stage}", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    return done, int(done.stdout.split()[-1])


def last_line(done: subprocess.CompletedProcess) -> str:
    """The stage's final stderr line, after checking it failed with one line and no traceback."""
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which channel is bright: normalised images and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y] += 1.0
    return x, y
