"""A recorded run's setup rebuilt in scratch space: its commit, its params.yaml, its data; then its stages rerun.

The copy is a `git clone --shared` of this repository checked out at the
run's commit (a DVC experiment's own commit when its ref is here), so any
commit object this repository holds, experiments included, can be checked
out without touching the repository itself. Its runs go to the copy's own
SQLite store, never to the store the original run lives in.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from cifar3study.data.dataset import read_split
from cifar3study.errors import StageError, one_line, quote
from cifar3study.files import file_md5
from cifar3study.params import archive_source, load_params
from cifar3study.tracking.record import UNKNOWN, RunRecord, code_digest, code_table

log = logging.getLogger("reproduce")
# Set by whoever launched the original run; the rerun must not inherit them from this shell.
LAUNCH_ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "CIFAR3_STUDY",
              "CIFAR3_TRIAL", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=300)


def _exp_commit(root: Path, record: RunRecord) -> str | None:
    """The commit of the run's DVC experiment, when its ref (refs/exps/../<name>) is in this repository."""
    refs = git(root, "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    found = [ref for ref in refs if ref.endswith(f"/{record.exp_name}")]
    if record.exp_baseline:  # names are unique per baseline only: refs/exps/<sha[:2]>/<sha[2:]>/<name>
        found = [ref for ref in found if "".join(ref.split("/")[2:4]) == record.exp_baseline] or found
    done = git(root, "rev-parse", "--verify", "-q", f"{found[0]}^{{commit}}") if found else None
    return done.stdout.strip() if done is not None and done.returncode == 0 else None


def commit_of(root: Path, record: RunRecord) -> str:
    """The commit to rebuild: the experiment's own, else the recorded one; refused when this repository lacks it.

    Without its experiment ref the recorded (baseline) commit serves: the
    recorded params.yaml and the code digest check make up the difference.
    """
    if record.exp_name and (commit := _exp_commit(root, record)):
        return commit
    exists = git(root, "cat-file", "-e", f"{record.commit}^{{commit}}").returncode == 0
    if record.commit == UNKNOWN or not exists:
        fetch = f"`dvc exp pull <remote> {record.exp_name}` or " if record.exp_name else ""
        raise StageError(f"commit {quote(record.commit)} of run {record.run_id} is not in this repository {root}; "
                         f"{fetch}`git fetch` the branch that holds it, then rerun")
    return record.commit


def clone_at(root: Path, commit: str, dest: Path) -> Path:
    """A shared clone of `root` at `commit` (objects borrowed, nothing written into `root`)."""
    for args in (("clone", "-q", "--shared", "--no-checkout", str(root), str(dest)),
                 ("-C", str(dest), "checkout", "-q", "--detach", commit)):
        done = git(root, *args)
        if done.returncode != 0:
            raise StageError(f"git {args[0]} of {root} at {commit[:12]} failed ({one_line(done.stderr, 200)}); "
                             "check the repository and rerun")
    local = root / ".dvc" / "config.local"  # the DVC remote's endpoint and credentials are not committed
    if local.is_file():
        shutil.copy2(local, dest / ".dvc" / "config.local")
    return dest


def check_code(src: Path, record: RunRecord) -> None:
    """Refuse when the train stage's code at the commit is not the code the run ran; name the files."""
    table = code_table(src)
    if code_digest(table) == record.code_digest:
        return
    changed = sorted(path for path in set(table) | set(record.code_files)
                     if table.get(path) != record.code_files.get(path))
    dirty = " (it ran on a tree with uncommitted changes)" if record.dirty == "true" else ""
    raise StageError(f"code of run {record.run_id} differs from its commit {record.commit[:12]}{dirty}: "
                     f"{', '.join(changed[:4]) or 'the code table is missing'}; commit the code it ran (or fetch the "
                     "commit that has it) and reproduce a run recorded from it")


def write_params(src: Path, recorded: Path, device: str) -> None:
    """The run's own params.yaml in place of the commit's, with train.device set to where the rerun goes."""
    text = recorded.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    if raw["train"].get("device") != device:
        raw["train"]["device"] = device
        text = yaml.safe_dump(raw, sort_keys=False)
    (src / "params.yaml").write_text(text, encoding="utf-8")


def check_archive_source(src: Path, record: RunRecord, env: Mapping[str, str]) -> None:
    """Before any download: the archive this box would fetch must be the one the run used."""
    _, md5 = archive_source(load_params(src / "params.yaml").data, env)
    if md5 != record.archive_md5:
        raise StageError(f"run {record.run_id} used the archive with MD5 {record.archive_md5}, but this box's source "
                         f"gives MD5 {md5} (CIFAR10_MD5 or data.md5); set CIFAR10_URL and CIFAR10_MD5 to that archive, "
                         "or configure the DVC remote that holds it, then rerun")


def stage_env(env: Mapping[str, str], threads: int | None) -> dict[str, str]:
    """This shell's environment less what launched the original run; this Python's tools first on PATH."""
    out = {k: v for k, v in env.items() if k not in LAUNCH_ENV}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if threads is not None:
        out["OMP_NUM_THREADS"] = out["MKL_NUM_THREADS"] = str(threads)  # torch reads them at start-up
    return out


def dvc(src: Path, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess:
    log.info("dvc %s (in %s)", " ".join(args), src)
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=src, env=dict(env), capture_output=True,
                          text=True)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return one_line(lines[-1] if lines else f"exit status {done.returncode}", 240)


def archive_path(src: Path) -> Path:
    """Where the download stage of the copy's dvc.yaml puts the archive."""
    outs = yaml.safe_load((src / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["download"]["outs"]
    return src / next(iter(outs[0])) if isinstance(outs[0], dict) else src / outs[0]


def _has_archive(src: Path, record: RunRecord) -> bool:
    archive = archive_path(src)
    return archive.is_file() and file_md5(archive) == record.archive_md5


def pull_archive(src: Path, record: RunRecord, env: Mapping[str, str]) -> bool:
    """The run's archive from the DVC remote by its recorded MD5 (DVC stores files by MD5), then locked as downloaded.

    For a commit whose dvc.lock lacks it or names another archive: its
    download stage is committed with the pulled file, so no repro downloads it.
    """
    pointer = src / "recorded-archive.dvc"
    pointer.write_text(yaml.safe_dump({"outs": [{"md5": record.archive_md5, "hash": "md5", "path": "recorded-archive"}]}),
                       encoding="utf-8")
    pulled = dvc(src, env, "pull", pointer.name)
    pointer.unlink()
    if pulled.returncode != 0:
        log.warning("the archive with MD5 %s is not on the DVC remote (%s)", record.archive_md5, _last_line(pulled))
        return False
    archive = archive_path(src)
    archive.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src / "recorded-archive", archive)
    done = dvc(src, env, "commit", "--force", "download")
    if done.returncode != 0:
        raise StageError(f"cannot record the pulled archive in {src} ({_last_line(done)}); rerun with --scratch DIR "
                         "and look there")
    return True


def fetch_data(src: Path, record: RunRecord, env: Mapping[str, str]) -> None:
    """The CIFAR-3 split from the DVC remote when one is configured, else rebuilt from the archive; MD5 checked.

    The run's commit may predate the dvc.lock that names its data (a run is
    recorded before its results are committed): then the archive is pulled by
    its recorded MD5 and the split rebuilt from it.
    """
    if dvc(src, env, "remote", "list").stdout.strip():
        pulled = dvc(src, env, "pull", "--with-deps", "stats")
        if pulled.returncode != 0:
            log.warning("dvc pull failed (%s)", _last_line(pulled))
        if not _has_archive(src, record) and not pull_archive(src, record, env):
            log.warning("building the data from the archive source instead")
    if not _has_archive(src, record):
        check_archive_source(src, record, env)
    built = dvc(src, env, "repro", "stats")
    if built.returncode != 0:
        raise StageError(f"cannot rebuild the data of run {record.run_id} ({_last_line(built)}); fix the data source "
                         "(CIFAR10_URL, CIFAR10_MD5 or the DVC remote) and rerun")
    used = read_split(src / "data" / "cifar3" / "train.npz").source_md5
    if used != record.archive_md5:
        raise StageError(f"run {record.run_id} used the archive with MD5 {record.archive_md5}, but the data here "
                         f"comes from MD5 {used}; `dvc pull` from the remote that holds it, or set CIFAR10_URL and "
                         "CIFAR10_MD5 to that archive, then rerun")


def rerun(src: Path, record: RunRecord, env: Mapping[str, str]) -> None:
    """The model's train and evaluate stages in the copy (their runs go to the copy's own store)."""
    done = dvc(src, env, "repro", f"evaluate@{record.model}")
    if done.returncode != 0:
        raise StageError(f"the rerun of {record.model} failed in {src} ({_last_line(done)}); fix that and rerun "
                         "(--scratch DIR keeps the copy)")
