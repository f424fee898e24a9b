"""The verdict on a rerun: bitwise, equivalent or differs, with the differences that explain it."""

from __future__ import annotations

import dataclasses

import pytest

from cifar3study.reproduction.verdict import env_differences, judge, markdown, tost_p
from cifar3study.tracking.record import UNKNOWN, Environment, RunRecord, SeedRecord

ENV = Environment("cpu", "cpu (x86_64, 2 threads)", "AVX2", "2.14.1", "2.4.6", "3.12.0", "none", "none", "2", "True",
                  "True", "False")


def record(accs: dict[int, tuple[float, float]], weights: str = "w", env: Environment = ENV,
           ci: tuple[float, float] | None = (0.80, 0.90), split: str = "val") -> RunRecord:
    """`accs`: {seed: (train_acc, accuracy on `split`)}."""
    seeds = {s: SeedRecord(f"r{s}", f"{weights}{s}", train, acc) for s, (train, acc) in accs.items()}
    return RunRecord("abcdef0123", "cnn-x", "1", "cnn", "c0ffee", "false", None, None, "md5", "digest", {}, seeds, env,
                     {"train_acc": (0.90, 0.99) if ci else None, f"{split}_acc": ci}, split=split)


ORIGINAL = record({0: (0.95, 0.85), 1: (0.94, 0.84), 2: (0.96, 0.86)})
ONE_THREAD = dataclasses.replace(ENV, threads="1")  # a rerun whose weights may differ: judged on its metrics


def test_equal_weights_are_bitwise() -> None:
    verdict = judge(ORIGINAL, ORIGINAL, 0.01, 0.01)
    assert verdict.word == "bitwise" and verdict.line.startswith("bitwise: ")


def with_metrics(rec: RunRecord, parent: dict[str, float], seeds: dict[int, dict[str, float]]) -> RunRecord:
    return dataclasses.replace(rec, metrics=parent, seeds={s: dataclasses.replace(r, metrics=seeds.get(s, {}))
                                                           for s, r in rec.seeds.items()})


def test_equal_weights_with_a_recorded_metric_that_the_rerun_does_not_log_differ_naming_it() -> None:
    seeds = {0: {"train_acc": 0.95, "val_acc": 0.85}}
    logged = with_metrics(ORIGINAL, {"train_acc": 0.95, "val_acc": 0.85, "seconds_per_epoch": 3.0}, seeds)
    lying = with_metrics(ORIGINAL, {"train_acc": 0.95, "val_acc": 0.99, "seconds_per_epoch": 2.0}, seeds)
    verdict = judge(lying, logged, 0.01, 0.01)
    assert verdict.word == "differs" and "weights equal bit for bit" in verdict.line, verdict.line
    assert "val_acc 0.99 recorded, 0.85 rerun" in verdict.line and "train_acc" not in verdict.line
    assert "seconds_per_epoch" not in verdict.line  # wall clock: never equal twice
    slower = with_metrics(ORIGINAL, {"train_acc": 0.95, "val_acc": 0.85, "seconds_per_epoch": 9.0}, seeds)
    assert judge(slower, logged, 0.01, 0.01).word == "bitwise"


def test_a_seed_metric_off_by_one_ulp_or_missing_from_the_record_differs_and_many_are_cut_short() -> None:
    rerun = with_metrics(ORIGINAL, {}, {1: {"val_acc": 0.84, "gap": 0.1}})
    nudged = with_metrics(ORIGINAL, {}, {1: {"val_acc": 0.8400000000000001}})
    line = judge(nudged, rerun, 0.01, 0.01).line
    assert "seed 1 val_acc 0.8400000000000001 recorded, 0.84 rerun" in line and "seed 1 gap none recorded" in line
    many = with_metrics(ORIGINAL, {f"val_acc{end}": 0.5 for end in ("", "_std", "_min", "_max", "_n", "_ci95_low")}, {})
    line = judge(many, ORIGINAL, 0.01, 0.01).line
    assert line.count(" recorded, ") == 4 and line.count("; and 2 more") == 1, line


def test_other_weights_on_an_identical_deterministic_environment_differ_whatever_the_metrics() -> None:
    verdict = judge(ORIGINAL, record({0: (0.95, 0.85), 1: (0.94, 0.84), 2: (0.96, 0.86)}, "v"), 0.01, 0.01)
    assert verdict.word == "differs", verdict.line
    assert "environment is identical and train.deterministic is true" in verdict.line
    assert "the record or the code is not what it says" in verdict.line and "seeds 0, 1, 2" in verdict.line
    off = dataclasses.replace(ENV, deterministic="False")
    loose = judge(record({0: (0.95, 0.85), 1: (0.94, 0.84), 2: (0.96, 0.86)}, env=off),
                  record({0: (0.95, 0.85), 1: (0.94, 0.84), 2: (0.96, 0.86)}, "v", off), 0.01, 0.01)
    assert loose.word == "equivalent" and "explained by deterministic off" in loose.line, loose.line


