"""A team's shared stack on loopback: PostgreSQL for MLflow's runs, S3 for artifacts and DVC data, an MLflow server.

    eval "$(python -m cifar3study.operations.team_stack up)"     # or: eval "$(make -s team-up)"
    python -m cifar3study.operations.team_stack status | stop COMPONENT | start COMPONENT
    python -m cifar3study.operations.team_stack down             # stops everything and deletes the stack's folder

`up` starts what is not running (PostgreSQL as an unprivileged user when run
as root, moto's S3 server with credential checks, `mlflow server`), writes a
DVC remote on the same bucket to `.dvc/config.local`, and prints `export`
lines. In production the same settings point at a managed PostgreSQL and at
MinIO or AWS S3 (endpoint URL, bucket, credentials). moto keeps objects in
memory, so the stack is throwaway: `down` deletes it whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from cifar3study.errors import StageError, one_line
from cifar3study.tracking.store import health_error

log = logging.getLogger("team-stack")
HOST = "127.0.0.1"
BUCKET = "cifar3"
COMPONENTS = ("postgres", "s3", "mlflow")
POSTGRES_BIN = Path(os.environ.get("POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
UNPRIVILEGED = ("nobody", "nogroup")  # PostgreSQL refuses to run as root
BIN = Path(sys.executable).parent  # moto_server, mlflow and dvc of this environment


@dataclasses.dataclass
class Stack:
    """Where the stack lives and how to reach it; saved as state.json in its folder."""

    dir: Path
    ports: dict[str, int]
    s3_key: str = ""
    s3_secret: str = ""
    pids: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def postgres_uri(self) -> str:
        return f"postgresql+psycopg2://mlflow@{HOST}:{self.ports['postgres']}/mlflow"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    def save(self) -> None:
        state = {**dataclasses.asdict(self), "dir": str(self.dir)}
        (self.dir / "state.json").write_text(json.dumps(state, indent=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def open_stack(folder: Path) -> Stack:
    """The stack in `folder`: its saved state, or a new one on free ports."""
    folder = folder.resolve()
    if (folder / "state.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        return Stack(**{**state, "dir": folder})
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the unprivileged PostgreSQL user must be able to enter it
    return Stack(folder, {name: _free_port() for name in COMPONENTS})


def _as_postgres_user(cmd: list[str]) -> list[str]:
    root = os.geteuid() == 0
    return ["setpriv", f"--reuid={UNPRIVILEGED[0]}", f"--regid={UNPRIVILEGED[1]}", "--clear-groups", "--", *cmd] if root else cmd


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise StageError(f"{what} failed ({one_line(done.stderr or done.stdout, 200)}); see the logs in the stack folder")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def start_postgres(stack: Stack) -> None:
    if not (POSTGRES_BIN / "pg_ctl").is_file():
        raise StageError(f"PostgreSQL 15 is not installed ({POSTGRES_BIN}); install it or set POSTGRES_BIN")
    folder, data = stack.dir / "postgres", stack.dir / "postgres" / "data"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o700)
    if os.geteuid() == 0:
        shutil.chown(folder, *UNPRIVILEGED)
    if not (data / "PG_VERSION").is_file():
        _run(_as_postgres_user([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
                                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]), "initdb", cwd=folder)
    options = f"-h {HOST} -p {stack.ports['postgres']} -k {folder} -c fsync=off"  # throwaway: no fsync
    _run(_as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"),
                            "-w", "-t", "60", "-o", options, "start"]), "starting PostgreSQL", cwd=folder)
    listed = subprocess.run([str(POSTGRES_BIN / "psql"), "-h", HOST, "-p", str(stack.ports["postgres"]), "-U", "mlflow",
                             "-d", "postgres", "-Atc", "select 1 from pg_database where datname = 'mlflow'"],
                            capture_output=True, text=True, timeout=60)
    if listed.stdout.strip() != "1":
        _run([str(POSTGRES_BIN / "createdb"), "-h", HOST, "-p", str(stack.ports["postgres"]), "-U", "mlflow", "mlflow"],
             "creating the mlflow database")


def stop_postgres(stack: Stack) -> None:
    data = stack.dir / "postgres" / "data"
    if (data / "postmaster.pid").is_file():
        subprocess.run(_as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       cwd=stack.dir / "postgres", capture_output=True, timeout=120)


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Start a server in its own session, so stopping it stops its workers too."""
    with open(stack.dir / f"{name}.log", "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=stack.dir, start_new_session=True)
    stack.pids[name] = process.pid
    stack.save()


def _wait(stack: Stack, name: str, ready: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        alive = _alive(stack.pids.get(name))
        if not alive or time.monotonic() > deadline:
            lines = [ln for ln in (stack.dir / f"{name}.log").read_text(errors="replace").splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if "Error" in ln or "ERROR" in ln), lines[-1] if lines else "")
            raise StageError(f"{name} did not start ({one_line(reason, 200)}); see {stack.dir / (name + '.log')}")
        time.sleep(0.2)


def _alive(pid: int | None) -> bool:
    """Whether any process of the server's process group is still running (zombies do not count)."""
    if not pid:
        return False
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _stop(stack: Stack, name: str, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
    pid = stack.pids.pop(name, None)
    stack.save()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _aws(stack: Stack, service: str, key: str = "testing", secret: str = "testing") -> object:
    """A boto3 client of the stack's S3 server (which also serves moto's IAM); moto's default key until reset-auth."""
    import boto3  # only the stack needs it

    return boto3.client(service, endpoint_url=stack.s3_endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


def start_s3(stack: Stack) -> None:
    """moto's S3 server with a bucket and a user whose key it checks, as MinIO or AWS S3 would."""
    _spawn(stack, "s3", [str(BIN / "moto_server"), "-H", HOST, "-p", str(stack.ports["s3"])])
    _wait(stack, "s3", lambda: _listening(stack.ports["s3"]), 60)
    iam = _aws(stack, "iam")
    iam.create_user(UserName="team")
    iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="team")["AccessKey"]
    stack.s3_key, stack.s3_secret = key["AccessKeyId"], key["SecretAccessKey"]
    stack.save()
    request = urllib.request.Request(f"{stack.s3_endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # moto reads the raw body
    urllib.request.urlopen(request, timeout=10).close()  # from now on every request must be signed by that key
    ensure_bucket(stack)


def ensure_bucket(stack: Stack) -> None:
    client = _aws(stack, "s3", stack.s3_key, stack.s3_secret)
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)


def start_mlflow(stack: Stack, s3_secret: str | None = None) -> None:
    """`mlflow server` on PostgreSQL, storing artifacts in the bucket and serving them to clients."""
    if not _listening(stack.ports["postgres"]):
        raise StageError(f"PostgreSQL at {HOST}:{stack.ports['postgres']} is down, so the MLflow server cannot start; "
                         "start it (python -m cifar3study.operations.team_stack start postgres) and rerun")
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint, "AWS_ACCESS_KEY_ID": stack.s3_key,
           "AWS_SECRET_ACCESS_KEY": s3_secret or stack.s3_secret, "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # its GenAI job workers: 7 processes this project never uses
    env.pop("MLFLOW_TRACKING_URI", None)
    _spawn(stack, "mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", stack.postgres_uri,
                             "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", HOST,
                             "--port", str(stack.ports["mlflow"]), "--workers", "1"], env)
    _wait(stack, "mlflow", lambda: _healthy(stack.tracking_uri), 180)


def _healthy(uri: str) -> bool:
    return health_error(uri, timeout=2) is None


def configure_dvc_remote(stack: Stack, repo: Path) -> None:
    """A default DVC remote on the bucket, in .dvc/config.local: nothing machine-specific is committed."""
    dvc = [str(BIN / "dvc"), "remote"]
    _run([*dvc, "add", "--local", "--default", "--force", "team", f"s3://{BUCKET}/dvc"], "dvc remote add", repo)
    for option, value in (("endpointurl", stack.s3_endpoint), ("access_key_id", stack.s3_key),
                          ("secret_access_key", stack.s3_secret), ("region", "us-east-1")):
        _run([*dvc, "modify", "--local", "team", option, value], f"dvc remote modify {option}", repo)


def running(stack: Stack) -> dict[str, bool]:
    return {"postgres": _listening(stack.ports["postgres"]), "s3": _alive(stack.pids.get("s3")),
            "mlflow": _alive(stack.pids.get("mlflow")) and _healthy(stack.tracking_uri)}


def start(stack: Stack, name: str) -> None:
    {"postgres": start_postgres, "s3": start_s3, "mlflow": start_mlflow}[name](stack)


def stop(stack: Stack, name: str) -> None:
    stop_postgres(stack) if name == "postgres" else _stop(stack, name)


def up(stack: Stack, repo: Path | None) -> dict[str, str]:
    """Start whatever is not running; the variables that point a shell at the stack."""
    state = running(stack)
    if not state["s3"] and state["mlflow"]:
        stop(stack, "mlflow")  # a new S3 server has a new key: the MLflow server must get it
        state["mlflow"] = False
    for name in COMPONENTS:
        if not state[name]:
            log.info("starting %s", name)
            start(stack, name)
    if state["s3"]:
        ensure_bucket(stack)  # a store that kept running may have lost its bucket
    if repo is not None and (repo / ".dvc").is_dir():
        configure_dvc_remote(stack, repo)
    # moto cannot serve presigned downloads to a signed-in user: clients fetch artifacts through the server instead.
    return {"MLFLOW_TRACKING_URI": stack.tracking_uri, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


def down(stack: Stack) -> None:
    for name in reversed(COMPONENTS):
        stop(stack, name)
    shutil.rmtree(stack.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status", "start", "stop"))
    parser.add_argument("component", nargs="?", choices=COMPONENTS, help="for start and stop")
    parser.add_argument("--dir", type=Path, default=Path(".team"), help="the stack's folder (default .team)")
    args = parser.parse_args()
    if args.command in ("start", "stop") and not args.component:
        raise StageError(f"`{args.command}` needs a component: {', '.join(COMPONENTS)}")
    stack = open_stack(args.dir)
    if args.command == "up":
        exports = up(stack, Path.cwd())
        sys.stdout.write("".join(f"export {k}={v}\n" for k, v in exports.items()))  # for `eval "$(...)"`
    elif args.command == "down":
        down(stack)
    elif args.command == "status":
        for name, alive in running(stack).items():
            log.info("%s: %s", name, "running" if alive else "stopped")
    else:
        (start if args.command == "start" else stop)(stack, args.component)


if __name__ == "__main__":
    from cifar3study.cli import run_stage

    run_stage(main)
