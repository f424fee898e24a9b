"""Ray for a study: a private local Ray, or a connection to a cluster; and whether any node can run a trial.

A local Ray (no address) opens no door to the network or to other users of the box:
- every server of the session (GCS, the raylet's node manager and object manager, the driver's and each worker's
  gRPC server, the runtime env agent) listens on 127.0.0.1 only. Ray 2.60 binds them to every interface unless the
  node's address is loopback, and turns `_node_ip_address="127.0.0.1"` into the box's address unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the local-only mode Ray uses on macOS and Windows). No port of a dashboard,
  dashboard agent, metrics exporter or Ray Client server is opened; nothing else listens (measured);
- the session's Unix sockets, logs and spilled objects live in a folder of mode 0700 per session, removed at the end
  (Ray makes its own temp folder 0777: the private folder around it bars the way);
- token auth is on, with a fresh token in a 0600 file of that folder (RAY_AUTH_TOKEN_PATH): no ~/.ray/auth_token.

On a cluster these ports of a node must be reachable from every other node and from the driver (Ray 2.60's
`ray start --help` and "Ports configurations" in Ray's docs); set the random ones with these flags to open them
in a firewall:
- head node: the GCS, `--port` (6379). The dashboard `--dashboard-port` (8265) and the Ray Client server
  `--ray-client-server-port` (10001, only with ray[client] installed) are not used by a study:
  `--include-dashboard=false`;
- every node: the raylet's `--node-manager-port` and `--object-manager-port` (random), and one port per worker
  process in `--min-worker-port`..`--max-worker-port` (10002-19999) or `--worker-port-list`; with the dashboard
  or metrics on, also `--dashboard-agent-grpc-port`, `--dashboard-agent-listen-port` and `--metrics-export-port`.
  The runtime env agent (`--runtime-env-agent-port`) listens on the node's own address for its raylet.
The study's driver runs on a node of the cluster (ray.init joins the local raylet) and listens there like a worker.
None of these can be loopback on a cluster: Ray 2.60 binds them to every interface of a node whose address is not
loopback. Token auth covers them: with RAY_AUTH_MODE=token and the same token on every node and the driver
(RAY_AUTH_TOKEN, or a file named by RAY_AUTH_TOKEN_PATH), each of these gRPC servers answers UNAUTHENTICATED and
the runtime env agent 401 to a caller without the token (measured on a local session). Token auth does not
encrypt: keep the nodes on a private network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from cifar3study.errors import StageError, one_line, quote

log = logging.getLogger("study")
LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 128 * 1024**2  # trials pass small records; Ray's default would take a third of the memory
# Ray's longest socket path below its temp folder; a Unix socket path holds at most 107 bytes.
SOCKET_TAIL = len("/r/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
SOCKET_PATH_MAX = 107
SHOWN_NODES = 4  # nodes named in a refusal
PROBE_SECONDS = 10  # to reach the head node's GCS port
REMOVE_TRIES = 5  # Ray's last processes may still write a log line while the folder goes
IMPORTED_EARLY = ("Ray was imported before ray_session set RAY_AUTH_MODE=token and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, "
                  "which Ray reads on import; import Ray only inside the session, or export both first")
Offer = tuple[str, float, float]  # a node's address, CPUs and GPUs


@contextlib.contextmanager
def _environ(changes: Mapping[str, str | None]) -> Iterator[None]:
    """os.environ with `changes` (None: unset), restored at exit; Ray's processes inherit it when they start."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _remove(folder: Path) -> None:
    for _ in range(REMOVE_TRIES):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.2)
    log.warning("could not remove Ray's folder %s", folder)


@contextlib.contextmanager
def _private_folder() -> Iterator[Path]:
    """A fresh folder of mode 0700, short enough for Ray's socket paths, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="ray"))
    try:
        if len(os.fsencode(folder)) + SOCKET_TAIL > SOCKET_PATH_MAX:
            raise StageError(f"the temp folder {quote(str(folder.parent))} is too long for Ray's socket paths "
                             f"({SOCKET_PATH_MAX} bytes at most); set TMPDIR to a short folder such as /tmp")
        yield folder
    finally:
        _remove(folder)


def _write_token(path: Path) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))


def _forget_cached_token() -> None:
    """Ray's C++ side reads the token once per process: a second session would send the first one's."""
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


def _read_on_import_before() -> bool:
    """Whether Ray was imported before our settings: it reads these two once, on import, and ignores ours."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return ray_constants.ENABLE_RAY_CLUSTER or get_authentication_mode() != AuthenticationMode.TOKEN