def test_other_threads_within_spread_are_equivalent_and_say_why() -> None:
    rerun = record({0: (0.951, 0.851), 1: (0.941, 0.841), 2: (0.961, 0.861)}, "v",
                   dataclasses.replace(ENV, threads="1", device="cpu (x86_64, 1 threads)"))
    verdict = judge(ORIGINAL, rerun, 0.01, 0.01)
    assert verdict.word == "equivalent", verdict.line
    assert "explained by thread count 2 → 1" in verdict.line and "device cpu" not in verdict.line
    assert "TOST on val_acc at ±0.01: p = 0" in verdict.line  # equal shifts: no spread, inside the margin


def test_a_seed_beyond_tolerance_differs_naming_seed_metric_and_amount() -> None:
    rerun = record({0: (0.95, 0.80), 1: (0.94, 0.84), 2: (0.96, 0.86)}, "v", ONE_THREAD)
    verdict = judge(ORIGINAL, rerun, 0.01, 0.01)
    assert verdict.word == "differs"
    assert "seed 0 val_acc 0.8000 vs 0.8500 (-0.0500, tolerance ±0.01)" in verdict.line
    unknown = dataclasses.replace(ENV, deterministic=UNKNOWN)
    line = judge(record({0: (0.95, 0.85)}, env=unknown), record({0: (0.95, 0.80)}, "v", unknown), 0.01, 0.01).line
    assert "no recorded environment difference explains it" in line


def test_a_mean_outside_the_recorded_interval_differs() -> None:
    rerun = record({0: (0.955, 0.855), 1: (0.945, 0.845), 2: (0.965, 0.865)}, "v", ONE_THREAD)
    verdict = judge(ORIGINAL, rerun, 0.01, 0.01)
    assert verdict.word == "equivalent"
    narrow = dataclasses.replace(ORIGINAL, ci95={"train_acc": (0.90, 0.99), "val_acc": (0.849, 0.851)})
    assert judge(narrow, rerun, 0.01, 0.01).word == "differs"
    assert "val_acc mean 0.8550 outside recorded 95% CI [0.8490, 0.8510]" in judge(narrow, rerun, 0.01, 0.01).line


def test_one_seed_says_n_too_small() -> None:
    one = record({0: (0.95, 0.85)}, ci=None)
    verdict = judge(one, record({0: (0.95, 0.852)}, "v", ONE_THREAD, ci=None), 0.01, 0.01)
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


HELD = record({0: (0.95, 0.85), 1: (0.94, 0.84), 2: (0.96, 0.86)}, split="holdout")


def test_a_holdout_record_is_bitwise_only_if_its_holdout_metrics_are_what_the_rerun_logs() -> None:
    seeds = {0: {"train_acc": 0.95, "holdout_acc": 0.85, "holdout_macro_f1": 0.8}}
    logged = with_metrics(HELD, {"train_acc": 0.95, "holdout_acc": 0.85, "holdout_acc_ci95_low": 0.8}, seeds)
    assert judge(logged, logged, 0.01, 0.01).word == "bitwise"
    lying = with_metrics(HELD, {"train_acc": 0.95, "holdout_acc": 0.99, "holdout_acc_ci95_low": 0.8},
                         {0: {**seeds[0], "holdout_macro_f1": 0.9}})
    verdict = judge(lying, logged, 0.01, 0.01)
    assert verdict.word == "differs" and "weights equal bit for bit" in verdict.line, verdict.line
    assert "holdout_acc 0.99 recorded, 0.85 rerun" in verdict.line
    assert "seed 0 holdout_macro_f1 0.9 recorded, 0.8 rerun" in verdict.line


def test_a_holdout_rerun_that_is_not_bitwise_is_judged_on_holdout_acc() -> None:
    rerun = record({0: (0.95, 0.80), 1: (0.94, 0.84), 2: (0.96, 0.86)}, "v", ONE_THREAD, split="holdout")
    verdict = judge(HELD, rerun, 0.01, 0.01)
    assert verdict.word == "differs" and "val_acc" not in verdict.line, verdict.line
    assert "seed 0 holdout_acc 0.8000 vs 0.8500 (-0.0500, tolerance ±0.01)" in verdict.line
    assert "holdout_acc mean 0.8333 inside recorded 95% CI [0.8000, 0.9000]" in verdict.checks
    assert any(c.startswith("TOST on holdout_acc at ±0.01: p = ") for c in verdict.checks), verdict.checks
    close = record({0: (0.951, 0.851), 1: (0.941, 0.841), 2: (0.961, 0.861)}, "v", ONE_THREAD, split="holdout")
    assert judge(HELD, close, 0.01, 0.01).word == "equivalent"


def test_a_rerun_evaluated_on_another_split_differs() -> None:
    verdict = judge(HELD, ORIGINAL, 0.01, 0.01)
    assert verdict.word == "differs" and "evaluated on holdout, the rerun on val" in verdict.line, verdict.line


def test_a_holdout_report_names_the_holdout_columns() -> None:
    rerun = record({0: (0.951, 0.851)}, "v", ONE_THREAD, split="holdout")
    text = markdown(HELD, rerun, judge(HELD, rerun, 0.01, 0.01), {"device": "cpu"})
    assert "| holdout_acc (record) | holdout_acc (rerun) |" in text and "val_acc" not in text
    assert "| 0 | no | 0.9500 | 0.9510 | 0.8500 | 0.8510 |" in text
