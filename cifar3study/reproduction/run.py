"""`make reproduce RUN=<run>`: rerun a recorded model run here and judge it against its record.

RUN is a parent run's id, its name, or a DVC experiment's name (`--model`
picks one model of an experiment that trained several; a name several runs
share is refused, listing their ids). The run is looked up in the store of
this repository (`sqlite:///<repo>/mlflow.db`) or MLFLOW_TRACKING_URI. Its
setup is rebuilt in scratch space (see scratch.py), its train and evaluate
stages rerun with its seeds, and the result judged (see verdict.py) on the
split the run was evaluated on: the validation split, or the held-out part
of a run trained with data.holdout > 0. The original run is never written
to: the verdict goes into a new `reproduction` run beside it (tag
`reproduces`) and into `reports/reproductions/<run id>.md`. The last line
printed is the verdict; the exit status is 1 on `differs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from cifar3study.cli import run_stage
from cifar3study.errors import StageError, quote
from cifar3study.files import write_text_atomic
from cifar3study.reproduction import scratch
from cifar3study.reproduction.verdict import Verdict, judge, markdown
from cifar3study.tracking import store
from cifar3study.tracking.record import UNKNOWN, Environment, RunRecord, download_params, read_record
from cifar3study.training.device import is_available

log = logging.getLogger("reproduce")
TOLERANCE = 0.01  # absolute accuracy a seed's rerun may differ by from its record and still be equivalent
MARGIN = 0.01  # TOST equivalence margin on the mean paired difference of val_acc (holdout_acc on a holdout run)
SHOWN_IDS = 4  # run ids an ambiguous name lists: the line stays short, the ids whole (each is what to give)


def _search(client: MlflowClient, where: str) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, where, order_by=["attributes.start_time DESC"]) if ids else []


def _named(client: MlflowClient, ref: str, model: str | None) -> list:
    """The model runs whose run name, else whose DVC experiment name, is `ref`; newest first."""
    if "'" in ref or "\\" in ref:
        return []
    also = f" and tags.model = '{model}'" if model and "'" not in model else ""
    for where in (f"attributes.run_name = '{ref}'", f"tags.`dvc.exp_name` = '{ref}'"):
        if runs := _search(client, f"tags.kind = 'model' and {where}{also}"):
            return runs
    return []


def find_run(client: MlflowClient, ref: str, model: str | None, uri: str) -> str:
    """The parent run `ref` names: a run id (a seed run's leads to its parent), a run name, or a DVC experiment."""
    try:
        found = client.get_run(ref)
        return found.data.tags.get("mlflow.parentRunId", ref) if found.data.tags.get("kind") == "seed" else ref
    except MlflowException:
        pass
    runs = _named(client, ref, model)
    models = sorted({r.data.tags.get("model", "") for r in runs})
    if len(models) > 1:
        raise StageError(f"{quote(ref)} names runs of models {', '.join(models)}; add --model with one of them")
    if len(runs) > 1:  # a name reused (a retrained setup, a repeated experiment): which one is meant is not ours to guess
        ids = [r.info.run_id for r in runs]
        more = f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
        raise StageError(f"{quote(ref)} names {len(ids)} runs, newest first: {', '.join(ids[:SHOWN_IDS])}{more}; "
                         "give the run id of the one to reproduce")
    if runs:
        return runs[0].info.run_id
    raise StageError(f"no run {quote(ref)} in {uri}: give a parent run's id or name or a DVC experiment's name "
                     "(see `mlflow ui`), or set MLFLOW_TRACKING_URI to the store it was logged to")


def check_record(record: RunRecord) -> None:
    """Refuse a record that cannot be rerun, before any copy is made."""
    if record.code_digest == UNKNOWN or not record.seeds:
        raise StageError(f"run {record.run_id} has no code digest or seed runs (recorded before reproducible "
                         "records); rerun its train stage and reproduce that run")


def check_evaluated(record: RunRecord) -> None:
    """Refuse a record that cannot be judged: its seeds were never evaluated."""
    if not record.evaluated:
        raise StageError(f"run {record.run_id} has no {'/'.join(record.accuracies)} per seed; run `dvc repro "
                         f"evaluate@{record.model}` for it first")


def rerun_device(record: RunRecord, requested: str | None) -> str:
    """The requested device, else the recorded device type when this box has one, else `auto`."""
    if requested:
        return requested
    return record.env.device_type if is_available(record.env.device_type) else "auto"


def rerun_record(src: Path, model: str, scratch_dir: Path) -> RunRecord:
    client = MlflowClient(tracking_uri=f"sqlite:///{src / 'mlflow.db'}")
    runs = _search(client, f"tags.kind = 'model' and tags.model = '{model}'")
    if not runs:
        raise StageError(f"the rerun in {src} logged no {model} run; rerun with --scratch DIR and look there")
    return read_record(client, runs[0].info.run_id, scratch_dir)


def log_reproduction(client: MlflowClient, original: RunRecord, rerun: RunRecord, verdict: Verdict,
                     setup: Mapping[str, str], report: Path) -> str:
    """A `reproduction` run beside the original (which is not written to): verdict, both environments, deltas."""
    tags = {"kind": "reproduction", "reproduces": original.run_id, "model": original.model,
            "verdict": verdict.word, "verdict.line": verdict.line[:4000]}
    created = client.create_run(original.experiment_id, run_name=f"reproduce-{original.name}", tags=tags)
    run_id = created.info.run_id
    params = [Param(f"{side}.{f.name}", str(getattr(rec.env, f.name))[:500])
              for side, rec in (("original", original), ("rerun", rerun)) for f in dataclasses.fields(Environment)]
    params += [Param(key, str(value)[:500]) for key, value in setup.items()]
    metrics = [Metric(f"{m}_delta_seed{s.seed}", d, 0, 0) for s in verdict.seeds for m in original.accuracies
               if (d := s.delta(m)) is not None]
    client.log_batch(run_id, params=params, metrics=metrics)
    client.log_artifact(run_id, str(report))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="parent run id, run name, or DVC experiment name")
    parser.add_argument("--model", help="which model of a DVC experiment that trained several")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                        help="where to rerun (default: the recorded device type if this box has one, else auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for the rerun (default: torch's own choice)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="per-seed accuracy tolerance")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help="TOST equivalence margin on val_acc (holdout_acc on a holdout run)")
    parser.add_argument("--scratch", type=Path, help="keep the rebuilt copy in this new folder (default: a temp dir)")
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        raise StageError(f"--threads is {args.threads}; give 1 or more")
    return args


