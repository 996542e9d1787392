"""The bench command: the seed's figures measured beside the bare Temporal server's own, in one run.

Absolute times on a shared 2-core machine drift from run to run, so every figure of ours is also
given as a ratio to the server's ceiling measured in the same run (a no-op workflow, one Update, one
Query on an entity that does nothing). Policy checks are measured in process (uncached and cached)
and through a worker (a Query answered by an entity's policy and its decision cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from temporalio.client import Client
from temporalio.worker import Worker

from tetrarch.decisions import ChainLink, DecisionCache, PolicyChain, PolicyCheck, evaluate
from tetrarch.models import LevelRef
from tetrarch.operations import (
    BatchAgent,
    BatchSpawnRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
)
from tetrarch.policy import OperationType, template
from tetrarch.resource_ops import AllocateRequest
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient
from tetrarch_cli.server import SQLITE_PRAGMAS, TUNED_DYNAMIC_CONFIG, temporal_binary
from worker.run import workflow_runner
from workflows.bench import NoopEntityWorkflow, NoopWorkflow, OneActivityWorkflow, noop_activity
from workflows.levels import ManagementEntity


class Row(BaseModel):
    """One measured figure."""

    name: str
    samples: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    per_second: float | None = None
    seed_3_level: str = ""
    seed_4_level: str = ""
    seed_optimized: str = ""
    ratio: str = Field(default="", description="Against the ceiling measured in the same run.")


class BenchReport(BaseModel):
    """A whole run: the rows, and what they ran on."""

    started_at: datetime
    mode: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _p50(samples_s: list[float]) -> float:
    return statistics.median(samples_s) * 1000


def latency_row(name: str, samples_s: list[float], **seed: str) -> Row:
    """p50/p95/p99 of latencies given in seconds, in ms."""
    ms = [s * 1000 for s in samples_s]
    return Row(name=name, samples=len(ms), p50_ms=round(_pct(ms, 0.5), 3), p95_ms=round(_pct(ms, 0.95), 3),
               p99_ms=round(_pct(ms, 0.99), 3), **seed)


async def _latencies(n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t)
    return out


async def _rate(total: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Completed calls per second with ``concurrency`` in flight."""
    it = iter(range(total))

    async def lane() -> None:
        for i in it:
            await call(i)

    t = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return total / (time.perf_counter() - t)


def _in_process_rows(n: int) -> list[Row]:
    """Policy decisions in process: uncached (every rule judged) and cached."""
    chain = [
        ChainLink(level="orchestrator", entity="orchestrator", policy=template("standard", "orchestrator"),
                  capacity=Resources.of(cpu=1000, memory="1Ti"), agents=500),
        ChainLink(level="manager", entity="manager/b", policy=template("standard", "manager"),
                  capacity=Resources.of(cpu=100, memory="100Gi"), agents=50),
        ChainLink(level="supervisor", entity="supervisor/b/s", policy=template("standard", "supervisor").model_copy(
            update={"max_agents": 100}), capacity=Resources.of(cpu=10, memory="10Gi"), agents=5),
    ]
    check = PolicyCheck(operation=OperationType.SPAWN, domain="b", supervisor="s",
                        resources=Resources.of(cpu=0.25, memory="256Mi"))
    rows = []
    per_call: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        evaluate(check, chain)
        per_call.append(time.perf_counter() - t)
    uncached_rate = n / (time.perf_counter() - t0)
    row = latency_row("policy check, uncached, in process", per_call, seed_3_level="5 ms",
                      seed_4_level="8 ms")
    row.per_second = round(uncached_rate)
    rows.append(row)
    cache = DecisionCache(time.monotonic, ttl_seconds=3600)
    pc = PolicyChain(chain)
    cache.evaluate(check, pc)
    loops = n * 20
    t0 = time.perf_counter()
    for _ in range(loops):
        cache.evaluate(check, pc)
    cached_rate = loops / (time.perf_counter() - t0)
    per_call = []
    for _ in range(min(n, 20_000)):
        t = time.perf_counter()
        cache.evaluate(check, pc)
        per_call.append(time.perf_counter() - t)
    row = latency_row("policy check, cached, in process", per_call, seed_3_level="10,000/s",
                      seed_4_level="8,000/s", seed_optimized="12,000/s, 3 ms")
    row.per_second = round(cached_rate)
    row.ratio = f"{cached_rate / 1_000_000:.2f}x the 1,000,000/s goal"
    rows.append(row)
    return rows


