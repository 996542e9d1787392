"""Memory bench: resident memory of the Temporal server and of each level's worker with N idle agents.

One run starts a headless dev server on free ports and the four level workers as separate processes
(``python -m worker --level LEVEL``, the entry point users run), each on a fresh task-queue prefix.
It creates one domain with enough supervisors for the largest step (a supervisor carries its whole
ledger across continue-as-new, so agents are spread over supervisors: about 1.4 KB of state per agent
there, and a payload is capped at 2 MB), then spawns agents up to each step, waits until the
processes go quiet, and reads ``VmRSS`` (and the peak, ``VmHWM``) of every process from ``/proc``.

The agents are idle: tiny resources, no image, no tasks, a heartbeat longer than the run, and the
supervisors' failure checks (a visibility scan of their agents every 10 s by default) switched off.
A BatchSpawn request carries no entity settings (its agents get the 30 s default heartbeat, which
at 10,000 agents is 333 wake-ups a second), so by default agents are spawned one request each, with
their settings; ``spawn="batch"`` batches anyway (and uses the settings if the request ever gains them).
A worker keeps at most ``max_cached_workflows`` workflows in its sticky cache (the SDK default, 1,000:
``worker/run.py`` does not set it), so an agent worker's memory grows with agents only up to the cache
size; past it the least recently used agents are evicted and replayed from history when they wake.
The server's cost per agent (mutable state, timers, visibility rows) has no such bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.worker import Worker

from tetrarch.bootstrap import HierarchySpec
from tetrarch.names import Level, TaskQueues
from tetrarch.operations import (
    BatchAgent,
    BatchSpawnRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    EntitySettings,
    SpawnAgentRequest,
)
from tetrarch.resources import Resources
from tetrarch_cli.bench import machine_info, now_utc
from tetrarch_cli.client import TetrarchClient
from tetrarch_cli.server import EmbeddedServer, ServerConfig, ensure_search_attributes, free_port, start_server
from worker.connect import connect

#: The processes measured, in table order: the server, then one worker per level.
SERVER = "server"
WORKERS: dict[str, Level] = {f"worker-{lv.value}": lv for lv in Level}
PROCESSES: tuple[str, ...] = (SERVER, *WORKERS)

#: What one idle agent holds: the least the pools account (1 millicore, 1 MiB).
AGENT_RESOURCES = Resources(cpu_millis=1, memory_mib=1)
DEFAULT_STEPS = [0, 1000, 10000]
#: Agents per BatchSpawn request (a request admits up to 1,000, but a supervisor registers a batch in one
#: workflow task whose cost grows with batch x agents it holds: 250 into a supervisor of 250 ran past the
#: 2 s deadlock limit).
DEFAULT_BATCH = 50
#: Agents per supervisor: its ledger (~1.4 KB per agent) is carried whole across continue-as-new.
DEFAULT_PER_SUPERVISOR = 500
#: Longer than any run, so no idle agent wakes while it is measured.
DEFAULT_HEARTBEAT_SECONDS = 3600.0
#: Single spawns in flight (when BatchSpawn cannot carry the agents' settings).
DEFAULT_CONCURRENCY = 32

SpawnMode = Literal["auto", "batch", "single"]
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


class MemoryStep(BaseModel):
    """The processes' memory with ``agents`` idle agents running."""

    target: int = Field(description="The agents this step asked for.")
    agents: int = Field(description="The agents spawned by the end of this step (short of target if it ran out "
                                    "of time).")
    agents_running: int = Field(description="Running agents as the orchestrator counts them when measured.")
    rss_bytes: dict[str, int] = Field(description="VmRSS of each process (with any children), by process name.")
    peak_rss_bytes: dict[str, int] = Field(description="VmHWM (peak resident) of each process so far.")
    db_bytes: int = Field(description="The server's SQLite files (database and write-ahead log) on disk.")
    spawn_seconds: float = Field(description="Spawning the agents added since the previous step.")
    settle_seconds: float = Field(description="Waiting for the agents to be counted and the processes to go quiet.")
    settled: bool = Field(description="False when the processes were still busy when the wait gave up.")
    cpu_cores_at_measure: float = Field(description="CPU of all processes together over the last quiet window.")
    cpu_seconds: dict[str, float] = Field(
        default_factory=dict, description="CPU time each process used since the previous step (spawn and settle).")


class Growth(BaseModel):
    """Resident memory added per agent between two consecutive steps."""

    from_agents: int
    to_agents: int
    bytes_per_agent: dict[str, float]


