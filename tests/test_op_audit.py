"""The CUDA path as far as the CPU can prove it: the aten ops of a training step and an evaluation are pinned,
none is on the installed torch's list of ops that raise under deterministic mode on CUDA, and that list parses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from cifar3study.bench.op_audit import (
    CUBLAS_DETERMINISTIC,
    DETERMINISTIC,
    RAISES,
    Audit,
    Setting,
    cublas_workspace_config,
    installed_entries,
    main,
    parse_deterministic_doc,
    pinned_lines,
    read_pinned,
    run_audit,
    verdict,
)
from cifar3study.errors import StageError
from cifar3study.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "pinned" / "aten_ops.txt"
REGENERATE = "python -m cifar3study.bench.op_audit --out tests/pinned/aten_ops.txt"


@pytest.fixture(scope="module")
def audit() -> Audit:
    return run_audit(load_params(ROOT / "params.yaml"), images=4)


def test_recorded_ops_equal_the_pinned_list(audit: Audit) -> None:
    recorded, pinned = pinned_lines(audit), read_pinned(PINNED)
    new, gone = sorted(set(recorded) - set(pinned)), sorted(set(pinned) - set(recorded))
    assert recorded == pinned, (f"the ops of a training step or evaluation changed: new {new}, gone {gone}. "
                                f"Run `{REGENERATE}`, review each new op's verdict for CUDA, and commit the list")


def test_no_recorded_op_is_listed_as_raising_on_cuda(audit: Audit) -> None:
    raising = {op: verdict(op, audit.entries) for op in audit.raising()}
    assert not raising, f"ops torch {torch.__version__} lists as raising under deterministic mode on CUDA: {raising}"


def test_the_installed_docstring_parses_into_both_lists_and_every_entry_is_mapped() -> None:
    entries = installed_entries()
    assert any(e.raises for e in entries) and any(not e.raises for e in entries), \
        "torch.use_deterministic_algorithms's docstring changed format: fix op_audit.parse_deterministic_doc"
    unmapped = [e.text for e in Audit({}, entries).unmapped()]
    assert not unmapped, f"new docstring entries: add them to op_audit.ATEN_OF and rerun `{REGENERATE}`: {unmapped}"


def test_a_listed_op_gets_the_raising_verdict() -> None:
    entries = installed_entries()  # the check above would pass vacuously if no op could ever be judged raising
    assert verdict("aten.avg_pool3d_backward.default", entries).startswith(RAISES)
    assert verdict("aten.nll_loss2d_forward.default", entries).startswith(RAISES)
    assert verdict("aten.scatter_add.default", entries).startswith(DETERMINISTIC)
    assert verdict("aten.put_.default", entries).startswith(RAISES)  # in both lists: raising wins


def test_a_docstring_in_another_format_parses_to_nothing_or_to_unmapped_entries() -> None:
    assert parse_deterministic_doc("Sets whether PyTorch operations must use deterministic algorithms.") == []
    doc = ("The following normally-nondeterministic operations will act deterministically when ``mode=True``:\n"
           "  * :class:`torch.nn.Conv2d` when called on CUDA tensor\n"
           "The following normally-nondeterministic operations will throw a :class:`RuntimeError` when ``mode=True``:\n"
           "  * torch.new_op when called on CUDA tensor\n  * :func:`torch.histc` when called on a CUDA tensor\n")
    entries = parse_deterministic_doc(doc)
    new_op = "torch.new_op when called on CUDA tensor"
    assert [(e.name, e.raises) for e in entries] == [("torch.nn.Conv2d", False), (new_op, True), ("torch.histc", True)]
    assert [e.name for e in Audit({}, entries).unmapped()] == [new_op]


def test_backward_ops_and_both_paths_are_recorded(audit: Audit) -> None:
    cnn_seed, cnn_vmap = Setting("cnn", False, True), Setting("cnn", True, True)
    for setting in (cnn_seed, cnn_vmap):
        assert {"aten.convolution_backward.default", "aten.max_pool2d_with_indices_backward.default",
                "aten.tanh_backward.default"} <= audit.ops[(setting, "train")]
        assert "aten.convolution_backward.default" not in audit.ops[(setting, "eval")]
    assert "aten.scatter_add.default" in audit.ops[(cnn_vmap, "train")]  # vmap's cross-entropy backward
    assert "aten._foreach_add_.List" in audit.ops[(cnn_vmap, "train")]  # SGD as on CUDA
    assert "mkldnn._linear_pointwise.default" in audit.ops[(Setting("fc", False, False), "train")]


def test_the_numerics_it_sets_are_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert cublas_workspace_config() in CUBLAS_DETERMINISTIC  # from an environment without the variable
        assert not torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def test_a_missing_params_file_stops_it_before_anything_is_written(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ops.txt"
    monkeypatch.setattr(sys, "argv", ["op_audit", "--params", str(tmp_path / "no.yaml"), "--out", str(out)])
    with pytest.raises(StageError, match="cannot read params file"):
        main()
    assert not out.exists()