def _start_local(folder: Path, num_gpus: float | None, runtime_env: dict) -> None:
    import ray

    if _read_on_import_before():
        raise RuntimeError(IMPORTED_EARLY)
    _forget_cached_token()
    ray.init(address="local", num_gpus=num_gpus, include_dashboard=False, _node_ip_address=LOOPBACK,
             _temp_dir=str(folder / "r"), object_store_memory=OBJECT_STORE_BYTES, runtime_env=runtime_env,
             log_to_driver=False, logging_level=logging.WARNING)


def _probe(address: str) -> None:
    """Refuse an address where nothing answers: ray.init would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise StageError(f"the Ray address {quote(address)} is not host:port; give the head node's GCS address, "
                         "e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as err:
        raise StageError(f"nothing answers at the Ray address {quote(address)} ({one_line(err, 120)}); start the "
                         "cluster's head node or fix the address") from None


def _connect(address: str, runtime_env: dict) -> None:
    if address != "auto":  # Ray's word for the cluster whose node runs on this machine
        _probe(address)
    import ray

    _forget_cached_token()
    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
    except ray.exceptions.AuthenticationError:
        raise StageError(f"the Ray cluster at {quote(address)} refused this machine's token or found none; set "
                         "the cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None
    except (ConnectionError, RuntimeError) as err:  # a wrong token also ends here, as a connection failure
        reason = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 160)
        raise StageError(f"cannot join the Ray cluster at {quote(address)}: {reason}; check the cluster's token "
                         "(RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and that a node of it runs on this machine") from None


def _local_environ(folder: Path) -> dict[str, str | None]:
    """Token auth with a fresh token of our own, usage stats off, every Ray server on loopback."""
    _write_token(folder / "token")
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": None,
            "RAY_AUTH_TOKEN_PATH": str(folder / "token"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _cluster_environ() -> dict[str, str | None]:
    """Token auth and usage stats off unless set; the token is the cluster's (RAY_AUTH_TOKEN, its file, ~/.ray)."""
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
            "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}


def _shutdown() -> None:
    ray = sys.modules.get("ray")  # not imported: nothing to shut down
    if ray is not None:
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None, num_gpus: float | None, runtime_env: dict) -> Iterator[None]:
    """Ray started (a private local one when `address` is None) or joined; shut down and cleaned up at exit.

    Enter it before anything in the process imports Ray: Ray reads the loopback-only setting on import.
    """
    with contextlib.ExitStack() as stack:
        try:
            if address:
                stack.enter_context(_environ(_cluster_environ()))
                _connect(address, runtime_env)
            else:
                folder = stack.enter_context(_private_folder())
                stack.enter_context(_environ(_local_environ(folder)))
                _start_local(folder, num_gpus, runtime_env)
            yield
        finally:
            _shutdown()  # before the folder goes


def _amount(count: float, unit: str) -> str:
    return f"{count:g} {unit}" + ("" if count == 1 else "s")


def node_offers() -> list[Offer]:
    """(address, CPUs, GPUs) of each alive node of the joined cluster: what a trial on that node could get."""
    import ray

    return [(node["NodeManagerAddress"], node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
            for node in ray.nodes() if node["Alive"]]


def refusal(offers: list[Offer], cpus: float, gpus: float) -> str | None:
    """Why none of `offers` can run a trial needing `cpus` and `gpus` on one node; None if one can."""
    if any(cpu >= cpus and gpu >= gpus for _, cpu, gpu in offers):
        return None
    if not offers:
        return "no node of this cluster is alive; start a Ray node"
    wanted = [_amount(cpus, "CPU")] if all(cpu < cpus for _, cpu, _ in offers) else []
    wanted += [_amount(gpus, "GPU")] if all(gpu < gpus for _, _, gpu in offers) else []
    wanted = wanted or [_amount(cpus, "CPU"), _amount(gpus, "GPU")]  # each fits on a node, not both on one
    shown = "; ".join(f"{host}: {_amount(cpu, 'CPU')}, {_amount(gpu, 'GPU')}" for host, cpu, gpu in
                      offers[:SHOWN_NODES])
    more = f"; and {len(offers) - SHOWN_NODES} more" if len(offers) > SHOWN_NODES else ""
    return one_line(f"no node of this cluster offers {' and '.join(wanted)}; nodes offer: {shown}{more}; "
                    "lower resources in the study file or add a node")


def unschedulable_reason(cpus: float, gpus: float) -> str | None:
    """Why no alive node of the joined cluster can run a trial needing `cpus` and `gpus`; None if one can."""
    return refusal(node_offers(), cpus, gpus)


def check_resources(cpus: float, gpus: float) -> None:
    """Refuse, in one line, a trial that no alive node of the joined cluster could ever run."""
    reason = unschedulable_reason(cpus, gpus)
    if reason is not None:
        raise StageError(reason)
