"""The reproducible record: weights digests, the train stage's code table and digest (as DVC hashes files)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from dvc_data.hashfile.hash import file_md5 as dvc_file_md5

from cifar3study.params import ModelParams
from cifar3study.tracking.record import UNKNOWN, code_digest, code_table, weights_digest
from cifar3study.training.models import build_model
from tests.helpers import ROOT

CNN = ModelParams(arch="cnn", hidden=(8,), activation="tanh", channels=(4, 2), kernel_size=3, padding=1, pool=2)


def test_weights_digest_sees_one_changed_value_and_ignores_memory_layout() -> None:
    torch.manual_seed(0)
    model = build_model(CNN, 3)
    digest = weights_digest(model)
    assert digest == weights_digest(model.to(memory_format=torch.channels_last))
    with torch.no_grad():
        first = next(model.parameters())
        first[(0,) * first.dim()] += 1e-6
    assert weights_digest(model) != digest


def test_code_table_lists_the_train_stage_py_deps_with_dvcs_own_md5(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_bytes(b"x = 1\r\n")  # CRLF: DVC 3 hashes the bytes as they are
    (tmp_path / "stage.py").write_text("print()\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"foreach": ["m"], "do": {
        "cmd": "x", "deps": ["stage.py", "pkg/a.py", "data/train.npz"]}}}}))
    table = code_table(tmp_path)
    assert table == {"pkg/a.py": dvc_file_md5(str(tmp_path / "pkg" / "a.py")),
                     "stage.py": dvc_file_md5(str(tmp_path / "stage.py"))}
    digest = code_digest(table)
    (tmp_path / "pkg" / "a.py").write_bytes(b"x = 2\r\n")
    assert code_digest(code_table(tmp_path)) != digest


def test_this_repositorys_train_stage_code_is_its_dvc_yaml_deps() -> None:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    assert set(code_table(ROOT)) == {d for d in deps if d.endswith(".py")} and "stages/train.py" in code_table(ROOT)


def test_no_dvc_yaml_gives_an_unknown_digest(tmp_path: Path) -> None:
    assert code_table(tmp_path) == {} and code_digest({}) == UNKNOWN
