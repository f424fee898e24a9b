"""The team stack's PostgreSQL: its own folder the unprivileged user can reach, scram with a generated password."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from cifar3study.errors import StageError
from cifar3study.team.processes import HOST, run_checked, write_private
from cifar3study.team.state import Stack

POSTGRES_BIN = Path(os.environ.get("POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
UNPRIVILEGED = ("nobody", "nogroup")  # PostgreSQL refuses to run as root
DATABASES = ("mlflow", "optuna")  # MLflow's runs; the studies' ledger


def _as_postgres_user(cmd: list[str]) -> list[str]:
    root = os.geteuid() == 0
    return ["setpriv", f"--reuid={UNPRIVILEGED[0]}", f"--regid={UNPRIVILEGED[1]}", "--clear-groups", "--", *cmd] if root else cmd


def _postgres_folder(stack: Stack) -> Path:
    """The cluster's folder, made on first use outside the repository: a repository under a folder the
    unprivileged user cannot enter (root's 0700 home) must not stop PostgreSQL from reaching its data."""
    if stack.postgres_dir and Path(stack.postgres_dir).is_dir():
        return Path(stack.postgres_dir)
    root = os.geteuid() == 0
    parent = Path(tempfile.gettempdir()).resolve()
    if root and not all(p.stat().st_mode & 0o001 for p in (parent, *parent.parents)):
        raise StageError(f"user {UNPRIVILEGED[0]} cannot enter {parent} to run PostgreSQL there; "
                         "set TMPDIR to a folder every user can enter, such as /tmp, and rerun")
    folder = Path(tempfile.mkdtemp(prefix="cifar3-team-pg-"))  # mode 0700
    if root:
        shutil.chown(folder, *UNPRIVILEGED)
    stack.postgres_dir = str(folder)
    stack.save()
    return folder


def _initdb(stack: Stack, folder: Path) -> None:
    """A cluster whose role mlflow has a new password (scram), passed in a file only that user reads."""
    stack.postgres_password = secrets.token_urlsafe(24)
    stack.save()
    pwfile = folder / "pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(stack.postgres_password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, *UNPRIVILEGED)
        run_checked(_as_postgres_user([str(POSTGRES_BIN / "initdb"), "-D", str(folder / "data"), "-U", "mlflow",
                                f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                                "--no-sync"]), "initdb", cwd=folder)
    finally:
        pwfile.unlink(missing_ok=True)


def start_postgres(stack: Stack) -> None:
    if not (POSTGRES_BIN / "pg_ctl").is_file():
        raise StageError(f"PostgreSQL 15 is not installed ({POSTGRES_BIN}); install it or set POSTGRES_BIN")
    folder = _postgres_folder(stack)
    data = folder / "data"
    if not (data / "PG_VERSION").is_file():
        _initdb(stack, folder)
    options = f"-h {HOST} -p {stack.ports['postgres']} -k {folder} -c fsync=off"  # throwaway: no fsync
    run_checked(_as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"),
                            "-w", "-t", "60", "-o", options, "start"]), "starting PostgreSQL", cwd=folder)
    client = ["-h", HOST, "-p", str(stack.ports["postgres"]), "-U", "mlflow", "-w"]
    for database in DATABASES:
        listed = subprocess.run([str(POSTGRES_BIN / "psql"), *client, "-d", "postgres", "-Atc",
                                 f"select 1 from pg_database where datname = '{database}'"],
                                capture_output=True, text=True, timeout=60, env=stack.postgres_env)
        if listed.stdout.strip() != "1":
            run_checked([str(POSTGRES_BIN / "createdb"), *client, database], f"creating the {database} database",
                        env=stack.postgres_env)
    write_private(stack.pgpass, f"{HOST}:{stack.ports['postgres']}:*:mlflow:{stack.postgres_password}\n")


def stop_postgres(stack: Stack) -> None:
    data = stack.postgres_folder / "data"
    if (data / "postmaster.pid").is_file():
        subprocess.run(_as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       cwd=stack.postgres_folder, capture_output=True, timeout=120)