class MemoryReport(BaseModel):
    """A whole memory run: the steps, the growth between them, and what it ran with."""

    started_at: datetime
    machine: dict[str, Any]
    settings: dict[str, Any]
    steps: list[MemoryStep]
    growth_per_agent: list[Growth]


# -- /proc -----------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces, so split after it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in bytes."""
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """Peak resident memory (VmHWM) of ``pid`` and its descendants, in bytes."""
    return sum(_status_kib(p, "VmHWM") for p in process_tree(pid)) * 1024


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its descendants."""
    total = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if len(fields) > 12:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


# -- processes --------------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """One level's worker, as a child process."""

    name: str
    level: Level
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the worker shuts down cleanly), then SIGKILL if it will not go."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(level: Level, address: str, prefix: str, log: Path) -> WorkerProcess:
    """``python -m worker --level LEVEL`` against ``address`` with queue prefix ``prefix``."""
    env = dict(os.environ, TEMPORAL_ADDRESS=address, TETRARCH_QUEUE_PREFIX=prefix, PYTHONUNBUFFERED="1")
    env.pop("TEMPORAL_NAMESPACE", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--level", level.value], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(_PROJECT_ROOT), start_new_session=True)
    return WorkerProcess(f"worker-{level.value}", level, proc, log)


async def wait_polling(client: Client, queues: TaskQueues, workers: list[WorkerProcess],
                       give_up_after: float = 120.0) -> None:
    """Wait until every level's queue has a workflow poller and an activity poller."""
    deadline = time.monotonic() + give_up_after
    for w in workers:
        queue = queues.for_level(w.level)
        while True:
            if w.process.poll() is not None:
                tail = w.log.read_text(errors="replace")[-3000:] if w.log.exists() else ""
                raise RuntimeError(f"{w.name} exited with code {w.process.returncode}:\n{tail}")
            kinds = []
            for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
                resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
                    namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind))
                kinds.append(bool(resp.pollers))
            if all(kinds):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{w.name} did not poll {queue} within {give_up_after:.0f}s; see {w.log}")
            await asyncio.sleep(0.5)


def cache_setting() -> int | str:
    """The workers' sticky workflow cache size: the SDK default unless ``worker/run.py`` sets one."""
    from worker import run

    if "max_cached_workflows" in inspect.getsource(run):
        return "set in worker/run.py"
    default = inspect.signature(Worker.__init__).parameters["max_cached_workflows"].default
    return int(default)


def batch_carries_settings() -> bool:
    """Whether a BatchSpawn request can give its agents entity settings (a heartbeat)."""
    return "settings" in BatchSpawnRequest.model_fields


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """How one run spawns and measures."""

    domain: str
    per_supervisor: int
    supervisors: int
    batch: int
    mode: Literal["batch", "single"]
    concurrency: int
    agent_settings: EntitySettings
    supervisor_settings: EntitySettings
    settle_timeout: float
    step_timeout: float | None
    progress: Callable[[str], None] | None

    def supervisor_of(self, i: int) -> str:
        return f"s{i // self.per_supervisor}"

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def settings(self, prefix: str) -> dict[str, Any]:
        """What the report records of how it ran."""
        applied = self.mode == "single" or batch_carries_settings()
        return {
            "spawn_mode": self.mode,
            "batch_size": self.batch if self.mode == "batch" else None,
            "concurrency": self.concurrency,
            "agents_per_supervisor": self.per_supervisor,
            "supervisors": self.supervisors,
            "agent_resources": AGENT_RESOURCES.model_dump(),
            "agent_heartbeat_seconds": self.agent_settings.heartbeat_seconds if applied
            else EntitySettings().heartbeat_seconds,
            "agent_settings_applied": applied,
            "supervisor_failure_check_seconds": self.supervisor_settings.failure_check_seconds,
            "supervisor_silence_seconds": self.supervisor_settings.silence_seconds,
            "max_cached_workflows": cache_setting(),
            "workflow_runner": "sandboxed (worker/run.py)",
            "step_timeout_seconds": self.step_timeout,
            "queue_prefix": prefix,
        }


