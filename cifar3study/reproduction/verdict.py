"""The judgement of a rerun against its record: bitwise, equivalent or differs, and which difference explains it.

- bitwise: every seed's final weights digest equals the recorded one, and
  every metric evaluate computes from the weights (seed_metrics, parent_metrics) is
  logged again with exactly the recorded value;
- equivalent: not bitwise, but every seed's train and evaluation accuracy is
  within `tolerance` of its record, the rerun's group means lie inside the
  recorded 95% intervals, and (n >= 2 seeds) a paired TOST shows the
  evaluation accuracy equal within `margin` at level `alpha`; with one seed
  there is no interval and no test, and the verdict says "n too small";
- differs: anything else, naming the seeds and metrics and by how much; also
  equal weights with a metric that is not, weights that differ where nothing
  may make them differ (identical environment, deterministic training), and a
  rerun evaluated on another split than the record.

The evaluation split is the record's (RunRecord.split): metric names follow
it, `val_acc`, `val_macro_f1`, ... or `holdout_acc`, `holdout_macro_f1`, ...
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from scipy import stats

from cifar3study.reporting.evaluation import spread_keys
from cifar3study.tracking.record import UNKNOWN, Environment, RunRecord, SeedRecord

ALPHA = 0.05
SHOWN = 4  # metric mismatches named in a verdict line
# What each environment field is called in a verdict; all of them change floating-point results.
FIELD_NAMES = {"device_type": "device type", "device": "device", "cpu_capability": "CPU capability",
               "torch": "torch version", "numpy": "numpy version", "onednn": "oneDNN version", "cuda": "CUDA version",
               "cudnn": "cuDNN version", "threads": "thread count", "deterministic": "train.deterministic",
               "channels_last": "train.channels_last", "tf32": "train.tf32"}


@dataclasses.dataclass(frozen=True)
class SeedComparison:
    seed: int
    weights_equal: bool
    original: dict[str, float | None]
    rerun: dict[str, float | None]

    def delta(self, metric: str) -> float | None:
        a, b = self.original.get(metric), self.rerun.get(metric)
        return None if a is None or b is None else b - a


@dataclasses.dataclass(frozen=True)
class Verdict:
    word: str  # bitwise | equivalent | differs
    line: str  # the one line printed last
    reasons: list[str]  # environment differences that explain a non-bitwise rerun
    seeds: list[SeedComparison]
    checks: list[str]  # each statistical check and its outcome, for the report


def seed_metrics(split: str) -> tuple[str, ...]:
    """What evaluate logs on each seed run from the weights and the data alone: accuracies, gap and F1 on `split`.

    Equal weights must give them again bit for bit. Not compared: train's curves (training history, not the
    record's result; equal weights already say the training repeated).
    """
    return spread_keys(split)


def parent_metrics(split: str) -> tuple[str, ...]:
    """Likewise on the parent run: the seed metrics' mean and spread over the seeds.

    Not compared: seconds_per_epoch, group_seconds_per_epoch and images_per_second (wall clock, never equal twice).
    """
    return tuple(f"{key}{end}" for key in spread_keys(split)
                 for end in ("", "_std", "_min", "_max", "_n", "_ci95_low", "_ci95_high"))


def env_differences(original: Environment, rerun: Environment) -> list[str]:
    """`thread count 2 → 1`, ...: every numerics-relevant field that differs, and a deterministic setting that is off."""
    out = []
    for field in dataclasses.fields(Environment):
        a, b = getattr(original, field.name), getattr(rerun, field.name)
        if field.name == "device" and original.device_type == rerun.device_type and "threads" in a:
            continue  # a CPU's name carries its thread count, reported on its own
        if a != b:
            out.append(f"{FIELD_NAMES[field.name]} {a} → {b}")
    if "False" in (original.deterministic, rerun.deterministic):
        out.append("deterministic off (train.deterministic: false)")
    return out


def tost_p(diffs: list[float], margin: float) -> float:
    """p value of a paired two one-sided t-test that the mean difference lies within ±margin."""
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se, df = sd / math.sqrt(len(diffs)), len(diffs) - 1
    lower = float(stats.t.sf((mean + margin) / se, df))
    upper = float(stats.t.cdf((mean - margin) / se, df))
    return max(lower, upper)


def _accuracies(names: tuple[str, str], rec: SeedRecord | None) -> dict[str, float | None]:
    return dict(zip(names, (rec.train_acc, rec.eval_acc) if rec else (None, None), strict=True))


def compare_seeds(original: RunRecord, rerun: RunRecord) -> list[SeedComparison]:
    """Each recorded seed: weights equal or not, and its accuracies (by the record's names) on both sides."""
    out = []
    for seed, rec in sorted(original.seeds.items()):
        new = rerun.seeds.get(seed)
        equal = new is not None and rec.weights != UNKNOWN and rec.weights == new.weights
        out.append(SeedComparison(seed, equal, _accuracies(original.accuracies, rec),
                                  _accuracies(original.accuracies, new)))
    return out


def _statistical_checks(seeds: list[SeedComparison], original: RunRecord, tolerance: float, margin: float) \
        -> tuple[list[str], list[str]]:
    """(failures, every check with its outcome) of a rerun that is not bitwise."""
    failures, checks, metrics = [], [], original.accuracies
    for s in seeds:
        for metric in metrics:
            delta = s.delta(metric)
            if delta is None:
                failures.append(f"seed {s.seed} has no {metric}")
            elif abs(delta) > tolerance:
                failures.append(f"seed {s.seed} {metric} {s.rerun[metric]:.4f} vs {s.original[metric]:.4f} "
                                f"({delta:+.4f}, tolerance ±{tolerance})")
    checks.append(f"per-seed tolerance ±{tolerance}: " + ("failed" if failures else "every seed within"))
    values = {m: [s.rerun[m] for s in seeds if s.rerun[m] is not None] for m in metrics}
    for metric in metrics:
        ci = original.ci95.get(metric)
        if ci is None or not values[metric]:
            checks.append(f"{metric} mean inside the recorded 95% interval: n too small (no interval recorded)")
            continue
        mean = statistics.fmean(values[metric])
        inside = ci[0] <= mean <= ci[1]
        checks.append(f"{metric} mean {mean:.4f} {'inside' if inside else 'outside'} recorded 95% CI "
                      f"[{ci[0]:.4f}, {ci[1]:.4f}]")
        if not inside:
            failures.append(checks[-1])
    diffs = [d for s in seeds if (d := s.delta(metrics[1])) is not None]
    if len(diffs) < 2:
        checks.append(f"TOST on {metrics[1]} at ±{margin}: n too small ({len(diffs)} seed)")
    else:
        p = tost_p(diffs, margin)
        checks.append(f"TOST on {metrics[1]} at ±{margin}: p = {p:.3g} ({'equivalent' if p < ALPHA else 'not shown'} "
                      f"at α = {ALPHA}, n = {len(diffs)})")
        if p >= ALPHA:
            failures.append(checks[-1])
    return failures, checks


def _shown(value: float | None) -> str:
    return "none" if value is None else repr(value)  # the shortest text that tells any two floats apart


def metric_mismatches(original: RunRecord, rerun: RunRecord) -> list[str]:
    """`val_acc 0.99 recorded, 0.625 rerun`, ...: each compared metric logged on one side and not equal on the other.

    A metric the rerun logs but the record lacks counts too: then the record is not what this commit's evaluate wrote.
    """
    split = original.split
    sides = [("", parent_metrics(split), original.metrics, rerun.metrics)]
    sides += [(f"seed {seed} ", seed_metrics(split), rec.metrics, rerun.seeds[seed].metrics if seed in rerun.seeds else {})
              for seed, rec in sorted(original.seeds.items())]
    return [f"{where}{key} {_shown(a.get(key))} recorded, {_shown(b.get(key))} rerun"
            for where, keys, a, b in sides for key in keys if a.get(key) != b.get(key)]


def _bitwise(what: str, original: RunRecord, rerun: RunRecord, seeds: list[SeedComparison]) -> Verdict:
    """Equal weights: bitwise only if every recorded metric is what the rerun logs from them."""
    wrong = metric_mismatches(original, rerun)
    if wrong:
        more = f"; and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""
        return Verdict("differs", f"differs: {what} weights equal bit for bit, but its recorded metrics are not what "
                       f"the rerun computes from them: {'; '.join(wrong[:SHOWN])}{more} (the record was changed, or "
                       "evaluated by other code)", [], seeds, wrong)
    return Verdict("bitwise", f"bitwise: {what} reproduced bit for bit: all {len(seeds)} seeds' weights and their "
                   "metrics equal", [], seeds, ["every seed's weights digest and evaluated metrics equal the record"])


def judge(original: RunRecord, rerun: RunRecord, tolerance: float, margin: float) -> Verdict:
    """Bitwise, equivalent or differs, with the environment differences that explain a non-bitwise rerun."""
    seeds = compare_seeds(original, rerun)
    what = f"{original.name} ({original.run_id[:8]})"
    if rerun.split != original.split:
        return Verdict("differs", f"differs: {what} was evaluated on {original.split}, the rerun on {rerun.split}: "
                       "it did not run with the recorded data.holdout", [], seeds, [])
    if all(s.weights_equal for s in seeds):
        return _bitwise(what, original, rerun, seeds)
    reasons = env_differences(original.env, rerun.env)
    unequal = [str(s.seed) for s in seeds if not s.weights_equal]
    why = f"explained by {'; '.join(reasons)}" if reasons else "no recorded environment difference explains it"
    unknown = any(original.seeds[int(s)].weights == UNKNOWN for s in unequal)
    if unknown:
        why = "the record has no weights digest (a run older than reproducible records)"
    failures, checks = _statistical_checks(seeds, original, tolerance, margin)
    head = f"not bitwise (seeds {', '.join(unequal)}; {why})"
    if not reasons and not unknown and original.env.deterministic == "True":
        # Deterministic training on an identical environment repeats bit for bit (the same-box rerun test shows it).
        return Verdict("differs", f"differs: {what} not bitwise (seeds {', '.join(unequal)}) although the environment "
                       "is identical and train.deterministic is true: the record or the code is not what it says",
                       reasons, seeds, checks)
    if failures:
        return Verdict("differs", f"differs: {what} {head}: {'; '.join(failures)}", reasons, seeds, checks)
    return Verdict("equivalent", f"equivalent: {what} {head}; {'; '.join(checks)}", reasons, seeds, checks)


def _value(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def markdown(original: RunRecord, rerun: RunRecord, verdict: Verdict, setup: dict[str, str]) -> str:
    """The report `reports/reproductions/<run>.md`: verdict, seeds, checks, both environments side by side."""
    train, acc = original.accuracies
    lines = [f"# Reproduction of {original.name} (run {original.run_id})", "", f"**{verdict.line}**", "",
             *[f"- {key}: {value}" for key, value in setup.items()], "",
             f"| seed | weights equal | {train} (record) | {train} (rerun) | {acc} (record) | {acc} (rerun) |",
             "|---:|:-:|---:|---:|---:|---:|"]
    lines += [f"| {s.seed} | {'yes' if s.weights_equal else 'no'} | {_value(s.original[train])} | "
              f"{_value(s.rerun[train])} | {_value(s.original[acc])} | {_value(s.rerun[acc])} |"
              for s in verdict.seeds]
    lines += ["", *[f"- {check}" for check in verdict.checks], "", "| environment | record | rerun |", "|---|---|---|"]
    lines += [f"| {FIELD_NAMES[f.name]} | {getattr(original.env, f.name)} | {getattr(rerun.env, f.name)} |"
              for f in dataclasses.fields(Environment)]
    return "\n".join(lines) + "\n"