class Ceiling(BaseModel):
    """The bare server's figures of this run, which every other row is measured against."""

    noop_s: list[float]
    update_s: list[float]
    query_s: list[float]
    noop_rates: dict[int, float] = Field(description="No-op workflows completed per second, by how many in flight.")
    start_rate: float = Field(description="No-op workflows started per second (results not awaited).")

    @property
    def noop_p50(self) -> float:
        return _p50(self.noop_s)

    @property
    def update_p50(self) -> float:
        return _p50(self.update_s)


class Plan(BaseModel):
    """Sample counts of a mode."""

    n: int
    total: int
    conc: int
    concurrencies: tuple[int, ...]
    spawn_n: int
    spawn_load: int
    batch: int


def plan(short: bool) -> Plan:
    """How many samples each mode takes (short: under a minute here)."""
    if short:
        return Plan(n=40, total=150, conc=20, concurrencies=(1, 5, 20, 50), spawn_n=15, spawn_load=60, batch=50)
    return Plan(n=200, total=1000, conc=50, concurrencies=(1, 5, 20, 50, 100), spawn_n=60, spawn_load=300,
                batch=200)


async def ceiling_rows(client: Client, queue: str, p: Plan) -> tuple[list[Row], Ceiling]:
    """The bare server: a no-op workflow (latency, and completions per second at several concurrencies),
    no-op starts per second, one activity, one Update, one Query and one signal."""
    rows: list[Row] = []
    async with Worker(client, task_queue=queue, workflows=[NoopWorkflow, NoopEntityWorkflow, OneActivityWorkflow],
                      activities=[noop_activity], workflow_runner=workflow_runner()):
        run_id = uuid.uuid4().hex[:8]
        seq = iter(range(10**9))

        async def noop(_: int) -> object:
            return await client.execute_workflow(NoopWorkflow.run, id=f"bench/noop/{run_id}/{next(seq)}",
                                                 task_queue=queue)

        async def noop_start(_: int) -> object:
            return await client.start_workflow(NoopWorkflow.run, id=f"bench/noop/{run_id}/{next(seq)}",
                                               task_queue=queue)

        await _latencies(5, noop)  # warm-up
        noop_lat = await _latencies(p.n, noop)
        noop_row = latency_row("ceiling: no-op workflow, start to result", noop_lat)
        rates = {c: await _rate(p.total if c > 1 else p.n, c, noop) for c in p.concurrencies}
        noop_row.per_second = round(rates[p.conc])
        noop_row.ratio = "completed per s with " + ", ".join(f"{c} in flight: {r:.0f}" for c, r in rates.items())
        rows.append(noop_row)
        start_rate = await _rate(p.total, p.conc, noop_start)
        rows.append(Row(name=f"ceiling: no-op workflow starts per second ({p.conc} in flight, not awaited)",
                        samples=p.total, per_second=round(start_rate)))
        act_lat = await _latencies(p.n, lambda i: client.execute_workflow(
            OneActivityWorkflow.run, False, id=f"bench/act/{run_id}/{i}", task_queue=queue))
        row = latency_row("ceiling: workflow running one activity, start to result", act_lat)
        row.ratio = f"one activity round trip adds {_p50(act_lat) - _p50(noop_lat):.1f} ms at p50"
        rows.append(row)
        entity = await client.start_workflow(NoopEntityWorkflow.run, id=f"bench/entity/{run_id}", task_queue=queue)
        update_lat = await _latencies(p.n, lambda i: entity.execute_update(NoopEntityWorkflow.touch))
        rows.append(latency_row("ceiling: one Update on an entity", update_lat))
        query_lat = await _latencies(p.n, lambda i: entity.query(NoopEntityWorkflow.count))
        rows.append(latency_row("ceiling: one Query on an entity", query_lat))
        rows.append(latency_row("ceiling: one signal to an entity (until accepted)",
                                await _latencies(p.n, lambda i: entity.signal(NoopEntityWorkflow.ping))))
        await entity.signal(NoopEntityWorkflow.stop)
    return rows, Ceiling(noop_s=noop_lat, update_s=update_lat, query_s=query_lat, noop_rates=rates,
                         start_rate=start_rate)


