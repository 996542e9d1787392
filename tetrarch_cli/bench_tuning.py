"""Worker tuning, measured in the bench run: each choice beside its alternative, on the same server.

Every experiment runs its own workers on a fresh task-queue prefix, so one setting never leaks into
another's figures:

- the workflow sandbox: the project's modules passed through (the default), re-imported per
  workflow run, and no sandbox at all; measured on spawn, the operation with the most workflow runs;
- poller counts: 2, 5 (the SDK's default) and 10 pollers per task queue, on spawn;
- eager workflow start: a no-op workflow started with and without ``request_eager_start``;
- eager activity dispatch: a workflow running one activity on its own queue, with and without it;
- local activities: the same one-step workflow with the step as a local activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from temporalio.client import Client
from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker

from tetrarch.names import Level
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    SpawnAgentRequest,
)
from tetrarch.resources import Resources
from tetrarch_cli.bench import Row, _latencies, _rate, latency_row
from tetrarch_cli.client import TetrarchClient
from worker.run import run_workers, workflow_runner
from workflows.bench import NoopWorkflow, OneActivityWorkflow, noop_activity


@contextlib.asynccontextmanager
async def _hierarchy_workers(client: Client, tag: str, **options: Any) -> AsyncIterator[tuple[TetrarchClient, str]]:
    """The four levels' workers with ``options`` on a fresh prefix, and a new domain with one supervisor.

    The orchestrator entity is the deployment's one (its id has no prefix) and stays on the workers
    that already run it; the domain's manager and supervisor, the operations and the agents run here.
    """
    prefix = f"tune{tag}{uuid.uuid4().hex[:4]}-"
    domain = f"tune{tag}-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    task = asyncio.create_task(run_workers(client, list(Level), prefix, stop, **options))
    tc = TetrarchClient(client, prefix)
    try:
        await tc.create_domain(CreateDomainRequest(domain=domain, resources=Resources.of(cpu=20, memory="20Gi")))
        await tc.create_supervisor(CreateSupervisorRequest(domain=domain, name="s", resources=Resources.of(
            cpu=10, memory="10Gi")))
        yield tc, domain
    finally:
        with contextlib.suppress(Exception):
            await tc.remove_domain(RemoveDomainRequest(domain=domain, drain=True))
        stop.set()
        await task


async def _spawn_latencies(tc: TetrarchClient, domain: str, n: int) -> list[float]:
    def spawn(i: int) -> Awaitable[object]:
        return tc.spawn_agent(SpawnAgentRequest(domain=domain, supervisor="s", name=f"t{i}",
                                                resources=Resources(cpu_millis=10, memory_mib=16)))
    await spawn(10_000)  # warm: the first run of each workflow type pays for its imports
    return await _latencies(n, spawn)


def _vs(row: Row, base_p50: float | None, what: str) -> Row:
    if row.p50_ms is not None and base_p50:
        row.ratio = f"{row.p50_ms / base_p50:.2f}x {what}"
    return row


async def sandbox_and_poller_rows(client: Client, n: int) -> list[Row]:
    """Spawn p50 under each workflow runner and poller count (the chosen setting first)."""
    configs: list[tuple[str, dict[str, Any]]] = [
        ("sandbox, project modules passed through (chosen)", {}),
        ("sandbox, project modules re-imported per run", {"workflow_runner": workflow_runner(False)}),
        ("no sandbox", {"workflow_runner": UnsandboxedWorkflowRunner()}),
        # 2 is the least: with 1, the one workflow poller serves the sticky queue and a new run waits forever.
        ("2 pollers per queue", {"workflow_task_poller_behavior": PollerBehaviorSimpleMaximum(2),
                                 "activity_task_poller_behavior": PollerBehaviorSimpleMaximum(2)}),
        ("10 pollers per queue", {"workflow_task_poller_behavior": PollerBehaviorSimpleMaximum(10),
                                  "activity_task_poller_behavior": PollerBehaviorSimpleMaximum(10)}),
    ]
    rows: list[Row] = []
    base: float | None = None
    for i, (name, options) in enumerate(configs):
        async with _hierarchy_workers(client, str(i), **options) as (tc, domain):
            row = latency_row(f"tuning: spawn, {name}", await _spawn_latencies(tc, domain, n))
        base = base if base is not None else row.p50_ms
        rows.append(_vs(row, base, "the chosen setting's spawn p50") if i else row)
    return rows


async def eager_rows(client: Client, n: int, total: int, conc: int) -> list[Row]:
    """Eager workflow start and eager activity dispatch against their absence; an activity against a
    local activity. The worker runs on the starting client, as eager start requires."""
    queue = f"tune-eager-{uuid.uuid4().hex[:6]}"
    rows: list[Row] = []
    async with Worker(client, task_queue=queue, workflows=[NoopWorkflow, OneActivityWorkflow],
                      activities=[noop_activity], workflow_runner=workflow_runner()):
        run = uuid.uuid4().hex[:6]

        def noop(eager: bool) -> Callable[[int], Awaitable[object]]:
            async def go(i: int) -> object:
                handle = await client.start_workflow(NoopWorkflow.run, id=f"tune/noop/{run}/{eager}/{i}",
                                                     task_queue=queue, request_eager_start=eager)
                await handle.result()
                return handle
            return go

        plain = latency_row("tuning: no-op workflow, plain start", await _latencies(n, noop(False)))
        plain.per_second = round(await _rate(total, conc, lambda i: noop(False)(n + i)))
        eager = latency_row("tuning: no-op workflow, eager start", await _latencies(n, noop(True)))
        eager.per_second = round(await _rate(total, conc, lambda i: noop(True)(n + i)))
        if plain.per_second and eager.per_second:
            eager.ratio = (f"{eager.p50_ms or 0:.1f} vs {plain.p50_ms or 0:.1f} ms p50, "
                           f"{eager.per_second / plain.per_second:.2f}x the plain start rate")
        rows += [plain, eager]

        def one(local: bool) -> Callable[[int], Awaitable[object]]:
            return lambda i: client.execute_workflow(OneActivityWorkflow.run, local,
                                                     id=f"tune/one/{run}/{local}/{i}", task_queue=queue)

        eager_act = latency_row("tuning: workflow with one activity (eager dispatch)", await _latencies(n, one(False)))
        local_act = latency_row("tuning: workflow with one local activity", await _latencies(n, one(True)))
        rows += [eager_act, _vs(local_act, eager_act.p50_ms, "the activity's")]
    async with Worker(client, task_queue=queue + "-x", workflows=[OneActivityWorkflow], activities=[noop_activity],
                      workflow_runner=workflow_runner(), disable_eager_activity_execution=True):
        no_eager = latency_row("tuning: workflow with one activity (no eager dispatch)", await _latencies(
            n, lambda i: client.execute_workflow(OneActivityWorkflow.run, False, id=f"tune/one/{run}/x/{i}",
                                                 task_queue=queue + "-x")))
    rows.append(_vs(no_eager, eager_act.p50_ms, "eager dispatch's"))
    return rows


async def tuning_rows(client: Client, short: bool, samples: int | None = None) -> list[Row]:
    """Every worker-tuning experiment (``samples`` overrides every count, for tests)."""
    n = samples or (15 if short else 60)
    rows = await eager_rows(client, samples or (30 if short else 150), samples or (150 if short else 600),
                            min(20, samples or 20))
    rows += await sandbox_and_poller_rows(client, n)
    return rows
