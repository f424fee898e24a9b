"""Ray's doors in a study: a local session listens on loopback only, keeps its token and sockets to its owner and
leaves nothing behind; a trial no node could run is refused in one line, judged node by node on a real cluster.

Each session runs in a driver process of its own (Ray reads some settings once per process), with HOME in a
temporary folder so nothing lands in ~/.ray. What listens is read from the kernel while the driver waits; the
doors are knocked on with curl (gRPC over HTTP/2) with and without the token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cifar3study.team.processes import free_port
from tests.helpers import ROOT

RAY = str(Path(sys.executable).parent / "ray")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
STARTUP_SECONDS = 180  # Ray starts in about 5 s here
UNAUTHENTICATED, OK = "16", "0"  # gRPC status codes
METHODS = {"gcs_server": "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
           "node manager": "/ray.rpc.NodeManagerService/GetNodeStats",
           "object manager": "/ray.rpc.ObjectManagerService/Pull",
           "core worker": "/ray.rpc.CoreWorkerService/NumPendingTasks"}

DRIVER = textwrap.dedent("""
    import json, sys
    from cifar3study.errors import StageError
    from cifar3study.studies.cluster import check_resources, ray_session, unschedulable_reason

    def refused(cpus, gpus):
        try:
            check_resources(cpus, gpus)
        except StageError as err:
            return str(err)
        return unschedulable_reason(cpus, gpus)  # None as well

    address = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        with ray_session(address, None if address else 0, {}):
            import ray

            ray.get(ray.remote(lambda: 1).remote())  # a worker process, and its door, too
            node = ray.nodes()[0]
            ports = {str(node[key]): name for key, name in [("NodeManagerPort", "node manager"),
                     ("ObjectManagerPort", "object manager"), ("RuntimeEnvAgentPort", "runtime env agent")]}
            asks = {"64 CPUs": (64, 0), "1 GPU": (1, 1), "2 CPUs": (2, 0), "1 CPU": (1, 0)}
            print(json.dumps({"ports": ports, "refused": {k: refused(*v) for k, v in asks.items()}}), flush=True)
            sys.stdin.readline()
    except StageError as err:
        print(json.dumps({"error": str(err)}), flush=True)
