"""The verdict on a rerun: bitwise, equivalent or differs, with the differences that explain it."""

from __future__ import annotations

import dataclasses

import pytest

from cifar3study.reproduction.verdict import env_differences, judge, markdown, tost_p
from cifar3study.tracking.record import UNKNOWN, Environment, RunRecord, SeedRecord

ENV = Environment("cpu", "cpu (x86_64, 2 threads)", "AVX2", "2.14.1", "2.4.6", "3.12.0", "none", "none", "2", "True",
                  "True", "False")


def record(accs: dict[int, tuple[float, float]], weights: str = "w", env: Environment = ENV,
           ci: tuple[float, float] | None = (0.80, 0.90)) -> RunRecord:
    seeds = {s: SeedRecord(f"r{s}", f"{weights}{s}", train, val) for s, (train, val) in accs.items()}
    return RunRecord("abcdef0123", "cnn-x", "1", "cnn", "c0ffee", "false", None, None, "md5", "digest", {}, seeds, env,
                     {"train_acc": (0.90, 0.99) if ci else None, "val_acc": ci})


ORIGINAL = record({0: (0.95, 0.85), 1: (0.94, 0.84), 2: (0.96, 0.86)})


def test_equal_weights_are_bitwise() -> None:
    verdict = judge(ORIGINAL, ORIGINAL, 0.01, 0.01)
    assert verdict.word == "bitwise" and verdict.line.startswith("bitwise: ")


def test_other_threads_within_spread_are_equivalent_and_say_why() -> None:
    rerun = record({0: (0.951, 0.851), 1: (0.941, 0.841), 2: (0.961, 0.861)}, "v",
                   dataclasses.replace(ENV, threads="1", device="cpu (x86_64, 1 threads)"))
    verdict = judge(ORIGINAL, rerun, 0.01, 0.01)
    assert verdict.word == "equivalent", verdict.line
    assert "explained by thread count 2 → 1" in verdict.line and "device cpu" not in verdict.line
    assert "TOST on val_acc at ±0.01: p = 0" in verdict.line  # equal shifts: no spread, inside the margin


def test_a_seed_beyond_tolerance_differs_naming_seed_metric_and_amount() -> None:
    rerun = record({0: (0.95, 0.80), 1: (0.94, 0.84), 2: (0.96, 0.86)}, "v")
    verdict = judge(ORIGINAL, rerun, 0.01, 0.01)
    assert verdict.word == "differs"
    assert "seed 0 val_acc 0.8000 vs 0.8500 (-0.0500, tolerance ±0.01)" in verdict.line
    assert "no recorded environment difference explains it" in verdict.line


def test_a_mean_outside_the_recorded_interval_differs() -> None:
    rerun = record({0: (0.955, 0.855), 1: (0.945, 0.845), 2: (0.965, 0.865)}, "v")
    verdict = judge(ORIGINAL, dataclasses.replace(rerun), 0.01, 0.01)
    assert verdict.word == "equivalent"
    narrow = dataclasses.replace(ORIGINAL, ci95={"train_acc": (0.90, 0.99), "val_acc": (0.849, 0.851)})
    assert judge(narrow, rerun, 0.01, 0.01).word == "differs"
    assert "val_acc mean 0.8550 outside recorded 95% CI [0.8490, 0.8510]" in judge(narrow, rerun, 0.01, 0.01).line


def test_one_seed_says_n_too_small() -> None:
    one = record({0: (0.95, 0.85)}, ci=None)
    verdict = judge(one, record({0: (0.95, 0.852)}, "v", ci=None), 0.01, 0.01)
    assert verdict.word == "equivalent"
    assert "n too small" in verdict.line and "TOST on val_acc at ±0.01: n too small (1 seed)" in verdict.checks


def test_a_record_without_weights_digests_is_never_bitwise() -> None:
    unknown = record({0: (0.95, 0.85), 1: (0.94, 0.84)})
    unknown = dataclasses.replace(unknown, seeds={s: dataclasses.replace(r, weights=UNKNOWN)
                                                  for s, r in unknown.seeds.items()})
    verdict = judge(unknown, unknown, 0.01, 0.01)
    assert verdict.word != "bitwise" and "no weights digest" in verdict.line


def test_environment_differences_name_each_field_and_deterministic_off() -> None:
    gpu = dataclasses.replace(ENV, device_type="cuda", device="NVIDIA H100", cuda="13.0", cudnn="91000",
                              deterministic="False")
    found = env_differences(ENV, gpu)
    assert "device type cpu → cuda" in found and "CUDA version none → 13.0" in found
    assert "cuDNN version none → 91000" in found and "deterministic off (train.deterministic: false)" in found
    assert env_differences(ENV, ENV) == []


@pytest.mark.parametrize(("diffs", "equivalent"), [([0.001, -0.002, 0.0005, 0.001], True),
                                                   ([0.03, 0.028, 0.031], False),
                                                   ([0.02, -0.02, 0.015, -0.018], False)])
def test_tost(diffs: list[float], equivalent: bool) -> None:
    assert (tost_p(diffs, 0.01) < 0.05) is equivalent


def test_report_holds_seeds_checks_and_both_environments() -> None:
    rerun = record({0: (0.951, 0.851), 1: (0.941, 0.841), 2: (0.961, 0.861)}, "v", dataclasses.replace(ENV, threads="1"))
    text = markdown(ORIGINAL, rerun, judge(ORIGINAL, rerun, 0.01, 0.01), {"device": "cpu"})
    assert "| thread count | 2 | 1 |" in text and "| 0 | no | 0.9500 | 0.9510 | 0.8500 | 0.8510 |" in text
    assert "- device: cpu" in text and "TOST" in text