async def run_bench(client: Client, prefix: str, short: bool) -> list[Row]:
    """Measure everything against ``client``'s server, with workers already running on ``prefix``."""
    p = plan(short)
    rows, ceiling = await ceiling_rows(client, f"{prefix}bench", p)
    rows += _in_process_rows(20_000 if short else 100_000)
    tc = TetrarchClient(client, prefix)
    domain = f"bench-{uuid.uuid4().hex[:6]}"
    await tc.create_domain(CreateDomainRequest(domain=domain, resources=Resources.of(cpu=100, memory="100Gi")))
    await tc.create_supervisor(CreateSupervisorRequest(domain=domain, name="s", resources=Resources.of(
        cpu=50, memory="50Gi")))
    for target in ({"domain": domain}, {"domain": domain, "supervisor": "s"}):
        await tc.set_policy(SetPolicyRequest(template="standard", **target))
    try:
        rows += await _policy_and_status_rows(tc, domain, p, ceiling)
        rows += await _spawn_rows(tc, domain, p, ceiling)
        rows.append(await _batch_row(tc, domain, p.batch, ceiling.start_rate))
        rows.append(await _mixed_row(tc, domain, p, ceiling))
    finally:
        await tc.remove_domain(RemoveDomainRequest(domain=domain, drain=True))
    rows += await _allocation_rows(tc, p.n, p.total, p.conc, ceiling.noop_s, ceiling.update_s)
    return rows


async def _policy_and_status_rows(tc: TetrarchClient, domain: str, p: Plan, ceiling: Ceiling) -> list[Row]:
    """Policy checks through a worker (cached and not) and the status fast path."""
    sup = tc.client.get_workflow_handle(LevelRef.supervisor(domain, "s").entity_id)
    check = PolicyCheck(operation=OperationType.SPAWN, domain=domain, supervisor="s",
                        resources=Resources.of(cpu=0.5, memory="512Mi"))
    row = latency_row("policy check, cached, through a worker",
                      await _latencies(p.n, lambda i: sup.query(ManagementEntity.judge, check)),
                      seed_3_level="5 ms", seed_4_level="8 ms", seed_optimized="3 ms (cached)")
    row.per_second = round(await _rate(p.total, p.conc, lambda i: sup.query(ManagementEntity.judge, check)))
    row.ratio = f"{(row.p50_ms or 0) / ceiling.update_p50:.2f}x one Update's p50 (goal <= 1.2x)"
    rows = [row]
    varied = [check.model_copy(update={"resources": Resources(cpu_millis=100 + i, memory_mib=256)})
              for i in range(p.n)]
    rows.append(latency_row("policy check, uncached, through a worker",
                            await _latencies(p.n, lambda i: sup.query(ManagementEntity.judge, varied[i]))))
    row = latency_row("get status (fast path: a Query)",
                      await _latencies(p.n, lambda i: tc.supervisor_status(domain, "s")),
                      seed_3_level="10 ms", seed_4_level="15 ms", seed_optimized="8 ms (fast path)")
    row.ratio = f"{(row.p50_ms or 0) / _p50(ceiling.query_s):.2f}x one Query's p50"
    rows.append(row)
    return rows


