"""`python -m stages.check_params`, and the train stage, on hostile params: one line, before any allocation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import GIB_IN_KIB, ROOT, last_line, run_stage, with_peak_rss

# `import torch` (a CUDA build) and mlflow alone make train's resident set 1.0 GiB before it reads params.yaml;
# a refusal may add this much to that, a fraction of one 65,536-wide layer's weights.
REFUSAL_KIB = 256 << 10


def params_file(tmp_path: Path, edit: dict[tuple[str, ...], object]) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for path, value in edit.items():
        section = raw
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def check(params: Path, out: Path) -> subprocess.CompletedProcess:
    return run_stage("check_params", "--params", params, "--out", out)


def train_args(tmp_path: Path, params: Path, model: str) -> list[object]:
    files = [arg for flag in ("train", "val", "stats", "checkpoint", "history", "run-info")
             for arg in (f"--{flag}", tmp_path / flag)]
    return ["--params", params, "--model", model, *files]


@pytest.fixture(scope="module")
def train_imports_kib(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak resident set of the train stage refusing a harmless bad value: what its imports cost."""
    tmp_path = tmp_path_factory.mktemp("baseline")
    done, peak_kib = with_peak_rss("train", *train_args(tmp_path, params_file(tmp_path, {("train", "lr"): -1}), "fc"))
    assert "train.lr must be > 0" in last_line(done)
    return peak_kib


def test_valid_params_always_write_the_same_bytes(tmp_path: Path) -> None:
    """DVC hashes the output: another valid params.yaml (a new model, another lr) must not change it."""
    assert check(ROOT / "params.yaml", tmp_path / "a.ok").returncode == 0
    other = params_file(tmp_path, {("train", "lr"): 0.02, ("models", "fc2"): {"arch": "fc", "hidden": [64],
                                                                              "activation": "relu"}})
    done = check(other, tmp_path / "b.ok")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.ok").read_bytes() == (tmp_path / "b.ok").read_bytes() != b""


@pytest.mark.parametrize("key", ["a;touch pwned;b", "../../../victim"])
def test_a_models_key_dvc_would_paste_into_a_command_is_refused(tmp_path: Path, key: str) -> None:
    params = params_file(tmp_path, {("models", key): {"arch": "fc", "hidden": [8], "activation": "tanh"}})
    line = last_line(check(params, tmp_path / "params.ok"))
    assert f"models key {key!r} must match [a-z][a-z0-9_]*" in line
    assert not (tmp_path / "params.ok").exists() and not (ROOT / "pwned").exists()


@pytest.mark.parametrize(("text", "needle"), [
    ("? [1, 2]\n: x\n", "a key on line 1 is a list or mapping"),
    ("[" * 100_000, "nests deeper than 50 levels"),
])
def test_hostile_yaml_is_a_named_refusal(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    line = last_line(check(tmp_path / "params.yaml", tmp_path / "params.ok"))
    assert needle in line and "unexpected" not in line


def test_a_group_larger_than_free_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    """Three 65,536-wide layers pass every cap but need about 300 GiB for three seeds: refused on the estimate."""
    params = params_file(tmp_path, {("models", "fc", "hidden"): [65_536] * 3})
    done, peak_kib = with_peak_rss("check_params", "--params", params, "--out", tmp_path / "params.ok")
    line = last_line(done)
    assert "models.fc.hidden makes fc need about" in line and "GiB" in line
    assert not (tmp_path / "params.ok").exists()
    assert peak_kib < GIB_IN_KIB, f"{peak_kib / GIB_IN_KIB:.2f} GiB"


@pytest.mark.parametrize(("key", "value", "needle"), [
    (("models", "fc", "hidden"), [1_000_000_000], "models.fc.hidden widths must be 1 to 65536"),
    (("models", "cnn", "channels"), [100_000], "models.cnn.channels must list 1 to 64"),
    (("models", "cnn", "padding"), 1_000_000, "models.cnn.padding must be >= 0 and < kernel_size"),
    (("train", "seeds"), list(range(100_000)), "train.seeds must list at most 64 seeds"),
])
def test_train_refuses_huge_sizes_before_allocating(tmp_path: Path, train_imports_kib: int, key: tuple,
                                                    value: object, needle: str) -> None:
    """These allocated gigabytes to terabytes before dying as `unexpected RuntimeError` (issue 19)."""
    model = key[1] if key[0] == "models" else "cnn"
    done, peak_kib = with_peak_rss("train", *train_args(tmp_path, params_file(tmp_path, {key: value}), model))
    line = last_line(done)
    assert needle in line and done.returncode == 1
    assert peak_kib - train_imports_kib < REFUSAL_KIB, f"{peak_kib / GIB_IN_KIB:.2f} GiB"
    assert peak_kib < 2 * GIB_IN_KIB
    assert not (tmp_path / "checkpoint").exists()
