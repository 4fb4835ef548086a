"""Where the work runs: joining a Ray cluster (`connect`), and a local multi-node cluster for
tests and benchmarks (`LocalCluster`).

    connect("local")        start a Ray instance in this process's machine (all its cores)
    connect("HOST:PORT")    join a running cluster (`ray start --head --port PORT` on HOST)
    connect(None)           reuse this process's connection, else $RAY_ADDRESS, else "local"

`LocalCluster` starts a head node and extra worker nodes on 127.0.0.1 with `ray start`, each
node in a process group of its own, and stops exactly those processes (`ray stop` would end
every Ray process on the machine, other people's clusters included). Ray itself replaces
127.0.0.1 by the machine's own address for the nodes (`resolve_ip_for_localhost`); the
cluster still lives on this machine only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from defectlens.errors import ConfigError

logger = logging.getLogger(__name__)
LOCAL = "local"


def require_ray() -> Any:
    """The ray module, or ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray runner needs Ray: pip install 'defectlens[ray]'") from None
    return ray


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connected to Ray for the duration of the block (yields the ray module).

    Args:
        address: "local" (a new local instance), "HOST:PORT" of a cluster's head (GCS port),
            "auto" (the cluster this machine belongs to), or None (the existing connection of
            this process, else $RAY_ADDRESS, else "local").
        num_cpus: CPUs of a local instance (default: all cores); ignored when joining.

    A connection this call made is closed at the end; an existing one is left open.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    target = address or os.environ.get("RAY_ADDRESS") or LOCAL
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if target == LOCAL:
        options.update(num_cpus=num_cpus, include_dashboard=False)
    try:
        ray.init(address=target, **options)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ConfigError(f"cannot connect to Ray at {target!r}: {error}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalCluster:
    """A Ray cluster of ``nodes`` node processes on this machine (a head and ``nodes - 1``
    workers joined with ``ray start --address``), for tests and benchmarks.

    Args:
        nodes: node processes (>= 1); the multi-node path needs 2.
        cpus_per_node: CPUs each node offers (``--num-cpus``).
        object_store_megabytes: each node's object store (Ray's minimum is about 75 MB).
        temp_dir: Ray's session and log folder (default: a new temporary folder).

    ``with LocalCluster() as address: ...`` starts it and stops it afterwards.
    """

    def __init__(
        self, nodes: int = 2, cpus_per_node: int = 1, object_store_megabytes: int = 100, temp_dir: str | Path | None = None,
    ) -> None:
        if nodes < 1:
            raise ConfigError(f"a cluster needs at least one node, got {nodes}")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_megabytes = object_store_megabytes
        self.temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="defectlens-ray-"))
        # the head's GCS port and, per node, its agents' and metrics ports: all distinct
        self._ports = iter(_free_ports(1 + 5 * nodes))
        self.port = next(self._ports)
        self.address = f"127.0.0.1:{self.port}"
        self.sessions: list[int] = []
        self.environment: dict[str, str] = {}

    def _start_node(self, head: bool) -> None:
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.cpus_per_node), "--object-store-memory", str(self.object_store_megabytes * 2**20),
            "--disable-usage-stats", "--dashboard-agent-listen-port", str(next(self._ports)),
            "--dashboard-agent-grpc-port", str(next(self._ports)), "--metrics-export-port", str(next(self._ports)),
            "--runtime-env-agent-port", str(next(self._ports)),
        ]
        if head:
            command += [
                "--head", "--port", str(self.port), "--include-dashboard", "false", "--dashboard-port", str(next(self._ports)),
                "--temp-dir", str(self.temp_dir),
            ]
        else:
            command += ["--address", self.address]
        log = self.temp_dir / f"ray-start-{len(self.sessions)}.log"
        environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.environment}
        with open(log, "w", encoding="utf-8") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=environment)
        self.sessions.append(process.pid)  # its own session, which the node's processes keep
        if process.wait(timeout=180) != 0:
            raise RuntimeError(f"ray start failed (exit {process.returncode}):\n{log.read_text(encoding='utf-8')[-3000:]}")

    def start(self) -> str:
        """Start the nodes; returns the head's address HOST:PORT.

        The cluster uses Ray's token authentication with a token of its own (in ``temp_dir``);
        its variables (``environment``) are set in this process too, so that ``ray.init`` here
        and commands started from here can connect.
        """
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32), encoding="utf-8")
        token.chmod(0o600)
        self.environment = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        os.environ.update(self.environment)
        _refresh_ray_authentication()
        try:
            for index in range(self.nodes):
                self._start_node(head=index == 0)
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self, grace_seconds: float = 5.0) -> None:
        """End this cluster's processes: every process of the nodes' sessions (Ray's worker
        processes move to process groups of their own, not to other sessions), SIGTERM first,
        SIGKILL after ``grace_seconds``."""
        sessions = set(self.sessions)
        _signal_sessions(sessions, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while _session_members(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_sessions(sessions, signal.SIGKILL)
        self.sessions = []

    def node_processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every running process of this cluster."""
        return [(pid, _command(pid)) for pid in _session_members(set(self.sessions))]

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


def _refresh_ray_authentication() -> None:
    """Make an already imported Ray read the authentication variables again (Ray caches its
    configuration at import; this is the refresh Ray's own `_enable_token_auth` does)."""
    if "ray" not in sys.modules:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _session_members(sessions: set[int]) -> list[int]:
    """Running (non-zombie) processes whose session id is one of ``sessions``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sessions and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_sessions(sessions: set[int], signal_number: int) -> None:
    for pid in _session_members(sessions):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal_number)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