async def _spawn(tc: TetrarchClient, plan: _Plan, start: int, stop: int, deadline: float) -> int:
    """Spawn agents ``a<start>`` .. ``a<stop - 1>``, each under its supervisor, until done or ``deadline``
    (``time.monotonic()``); returns how many were spawned."""
    spawned = 0
    t0 = time.monotonic()
    last_note = t0

    def note() -> None:
        nonlocal last_note
        now = time.monotonic()
        if now - last_note >= 30:
            last_note = now
            plan.say(f"{start + spawned:,} agents spawned ({spawned / (now - t0):.1f}/s over this step)")

    if plan.mode == "batch":
        # Each supervisor takes its batches one after another; different supervisors' run side by side.
        lanes: dict[str, list[list[int]]] = {}
        i = start
        while i < stop:
            end = min(stop, i + plan.batch, (i // plan.per_supervisor + 1) * plan.per_supervisor)
            lanes.setdefault(plan.supervisor_of(i), []).append(list(range(i, end)))
            i = end
        sem = asyncio.Semaphore(max(1, plan.concurrency // 4))

        async def lane(sup: str, batches: list[list[int]]) -> None:
            nonlocal spawned
            async with sem:
                for idx in batches:
                    if time.monotonic() > deadline:
                        return
                    body: dict[str, Any] = {
                        "domain": plan.domain, "supervisor": sup,
                        "agents": [BatchAgent(name=f"a{j}", resources=AGENT_RESOURCES) for j in idx]}
                    if batch_carries_settings():
                        body["settings"] = plan.agent_settings
                    done = await tc.batch_spawn(BatchSpawnRequest.model_validate(body))
                    if done.spawned != len(idx):
                        raise RuntimeError(f"batch spawn under {sup} spawned {done.spawned} of {len(idx)}")
                    spawned += done.spawned
                    note()

        await asyncio.gather(*(lane(s, b) for s, b in lanes.items()))
        return spawned
    todo = iter(range(start, stop))

    async def one_by_one() -> None:
        nonlocal spawned
        for j in todo:
            await tc.spawn_agent(SpawnAgentRequest(domain=plan.domain, supervisor=plan.supervisor_of(j), name=f"a{j}",
                                                   resources=AGENT_RESOURCES, settings=plan.agent_settings))
            spawned += 1
            note()
            if time.monotonic() > deadline:
                return

    await asyncio.gather(*(one_by_one() for _ in range(plan.concurrency)))
    return spawned


async def _settle(tc: TetrarchClient, pids: dict[str, int], agents: int, give_up_after: float,
                  min_wait: float = 3.0, window: float = 2.0, quiet_cores: float = 0.1) -> tuple[bool, float, int]:
    """Wait until the orchestrator counts ``agents`` running and all processes together use less than
    ``quiet_cores`` of CPU over ``window`` seconds. Returns (settled, last window's cores, agents counted)."""
    deadline = time.monotonic() + give_up_after
    await asyncio.sleep(min_wait)
    counted = -1
    cores = math.inf
    while True:
        status = await tc.system_status()
        counted = status.agents_by_status.get("running", 0)
        before = sum(cpu_seconds(p) for p in pids.values())
        t = time.monotonic()
        await asyncio.sleep(window)
        cores = (sum(cpu_seconds(p) for p in pids.values()) - before) / (time.monotonic() - t)
        if counted >= agents and cores < quiet_cores:
            return True, cores, counted
        if time.monotonic() > deadline:
            return False, cores, counted


def _db_bytes(config: ServerConfig) -> int:
    files = [config.db_file, config.db_file.with_name(config.db_file.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists())


def growth(steps: list[MemoryStep]) -> list[Growth]:
    """Bytes per agent added between consecutive steps, per process and in total."""
    out = []
    for a, b in itertools.pairwise(steps):
        n = b.agents - a.agents
        if n <= 0:
            continue
        per = {name: (b.rss_bytes[name] - a.rss_bytes[name]) / n for name in a.rss_bytes}
        per["total"] = sum(per.values())
        out.append(Growth(from_agents=a.agents, to_agents=b.agents, bytes_per_agent=per))
    return out


async def _build(tc: TetrarchClient, plan: _Plan) -> None:
    """The orchestrator, one domain, and supervisors with room for the largest step."""
    await tc.apply(HierarchySpec())
    sup = Resources(cpu_millis=AGENT_RESOURCES.cpu_millis * plan.per_supervisor,
                    memory_mib=AGENT_RESOURCES.memory_mib * plan.per_supervisor)
    await tc.create_domain(CreateDomainRequest(domain=plan.domain, resources=Resources(
        cpu_millis=sup.cpu_millis * plan.supervisors, memory_mib=sup.memory_mib * plan.supervisors)))
    await asyncio.gather(*(tc.create_supervisor(CreateSupervisorRequest(
        domain=plan.domain, name=f"s{k}", resources=sup, settings=plan.supervisor_settings))
        for k in range(plan.supervisors)))


async def _steps(tc: TetrarchClient, plan: _Plan, wanted: list[int], config: ServerConfig,
                 pids: dict[str, int], workers: list[WorkerProcess]) -> list[MemoryStep]:
    """Spawn up to each step, wait for quiet, and read every process's memory."""
    measured: list[MemoryStep] = []
    have = 0
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for target in wanted:
        t = time.perf_counter()
        deadline = time.monotonic() + (plan.step_timeout if plan.step_timeout is not None else math.inf)
        plan.say(f"step {target:,}: spawning {target - have:,} agents")
        have += await _spawn(tc, plan, have, target, deadline)
        spawn_s = time.perf_counter() - t
        plan.say(f"step {target:,}: {have:,} agents spawned in {spawn_s:.1f}s; waiting for quiet")
        t = time.perf_counter()
        settled, cores, counted = await _settle(tc, pids, have, plan.settle_timeout)
        settle_s = time.perf_counter() - t
        for w in workers:
            if w.process.poll() is not None:
                raise RuntimeError(f"{w.name} exited with code {w.process.returncode}; see {w.log}")
        cpu_now = {name: cpu_seconds(pid) for name, pid in pids.items()}
        measured.append(MemoryStep(
            target=target, agents=have, agents_running=counted,
            rss_bytes={name: rss_bytes(pid) for name, pid in pids.items()},
            peak_rss_bytes={name: peak_rss_bytes(pid) for name, pid in pids.items()},
            db_bytes=_db_bytes(config), spawn_seconds=round(spawn_s, 3), settle_seconds=round(settle_s, 3),
            settled=settled, cpu_cores_at_measure=round(cores, 3),
            cpu_seconds={n: round(cpu_now[n] - cpu_before[n], 2) for n in pids}))
        cpu_before = cpu_now
        plan.say(f"step {target:,}: measured, {sum(measured[-1].rss_bytes.values()) / 2**20:,.0f} MiB resident "
                 f"in all (settled: {settled})")
        if have < target:
            plan.say(f"step {target:,} ran out of time at {have:,} agents; the run stops here")
            break
    return measured


async def measure_memory(steps: list[int], state_root: Path, batch: int = DEFAULT_BATCH,
                         per_supervisor: int = DEFAULT_PER_SUPERVISOR,
                         heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS, spawn: SpawnMode = "auto",
                         concurrency: int = DEFAULT_CONCURRENCY, settle_timeout: float = 120.0,
                         step_timeout: float | None = None,
                         progress: Callable[[str], None] | None = None) -> MemoryReport:
    """Measure the server's and each level worker's resident memory at each step's number of idle agents.

    ``spawn``: ``batch`` uses BatchSpawn requests of ``batch`` agents; ``single`` one SpawnAgent request per
    agent, ``concurrency`` in flight; ``auto`` batches when a BatchSpawn request can carry the agents'
    settings (the long heartbeat) and spawns singly otherwise, so the agents really stay idle.
    A step whose spawning takes longer than ``step_timeout`` seconds stops spawning there, is measured with
    the agents it has, and ends the run. ``progress`` hears what is going on (a line at a time).
    Everything started here (server, workers) is stopped before returning, also on failure.
    """
    wanted = sorted(set(steps))
    if not wanted or wanted[0] < 0:
        raise ValueError("steps must be agent counts >= 0")
    if not 1 <= batch <= 1000:
        raise ValueError("batch must be between 1 and 1000 (a BatchSpawn request's limit)")
    if per_supervisor < 1 or concurrency < 1:
        raise ValueError("per_supervisor and concurrency must be at least 1")
    mode: Literal["batch", "single"] = ("batch" if batch_carries_settings() else "single") if spawn == "auto" \
        else spawn
    started = now_utc()
    prefix = f"mem{uuid.uuid4().hex[:6]}-"
    supervisors = max(1, math.ceil(wanted[-1] / per_supervisor))
    plan = _Plan(domain="mem", per_supervisor=per_supervisor, supervisors=supervisors, batch=batch,
                 mode=mode, concurrency=concurrency,
                 agent_settings=EntitySettings(heartbeat_seconds=heartbeat_seconds),
                 supervisor_settings=EntitySettings(failure_check_seconds=0, silence_seconds=0),
                 settle_timeout=settle_timeout, step_timeout=step_timeout, progress=progress)
    settings = plan.settings(prefix)
    config = ServerConfig(state_dir=state_root / "server", port=free_port(), headless=True)
    settings["dynamic_config"] = config.dynamic_config
    server: EmbeddedServer | None = None
    workers: list[WorkerProcess] = []
    try:
        server = await start_server(config)
        workers = [start_worker(lv, config.address, prefix, state_root / f"{name}.log")
                   for name, lv in WORKERS.items()]
        client = await connect(config.address, config.namespace)
        await ensure_search_attributes(client, config.namespace)
        tc = TetrarchClient(client, prefix)
        await wait_polling(client, tc.queues, workers)
        plan.say(f"server and four workers up on {config.address}; creating {plan.supervisors} supervisors")
        await _build(tc, plan)
        pids = {SERVER: server.process.pid, **{w.name: w.process.pid for w in workers}}
        measured = await _steps(tc, plan, wanted, config, pids, workers)
    finally:
        for w in workers:  # before the server: a worker cannot shut down against a server that is gone
            w.stop()
        if server is not None:
            server.stop()
    return MemoryReport(started_at=started, machine=machine_info(), settings=settings, steps=measured,
                        growth_per_agent=growth(measured))


# -- output -----------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def render_memory(report: MemoryReport) -> str:
    """The tables people read: RSS per process per step, then growth per agent."""
    from tetrarch_cli.render import table

    names = list(PROCESSES)
    s = report.settings
    head = (f"tetrarch memory bench, {report.started_at.isoformat(timespec='seconds')}, "
            f"{report.machine['cpus']} CPUs, temporalio {report.machine['temporalio']}, "
            f"{report.machine['temporal_cli']}\n"
            f"agents: {s['spawn_mode']} spawn"
            + (f" ({s['batch_size']} per request)" if s.get("batch_size") else f" ({s['concurrency']} in flight)")
            + f", {s['agents_per_supervisor']} per supervisor, resources {s['agent_resources']}, "
            f"heartbeat {s['agent_heartbeat_seconds']:g} s"
            + ("" if s["agent_settings_applied"] else " (the SDK default: BatchSpawn carries no settings)")
            + f"; supervisor failure checks every {s['supervisor_failure_check_seconds']:g} s (0: off); "
            f"worker workflow cache {s['max_cached_workflows']}")
    rows = []
    for st in report.steps:
        agents = f"{st.agents:,}" + ("" if st.agents >= st.target else f" (of {st.target:,})")
        rows.append([agents, f"{st.agents_running:,}", *(_mib(st.rss_bytes[n]) for n in names),
                     _mib(sum(st.rss_bytes.values())), _mib(st.db_bytes), f"{st.spawn_seconds:.1f}",
                     f"{st.settle_seconds:.1f}" + ("" if st.settled else " (busy)"), f"{st.cpu_cores_at_measure:.2f}"])
    rss = table(["agents", "running", *(f"{n} MiB" for n in names), "total MiB", "db MiB", "spawn s", "settle s",
                 "cpu cores"], rows)
    grow_rows = [[f"{g.from_agents:,} -> {g.to_agents:,}", *(f"{g.bytes_per_agent[n]:,.0f}" for n in names),
                  f"{g.bytes_per_agent['total']:,.0f}"] for g in report.growth_per_agent]
    grow = table(["agents", *(f"{n} B/agent" for n in names), "total B/agent"], grow_rows) if grow_rows else ""
    cpu_rows = [[f"{st.agents:,}", *(f"{st.cpu_seconds.get(n, 0):.1f}" for n in names),
                 f"{sum(st.cpu_seconds.values()):.1f}"] for st in report.steps]
    cpu = "CPU seconds used while spawning and settling each step:\n" + table(
        ["agents", *names, "total"], cpu_rows)
    peaks = "peak RSS (VmHWM) at the end: " + ", ".join(
        f"{n} {_mib(report.steps[-1].peak_rss_bytes[n])} MiB" for n in names) if report.steps else ""
    return "\n\n".join(p for p in (head, rss, grow, cpu, peaks) if p)


def write_memory_report(report: MemoryReport, out_dir: Path) -> Path:
    """One JSON file per run: ``memory-<UTC start time>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory-{report.started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return path
