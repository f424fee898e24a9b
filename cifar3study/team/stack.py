"""A team's shared stack on loopback: PostgreSQL for MLflow's runs, S3 for artifacts and DVC data, an MLflow server.

    eval "$(python -m cifar3study.team.stack up)"     # or: eval "$(make -s team-up)"
    python -m cifar3study.team.stack status | stop COMPONENT | start COMPONENT
    python -m cifar3study.team.stack down             # stops everything and deletes the stack's folder

`up` starts what is not running (PostgreSQL as an unprivileged user when run
as root, with a generated password; moto's S3 server with credential checks;
`mlflow server`), writes a DVC remote on the same bucket to
`.dvc/config.local`, and prints `export` lines. Secrets live in files only
their owner reads and in child environments, never on a command line. In
production the same settings point at a managed PostgreSQL and at MinIO or AWS
S3. moto keeps objects in memory, so the stack is throwaway: `down` deletes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cifar3study.errors import StageError, one_line
from cifar3study.team.postgres import start_postgres, stop_postgres
from cifar3study.team.processes import HOST, alive, listening
from cifar3study.team.state import COMPONENTS, Stack, open_stack
from cifar3study.tracking.store import health_error

log = logging.getLogger("team-stack")
BUCKET = "cifar3"
BIN = Path(sys.executable).parent  # moto_server, mlflow and dvc of this environment


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
        if not alive(stack.pids.get(name)) or time.monotonic() > deadline:
            lines = [ln for ln in (stack.dir / f"{name}.log").read_text(errors="replace").splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if "Error" in ln or "ERROR" in ln), lines[-1] if lines else "")
            raise StageError(f"{name} did not start ({one_line(reason, 200)}); see {stack.dir / (name + '.log')}")
        time.sleep(0.2)


def _stop(stack: Stack, name: str, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
    pid = stack.pids.pop(name, None)
    stack.save()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _aws(stack: Stack, service: str, key: str = "testing", secret: str = "testing") -> object:
    """A boto3 client of the stack's S3 server (which also serves moto's IAM); moto's default key until reset-auth."""
    import boto3  # only the stack needs it

    return boto3.client(service, endpoint_url=stack.s3_endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


def start_s3(stack: Stack) -> None:
    """moto's S3 server with a bucket and a user whose key it checks, as MinIO or AWS S3 would."""
    _spawn(stack, "s3", [str(BIN / "moto_server"), "-H", HOST, "-p", str(stack.ports["s3"])])
    _wait(stack, "s3", lambda: listening(stack.ports["s3"]), 60)
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
    if not listening(stack.ports["postgres"]):
        raise StageError(f"PostgreSQL at {HOST}:{stack.ports['postgres']} is down, so the MLflow server cannot start; "
                         "start it (python -m cifar3study.team.stack start postgres) and rerun")
    env = {**stack.postgres_env, "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint, "AWS_ACCESS_KEY_ID": stack.s3_key,
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
    """A default DVC remote on the bucket, in .dvc/config.local (not committed), readable by its owner only.

    Written through DVC's own config code rather than `dvc remote modify`, whose command line would show the key."""
    from dvc.config import Config, ConfigError  # only the stack needs it

    local = repo / ".dvc" / "config.local"
    try:
        os.close(os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # private before DVC writes into it
        stack.dvc_config_created = True
    except FileExistsError:
        local.chmod(0o600)
    stack.dvc_repo = str(repo.resolve())
    stack.save()
    try:
        with Config(dvc_dir=str(repo / ".dvc")).edit("local") as conf:
            conf["remote"]["team"] = {"url": f"s3://{BUCKET}/dvc", "endpointurl": stack.s3_endpoint,
                                      "access_key_id": stack.s3_key, "secret_access_key": stack.s3_secret,
                                      "region": "us-east-1"}
            conf["core"]["remote"] = "team"
    except ConfigError as error:
        raise StageError(f"DVC's config in {repo / '.dvc'} is invalid ({one_line(str(error), 200)}); fix it and rerun") from None
    local.chmod(0o600)  # in case DVC ever writes it anew


def remove_dvc_remote(stack: Stack) -> None:
    """Take out what `up` wrote to .dvc/config.local; the file too when `up` made it and nothing else is left."""
    from dvc.config import Config

    local = Path(stack.dvc_repo) / ".dvc" / "config.local"
    if not stack.dvc_repo or not local.is_file():
        return
    with Config(dvc_dir=str(local.parent)).edit("local", validate=False) as conf:
        conf["remote"].pop("team", None)
        if conf["core"].get("remote") == "team":
            del conf["core"]["remote"]
        left = any(conf.values())
    if stack.dvc_config_created and not left:
        local.unlink()


def running(stack: Stack) -> dict[str, bool]:
    return {"postgres": listening(stack.ports["postgres"]), "s3": alive(stack.pids.get("s3")),
            "mlflow": alive(stack.pids.get("mlflow")) and _healthy(stack.tracking_uri)}


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
    return {"MLFLOW_TRACKING_URI": stack.tracking_uri, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
            "CIFAR3_LEDGER": stack.ledger_uri, "PGPASSFILE": str(stack.pgpass)}


def down(stack: Stack) -> None:
    """Stop everything and remove what `up` wrote: the DVC remote, PostgreSQL's folder, the stack's folder."""
    for name in reversed(COMPONENTS):
        stop(stack, name)
    remove_dvc_remote(stack)
    shutil.rmtree(stack.postgres_folder, ignore_errors=True)
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
