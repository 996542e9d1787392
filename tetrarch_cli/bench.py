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
from tetrarch_cli.server import TUNED_DYNAMIC_CONFIG, temporal_binary
from workflows.bench import NoopEntityWorkflow, NoopWorkflow
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


async def run_bench(client: Client, prefix: str, short: bool) -> list[Row]:
    """Measure everything against ``client``'s server, with workers already running on ``prefix``."""
    n = 40 if short else 200
    total, conc = (200, 20) if short else (1000, 50)
    queue = f"{prefix}bench"
    rows: list[Row] = []
    async with Worker(client, task_queue=queue, workflows=[NoopWorkflow, NoopEntityWorkflow]):
        run_id = uuid.uuid4().hex[:8]

        async def noop(i: int) -> object:
            return await client.execute_workflow(NoopWorkflow.run, id=f"bench/noop/{run_id}/{i}", task_queue=queue)

        noop_lat = await _latencies(n, noop)
        noop_row = latency_row("ceiling: no-op workflow, start to result", noop_lat)
        noop_row.per_second = round(await _rate(total, conc, lambda i: noop(n + i)))
        rows.append(noop_row)
        entity = await client.start_workflow(NoopEntityWorkflow.run, id=f"bench/entity/{run_id}", task_queue=queue)
        update_lat = await _latencies(n, lambda i: entity.execute_update(NoopEntityWorkflow.touch))
        rows.append(latency_row("ceiling: one Update on an entity", update_lat))
        query_lat = await _latencies(n, lambda i: entity.query(NoopEntityWorkflow.count))
        rows.append(latency_row("ceiling: one Query on an entity", query_lat))
        await entity.signal(NoopEntityWorkflow.stop)

    rows += _in_process_rows(20_000 if short else 100_000)

    tc = TetrarchClient(client, prefix)
    domain = f"bench-{uuid.uuid4().hex[:6]}"
    await tc.create_domain(CreateDomainRequest(domain=domain, resources=Resources.of(cpu=100, memory="100Gi")))
    await tc.create_supervisor(CreateSupervisorRequest(domain=domain, name="s", resources=Resources.of(
        cpu=50, memory="50Gi")))
    for target in ({"domain": domain}, {"domain": domain, "supervisor": "s"}):
        await tc.set_policy(SetPolicyRequest(template="standard", **target))
    try:
        sup = tc.client.get_workflow_handle(LevelRef.supervisor(domain, "s").entity_id)
        check = PolicyCheck(operation=OperationType.SPAWN, domain=domain, supervisor="s",
                            resources=Resources.of(cpu=0.5, memory="512Mi"))
        judge_lat = await _latencies(n, lambda i: sup.query(ManagementEntity.judge, check))
        row = latency_row("policy check, cached, through a worker", judge_lat, seed_3_level="5 ms",
                          seed_4_level="8 ms", seed_optimized="3 ms (cached)")
        row.per_second = round(await _rate(total, conc, lambda i: sup.query(ManagementEntity.judge, check)))
        row.ratio = (f"{row.p50_ms / (statistics.median(update_lat) * 1000):.2f}x one Update's p50 "
                     "(goal <= 1.2x)") if row.p50_ms else ""
        rows.append(row)
        varied = [check.model_copy(update={"resources": Resources(cpu_millis=100 + i, memory_mib=256)})
                  for i in range(n)]
        rows.append(latency_row("policy check, uncached, through a worker",
                                await _latencies(n, lambda i: sup.query(ManagementEntity.judge, varied[i]))))
        status_lat = await _latencies(n, lambda i: tc.supervisor_status(domain, "s"))
        row = latency_row("get status (fast path: a Query)", status_lat, seed_3_level="10 ms",
                          seed_4_level="15 ms", seed_optimized="8 ms (fast path)")
        row.ratio = f"{row.p50_ms / (statistics.median(query_lat) * 1000):.2f}x one Query's p50" if row.p50_ms else ""
        rows.append(row)
        spawn_n = 10 if short else 40
        spawn_lat = await _latencies(spawn_n, lambda i: tc.spawn_agent(SpawnAgentRequest(
            domain=domain, supervisor="s", name=f"a{i}", resources=Resources.of(cpu=0.25, memory="256Mi"))))
        row = latency_row("spawn agent (one at a time)", spawn_lat, seed_3_level="50 ms", seed_4_level="70 ms",
                          seed_optimized="55 ms (with caching)")
        row.ratio = f"{row.p50_ms / (statistics.median(noop_lat) * 1000):.2f}x the no-op workflow's p50" \
            if row.p50_ms else ""
        rows.append(row)
        rows.append(await _batch_row(tc, domain, 50 if short else 200, noop_row.per_second or 0))
    finally:
        await tc.remove_domain(RemoveDomainRequest(domain=domain, drain=True))
    rows += await _allocation_rows(tc, n, total, conc, noop_lat, update_lat)
    return rows


async def _batch_row(tc: TetrarchClient, domain: str, batch: int, noop_rate: float) -> Row:
    """Agents per second when spawned as one batch, beside the rate the bare server completes no-op workflows."""
    t = time.perf_counter()
    done = await tc.batch_spawn(BatchSpawnRequest(domain=domain, supervisor="s", agents=[
        BatchAgent(name=f"b{i}", resources=Resources(cpu_millis=10, memory_mib=16)) for i in range(batch)]))
    per_s = done.spawned / (time.perf_counter() - t)
    return Row(name=f"batch spawn ({batch} agents in one request)", samples=done.spawned, per_second=round(per_s),
               seed_3_level="1,000/s", seed_4_level="800/s", seed_optimized="950/s (with batching)",
               ratio=f"{per_s / noop_rate:.2f}x the no-op workflow rate" if noop_rate else "")


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
    settings: dict[str, Any] = {"embedded_server": embedded}
    if embedded:
        settings["dynamic_config"] = TUNED_DYNAMIC_CONFIG
    return BenchReport(started_at=started, mode=mode, machine=machine_info(), settings=settings, rows=rows)


def now_utc() -> datetime:
    """The run's start time."""
    return datetime.now(UTC)