async def _spawn_rows(tc: TetrarchClient, domain: str, p: Plan, ceiling: Ceiling) -> list[Row]:
    """Spawn one at a time (latency), and many at once (spawns per second under load)."""
    seq = iter(range(10**9))

    def spawn(_: int) -> Awaitable[object]:
        return tc.spawn_agent(SpawnAgentRequest(domain=domain, supervisor="s", name=f"a{next(seq)}",
                                                resources=Resources.of(cpu=0.25, memory="256Mi")))

    await spawn(0)  # warm-up
    row = latency_row("spawn agent (one at a time)", await _latencies(p.spawn_n, spawn),
                      seed_3_level="50 ms", seed_4_level="70 ms", seed_optimized="55 ms (with caching)")
    row.ratio = f"{(row.p50_ms or 0) / ceiling.noop_p50:.2f}x the no-op workflow's p50 (goal <= 1.5x)"
    load = Row(name=f"spawns per second under load ({p.conc} in flight)", samples=p.spawn_load,
               per_second=round(await _rate(p.spawn_load, p.conc, spawn)))
    load.ratio = (f"{(load.per_second or 0) / ceiling.noop_rates[p.conc]:.2f}x the no-op workflow rate "
                  f"with {p.conc} in flight (goal >= 0.5x)")
    return [row, load]


async def _mixed_row(tc: TetrarchClient, domain: str, p: Plan, ceiling: Ceiling) -> Row:
    """Operations per second in a mixed load: of every 10, 4 status reads, 3 policy checks, 2
    allocations and 1 spawn, with ``p.conc`` in flight."""
    sup = tc.client.get_workflow_handle(LevelRef.supervisor(domain, "s").entity_id)
    check = PolicyCheck(operation=OperationType.SPAWN, domain=domain, supervisor="s",
                        resources=Resources.of(cpu=0.5, memory="512Mi"))
    await tc.spawn_agent(SpawnAgentRequest(domain=domain, supervisor="s", name="mixed", resources=Resources()))
    one = Resources(cpu_millis=1)

    async def op(i: int) -> object:
        kind = i % 10
        if kind < 4:
            return await tc.supervisor_status(domain, "s")
        if kind < 7:
            return await sup.query(ManagementEntity.judge, check)
        if kind < 9:
            return await tc.allocate(AllocateRequest(domain=domain, agent="mixed", supervisor="s", resources=one))
        return await tc.spawn_agent(SpawnAgentRequest(domain=domain, supervisor="s", name=f"m{i}",
                                                      resources=Resources(cpu_millis=10, memory_mib=16)))

    total = p.total
    rate = await _rate(total, p.conc, op)
    return Row(name=f"mixed load, operations per second ({p.conc} in flight: 40% status, 30% policy checks, "
                    "20% allocations, 10% spawns)", samples=total, per_second=round(rate),
               seed_3_level="5,000/s", seed_4_level="4,000/s", seed_optimized="4,800/s (with caching)",
               ratio=f"{rate / ceiling.noop_rates[p.conc]:.2f}x the no-op workflow rate")


async def _batch_row(tc: TetrarchClient, domain: str, batch: int, start_rate: float) -> Row:
    """Agents per second when spawned as one batch, beside the rate the bare server merely starts no-op
    workflows (an agent is at least one workflow start, so that rate bounds it)."""
    t = time.perf_counter()
    done = await tc.batch_spawn(BatchSpawnRequest(domain=domain, supervisor="s", agents=[
        BatchAgent(name=f"b{i}", resources=Resources(cpu_millis=10, memory_mib=16)) for i in range(batch)]))
    per_s = done.spawned / (time.perf_counter() - t)
    return Row(name=f"batch spawn ({batch} agents in one request)", samples=done.spawned, per_second=round(per_s),
               seed_3_level="1,000/s", seed_4_level="800/s", seed_optimized="950/s (with batching)",
               ratio=f"{per_s / start_rate:.2f}x the no-op workflow start rate (goal >= 0.7x)" if start_rate else "")