""")


@dataclasses.dataclass
class Door:
    process: str
    ip: str
    port: int
    kind: str = ""


@dataclasses.dataclass
class Session:
    """What a local study's Ray showed while it ran, and what it left."""

    home: Path
    report: dict
    doors: list[Door]
    token_file: Path | None  # None: the token was passed in the environment only
    token: str
    socket: Path  # the raylet's Unix socket
    private: Path  # the socket's top folder under the temp folder
    private_mode: int = 0
    token_modes: tuple[int, int] = (0, 0)  # of the token file and its folder
    statuses: dict[tuple[int, str], str] = dataclasses.field(default_factory=dict)  # (port, token?): status
    pids: list[int] = dataclasses.field(default_factory=list)
    left: list[str] = dataclasses.field(default_factory=list)


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(processes: list[psutil.Process]) -> list[Door]:
    doors = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            doors += [Door(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
    return doors


def host(door: Door) -> str:
    """Where to knock: a door on every interface or on loopback answers on 127.0.0.1."""
    return "127.0.0.1" if door.ip in LOOPBACK | {"::", "0.0.0.0"} else door.ip


def grpc_status(door: Door, method: str, token: str | None) -> str:
    """The grpc-status a gRPC server answers to an empty request."""
    cmd = ["curl", "-sv", "--http2-prior-knowledge", "--max-time", "10", "-o", "/dev/null", "--data-binary", "@-",
           "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{host(door)}:{door.port}{method}"]
    cmd += ["-H", f"authorization: Bearer {token}"] if token else []
    trace = subprocess.run(cmd, input=b"\0" * 5, capture_output=True, timeout=30).stderr.decode(errors="replace")
    return (re.findall(r"grpc-status: (\d+)", trace) or ["none"])[-1]


def http_status(door: Door, token: str | None) -> str:
    request = urllib.request.Request(f"http://{host(door)}:{door.port}/get_or_create_runtime_env", data=b"{}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        return str(urllib.request.urlopen(request, timeout=10).status)
    except urllib.error.HTTPError as err:
        return str(err.code)


def knock(session: Session) -> None:
    """Every door, without the token and with it."""
    for door in session.doors:
        door.kind = session.report["ports"].get(str(door.port)) or (
            "gcs_server" if door.process == "gcs_server" else "core worker")
        for token in (None, session.token):
            status = (http_status(door, token) if door.kind == "runtime env agent"
                      else grpc_status(door, METHODS[door.kind], token))
            session.statuses[door.port, "token" if token else "none"] = status


def observe(driver: subprocess.Popen, home: Path, report: dict) -> Session:
    processes = tree(driver.pid)
    raylet = next(p for p in processes if p.name() == "raylet")
    socket = Path(re.search(r"--raylet_socket_name=(\S+)", " ".join(raylet.cmdline()))[1])
    environ = raylet.environ()
    token_file = (Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else
                  None if environ.get("RAY_AUTH_TOKEN") else home / ".ray" / "auth_token")
    token = environ.get("RAY_AUTH_TOKEN") or token_file.read_text().strip()
    temp = Path(tempfile.gettempdir()).resolve()
    private = temp / socket.resolve().relative_to(temp).parts[0]
    session = Session(home, report, listening(processes), token_file, token, socket, private,
                      stat.S_IMODE(private.stat().st_mode), pids=[p.pid for p in processes])
    if token_file is not None:
        session.token_modes = (stat.S_IMODE(token_file.stat().st_mode), stat.S_IMODE(token_file.parent.stat().st_mode))
    knock(session)
    return session


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """One local study session (no address, 0 GPUs), observed while it runs and after it ended."""
    home = tmp_path_factory.mktemp("home")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env={**os.environ, "HOME": str(home)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([driver.stdout], [], [], STARTUP_SECONDS)[0], "the driver's Ray session never came up"
        line = driver.stdout.readline()
        assert line, "the driver ended before its Ray session was up"
        session = observe(driver, home, json.loads(line))
        driver.communicate("\n", timeout=120)
    finally:
        driver.kill()
    session.left = [f"pid {pid}" for pid in session.pids if alive(pid)]
    session.left += [str(session.private)] if session.private.exists() else []
    return session


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_token_is_readable_by_its_owner_only_and_not_in_home(local: Session) -> None:
    if local.token_file is not None:
        assert local.token_modes == (0o600, 0o700), f"{local.token_file}: {[oct(m) for m in local.token_modes]}"
    assert not (local.home / ".ray").exists(), "the study left a token in ~/.ray"


def test_ray_sockets_and_logs_live_in_a_private_folder_removed_at_the_end(local: Session) -> None:
    assert local.private_mode == 0o700, f"{local.private} is {oct(local.private_mode)}"
    assert len(os.fsencode(local.socket)) <= 107
    assert local.left == [], "left behind after the session"


def test_ray_listens_on_loopback_only(local: Session) -> None:
    kinds = {door.kind for door in local.doors}
    assert {"gcs_server", "node manager", "object manager", "core worker"} <= kinds, local.doors  # seen at all
    exposed = [door for door in local.doors if door.ip not in LOOPBACK]
    assert exposed == [], "listening beyond loopback"


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_every_door_refuses_a_caller_without_the_token(local: Session) -> None:
    for door in local.doors:
        refused, allowed = local.statuses[door.port, "none"], local.statuses[door.port, "token"]
        if door.kind == "runtime env agent":
            assert refused == "401" and allowed not in {"401", "403"}, door
        else:
            assert (refused, allowed) == (UNAUTHENTICATED, OK), door


def test_a_trial_no_node_fits_is_refused_in_one_line(local: Session) -> None:
    refused = local.report["refused"]
    offer = r"nodes offer: 127\.0\.0\.1: \d+ CPUs?, 0 GPUs; lower resources in the study file or add a node$"
    assert re.match(r"no node of this cluster offers 64 CPUs; " + offer, refused["64 CPUs"] or ""), refused
    assert re.match(r"no node of this cluster offers 1 GPU; " + offer, refused["1 GPU"] or ""), refused
    assert refused["1 CPU"] is None


def test_ray_imported_before_a_local_session_is_a_clear_error(tmp_path: Path) -> None:
    """Ray reads its auth mode and loopback setting on import: imported earlier, it would ignore the session's."""
    code = "import ray\nfrom cifar3study.studies.cluster import ray_session\nwith ray_session(None, 0, {}): pass"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().endswith("import Ray only inside the session, or export both first"), done.stderr
    assert not (tmp_path / ".ray").exists()


@dataclasses.dataclass
class Cluster:
    address: str
    env: dict[str, str]
    temp_dirs: list[Path]
    groups: list[int]

    def start_node(self, head: bool) -> None:
        temp_dir = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths have a length limit
        self.temp_dirs.append(temp_dir)
        role = (["--head", "--port", self.address.rsplit(":", 1)[1], "--include-dashboard=false"] if head
                else ["--address", self.address])
        cmd = [RAY, "start", *role, "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory",
               str(100 * 1024**2), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
        process = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        self.groups.append(process.pid)
        output = process.communicate(timeout=180)[0]
        assert process.returncode == 0, output[-3000:]

    def stop(self) -> None:
        """Every process of the nodes: their sessions, and whatever names their temp folders."""
        for _ in range(3):  # a process may start another while we kill
            for process in psutil.process_iter():
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    ours = os.getpgid(process.pid) in self.groups
                    if ours or any(str(d) in " ".join(process.cmdline()) for d in self.temp_dirs):
                        process.send_signal(signal.SIGKILL)
            time.sleep(0.5)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)

    def drive(self, env: dict[str, str] | None = None) -> dict:
        done = subprocess.run([sys.executable, "-c", DRIVER, self.address], cwd=ROOT, env=env or self.env,
                              input="\n", capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[0])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two nodes of 1 CPU each: 2 CPUs in all, but no node with 2."""
    env = {**os.environ, "HOME": str(tmp_path_factory.mktemp("home")), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = Cluster(f"127.0.0.1:{free_port()}", env, [], [])
    try:
        cluster.start_node(head=True)
        cluster.start_node(head=False)
        yield cluster
    finally:
        cluster.stop()


def test_a_cluster_is_judged_node_by_node(cluster: Cluster) -> None:
    refused = cluster.drive()["refused"]
    assert re.match(r"no node of this cluster offers 2 CPUs; nodes offer: \S+: 1 CPU, 0 GPUs; \S+: 1 CPU, 0 GPUs; "
                    r"lower resources in the study file or add a node$", refused["2 CPUs"] or ""), refused
    assert refused["1 CPU"] is None


def test_joining_a_cluster_without_its_token_is_refused_in_one_line(cluster: Cluster) -> None:
    env = {name: value for name, value in cluster.env.items() if name != "RAY_AUTH_TOKEN"}
    error = cluster.drive(env)["error"]
    assert error.startswith(f"the Ray cluster at '{cluster.address}' refused this machine's token or found none")