def reproduce(args: argparse.Namespace, root: Path, work: Path) -> tuple[RunRecord, RunRecord, dict[str, str], str]:
    """Find, check, rebuild and rerun; (original, rerun, setup, tracking URI)."""
    uri = store.tracking_uri(os.environ, root)
    store.check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        for name, value in store.HTTP_RETRIES.items():
            os.environ.setdefault(name, value)  # MLflow reads them from the environment
        # Only small files are read (params.yaml, code_files.json): through the server, whatever store is behind
        # it, rather than from presigned URLs, which some S3 servers (moto) refuse to a signed-in user.
        os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    client = MlflowClient(tracking_uri=uri)
    original = read_record(client, find_run(client, args.run, args.model, uri), work / "original")
    check_record(original)
    commit = scratch.commit_of(root, original)
    src = scratch.clone_at(root, commit, work / "src")
    scratch.check_code(src, original)
    check_evaluated(original)
    device = rerun_device(original, args.device)
    scratch.write_params(src, download_params(client, original.run_id, work / "original"), device)
    env = scratch.stage_env(os.environ, args.threads)
    scratch.fetch_data(src, original, env)
    scratch.rerun(src, original, env)
    setup = {"commit": commit, "device": device, "threads": str(args.threads or "default"),
             "tolerance": str(args.tolerance), "margin": str(args.margin)}
    return original, rerun_record(src, original.model, work / "rerun"), setup, uri


def main() -> None:
    args = parse_args()
    root = store.repo_root(os.environ, Path.cwd())
    if args.scratch is not None and args.scratch.exists():
        raise StageError(f"--scratch {args.scratch} exists; name a new folder (the copy is cloned into it)")
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        work = args.scratch or Path(tmp)
        original, rerun, setup, uri = reproduce(args, root, work)
        verdict = judge(original, rerun, args.tolerance, args.margin)
        report = root / "reports" / "reproductions" / f"{original.run_id}.md"
        write_text_atomic(report, markdown(original, rerun, verdict, setup))
        run_id = log_reproduction(MlflowClient(tracking_uri=uri), original, rerun, verdict, setup, report)
    log.info("reproduction run %s, report %s", run_id, report)
    sys.stdout.write(verdict.line + "\n")
    sys.stdout.flush()
    if verdict.word == "differs":
        sys.exit(1)


if __name__ == "__main__":
    run_stage(main)
