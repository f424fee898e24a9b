"""`python -m stages.download`: params and env in, the verified archive out, or one line and nothing."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT, last_line, run_stage

NAME = "cifar-10-python.tar.gz"


def download(tmp_path: Path, env: dict[str, str], params: Path | None = None) -> subprocess.CompletedProcess:
    if params is None:
        params = tmp_path / "params.yaml"
        shutil.copy(ROOT / "params.yaml", params)
    return run_stage("download", "--params", params, "--out", tmp_path / "raw" / NAME, env=env)


def test_downloads_from_the_env_mirror(http_server, archive, tmp_path: Path) -> None:
    path, md5 = archive
    http_server.files[f"/{NAME}"] = path.read_bytes()
    done = download(tmp_path, {"CIFAR10_URL": http_server.url(NAME), "CIFAR10_MD5": md5})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "raw" / NAME).read_bytes() == path.read_bytes()


def test_http_404_is_one_line(http_server, tmp_path: Path) -> None:
    line = last_line(download(tmp_path, {"CIFAR10_URL": http_server.url("missing.tar.gz"), "CIFAR10_MD5": "0" * 32}))
    assert "error: " in line and "HTTP 404" in line


def test_bad_param_stops_before_any_work(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"]["cnn"]["activation"] = "sigmoid"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    line = last_line(download(tmp_path, {}, params))
    assert "models.cnn.activation" in line and "tanh" in line
    assert not (tmp_path / "raw").exists()


def test_file_size_limit_is_one_line_and_leaves_nothing(archive, tmp_path: Path) -> None:
    """A real write failure (RLIMIT_FSIZE, as on a full disk) mid-copy: no .part, no target."""
    path, md5 = archive
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    limit = path.stat().st_size // 2
    done = subprocess.run(
        [sys.executable, "-m", "stages.download", "--params", str(params), "--out", str(tmp_path / "raw" / NAME)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CIFAR10_URL": str(path), "CIFAR10_MD5": md5},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = last_line(done)
    assert "cannot write" in line or "no space" in line
    assert list((tmp_path / "raw").iterdir()) == []


def test_malformed_md5_override_stops_before_any_request(http_server, tmp_path: Path) -> None:
    line = last_line(download(tmp_path, {"CIFAR10_URL": http_server.url(NAME), "CIFAR10_MD5": "not-an-md5" * 1000}))
    assert "CIFAR10_MD5" in line and "32 hex digits" in line and len(line) < 400
    assert http_server.requests == [] and not (tmp_path / "raw").exists()


def test_a_finite_but_huge_timeout_is_refused_before_any_request(http_server, tmp_path: Path) -> None:
    """data.timeout 1e300 passed as finite; the download died with an OverflowError traceback from its timer (issue 25)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"timeout": 1e300, "deadline": 1e300})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    http_server.files[f"/{NAME}"] = b"not an archive"
    done = download(tmp_path, {"CIFAR10_URL": http_server.url(NAME), "CIFAR10_MD5": "0" * 32}, params)
    line = last_line(done)
    assert "data.timeout must be > 0 and at most 3600 seconds" in line and done.returncode == 1
    assert http_server.requests == [] and not (tmp_path / "raw").exists()
