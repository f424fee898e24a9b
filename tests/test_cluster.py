"""What a study refuses before Ray starts, and the one line naming what the cluster's nodes offer (no Ray here)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from cifar3study.errors import StageError
from cifar3study.studies.cluster import SHOWN_NODES, ray_session, refusal
from cifar3study.team.processes import free_port

SUFFIX = "; lower resources in the study file or add a node"


def test_a_request_one_node_fits_passes() -> None:
    assert refusal([("10.0.0.1", 2.0, 0.0), ("10.0.0.2", 8.0, 1.0)], 4, 1) is None
    assert refusal([("10.0.0.1", 2.0, 0.5)], 0.5, 0.5) is None


def test_a_request_no_node_fits_names_what_nodes_offer() -> None:
    assert refusal([("127.0.0.1", 2.0, 0.0)], 64, 0) == (
        "no node of this cluster offers 64 CPUs; nodes offer: 127.0.0.1: 2 CPUs, 0 GPUs" + SUFFIX)
    assert refusal([("127.0.0.1", 2.0, 0.0)], 1, 1) == (
        "no node of this cluster offers 1 GPU; nodes offer: 127.0.0.1: 2 CPUs, 0 GPUs" + SUFFIX)
    assert refusal([("127.0.0.1", 1.0, 0.0)], 2, 0.5).startswith("no node of this cluster offers 2 CPUs and 0.5 GPUs;")


def test_the_cluster_total_does_not_count_only_one_node() -> None:
    """Two 1-CPU nodes hold 2 CPUs between them, but a trial runs on one."""
    assert refusal([("a", 1.0, 0.0), ("b", 1.0, 0.0)], 2, 0) == (
        "no node of this cluster offers 2 CPUs; nodes offer: a: 1 CPU, 0 GPUs; b: 1 CPU, 0 GPUs" + SUFFIX)


def test_parts_that_fit_on_different_nodes_are_both_named() -> None:
    reason = refusal([("cpus", 16.0, 0.0), ("gpu", 1.0, 1.0)], 4, 1)
    assert reason is not None and reason.startswith("no node of this cluster offers 4 CPUs and 1 GPU;")


def test_many_nodes_are_cut_short() -> None:
    offers = [(f"10.0.0.{i}", 1.0, 0.0) for i in range(SHOWN_NODES + 500)]
    reason = refusal(offers, 2, 0)
    assert reason is not None and "\n" not in reason and len(reason) <= 400
    assert reason.count("10.0.0.") == SHOWN_NODES and "; and 500 more;" in reason
    assert reason.endswith(SUFFIX)


def test_no_alive_node() -> None:
    assert refusal([], 1, 0) == "no node of this cluster is alive; start a Ray node"


@pytest.mark.parametrize(("address", "said"), [
    ("10.0.0.5", "is not host:port"),
    ("127.0.0.1:{free}", "nothing answers at the Ray address"),  # the port is picked when the test runs
])
def test_a_cluster_address_where_nothing_answers_is_refused_at_once(address: str, said: str) -> None:
    """ray.init would retry such an address for minutes (measured: 8 minutes and more)."""
    address = address.format(free=free_port())  # not in the test's id: pytest-xdist workers must collect the same ids
    with pytest.raises(StageError, match=said) as caught, ray_session(address, None, {}):
        pass
    assert "\n" not in str(caught.value)


def test_a_temp_folder_too_long_for_ray_sockets_is_refused_and_left_clean(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))  # what TMPDIR sets
    with pytest.raises(StageError, match=r"too long for Ray.s socket paths.*set TMPDIR"), ray_session(None, None, {}):
        pass
    assert list(deep.iterdir()) == []