async def _allocation_rows(tc: TetrarchClient, n: int, total: int, conc: int, noop_lat: list[float],
                           update_lat: list[float]) -> list[Row]:
    """AllocateResources at each escalation depth, and allocations per second under concurrency.

    Three domains shape the depth: a supervisor with room pays alone; a supervisor with no capacity
    borrows everything from its domain; a domain with no free capacity of its own lends from global.
    Each allocation asks one millicore, so the pools never run out during the run.
    """
    tag = uuid.uuid4().hex[:6]
    zero, big = Resources(), Resources.of(cpu=50, memory="50Gi")
    shapes = {"supervisor": (big, big), "manager": (big, zero), "orchestrator": (zero, zero)}
    domains = {depth: f"bench-alloc-{depth[:3]}-{tag}" for depth in shapes}
    rows: list[Row] = []
    update_p50 = statistics.median(update_lat) * 1000
    noop_p50 = statistics.median(noop_lat) * 1000
    try:
        for depth, (dom_cap, sup_cap) in shapes.items():
            d = domains[depth]
            await tc.create_domain(CreateDomainRequest(domain=d, resources=dom_cap))
            await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s", resources=sup_cap))
            await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", resources=zero))
        one = Resources(cpu_millis=1)
        for depth, d in domains.items():
            lat = await _latencies(n, lambda i, d=d: tc.allocate(AllocateRequest(  # type: ignore[misc]
                domain=d, agent="a", supervisor="s", resources=one)))
            row = latency_row(f"resource allocation, served by the {depth}", lat, seed_3_level="30 ms",
                              seed_4_level="45 ms", seed_optimized="35 ms (parallel)")
            if row.p50_ms:
                row.ratio = (f"{row.p50_ms / update_p50:.1f}x one Update, {row.p50_ms / noop_p50:.2f}x the "
                             "no-op workflow (p50)")
            rows.append(row)
        d = domains["supervisor"]
        rate = await _rate(total, conc, lambda i: tc.allocate(AllocateRequest(
            domain=d, agent="a", supervisor="s", resources=one)))
        rows.append(Row(name=f"resource allocations per second ({conc} in flight)", samples=total,
                        per_second=round(rate), ratio=""))
        audit_report = await tc.audit(list(domains.values()))
        if not audit_report.ok:
            raise RuntimeError("the pools do not balance after the allocation bench: "
                               + "; ".join(audit_report.problems))
    finally:
        for d in domains.values():
            with contextlib.suppress(Exception):
                await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
    return rows


def machine_info() -> dict[str, Any]:
    """What the figures ran on."""
    try:
        server = subprocess.run([str(temporal_binary()), "--version"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
    except Exception:
        server = "unknown"
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "temporalio": version("temporalio"), "temporal_cli": server}


def render(report: BenchReport) -> str:
    """The table people read."""
    from tetrarch_cli.render import table

    def f(v: float | None) -> str:
        return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")

    rows = [[r.name, f(r.p50_ms), f(r.p95_ms), f(r.p99_ms), f(r.per_second), r.seed_3_level, r.seed_4_level,
             r.seed_optimized, r.ratio] for r in report.rows]
    head = (f"tetrarch bench ({report.mode}), {report.started_at.isoformat(timespec='seconds')}, "
            f"{report.machine['cpus']} CPUs, temporalio {report.machine['temporalio']}, "
            f"{report.machine['temporal_cli']}")
    return head + "\n\n" + table(["measure", "p50 ms", "p95 ms", "p99 ms", "per s", "seed 3-level",
                                  "seed 4-level", "seed optimized", "vs ceiling / goal"], rows)


def write_report(report: BenchReport, out_dir: Path) -> Path:
    """One JSON file per run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{report.started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return path


def new_report(mode: str, rows: list[Row], started: datetime, embedded: bool) -> BenchReport:
    """A report with the machine and settings recorded."""
    from worker.run import PASSTHROUGH_MODULES, PROJECT_MODULES
    from workflows.steps import LOCAL_CALLS

    settings: dict[str, Any] = {
        "embedded_server": embedded,
        "workers": {"sandbox_passthrough": [*PASSTHROUGH_MODULES, *PROJECT_MODULES],
                    "entity_calls_as_local_activities": len(LOCAL_CALLS), "pollers_per_queue": "SDK default (5)",
                    "max_cached_workflows": "SDK default (1000)"}}
    if embedded:
        settings["dynamic_config"] = TUNED_DYNAMIC_CONFIG
        settings["sqlite_pragmas"] = SQLITE_PRAGMAS
    return BenchReport(started_at=started, mode=mode, machine=machine_info(), settings=settings, rows=rows)


def now_utc() -> datetime:
    """The run's start time."""
    return datetime.now(UTC)
