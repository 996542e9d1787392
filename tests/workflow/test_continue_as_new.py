"""Entities continue as new before their history grows large, and carry everything across.

Each test starts its own entity (a unique id in a domain of its own) with ``continue_as_new_after=5``
and drives it with many Updates, then checks that it continued as new, that its run changed and
its current history is short, and that its children, pool and policy are exactly what the Updates
made them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from tests.conftest import domain_name
from tests.workflow.helpers import res
from tetrarch.level import ChildRef, ConfigureLevel, LevelState, ReconfigureChild, RegisterChild, Reserve
from tetrarch.models import LevelView, PoolView
from tetrarch.names import Level, manager_id, supervisor_id
from tetrarch.operations import CreateDomainRequest, EntitySettings, LevelInput, RemoveDomainRequest
from tetrarch.policy import Policy
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient
from workflows.levels import ENTITY_RUN, ManagementEntity

CAN_AFTER = 5



async def start_entity(client: Client, prefix: str, level: Level, d: str, capacity: Resources) -> tuple[str, str]:
    """Start a management entity of ``level`` directly; returns its workflow id and first run id."""
    now = datetime.now(UTC)
    name = d if level is Level.MANAGER else "can"
    state = LevelState(level=level, name=name, domain=d, capacity=capacity, created_at=now, updated_at=now)
    wf_id = manager_id(d) if level is Level.MANAGER else supervisor_id(d, name)
    handle = await client.start_workflow(
        ENTITY_RUN[level],
        LevelInput(level_state=state,
                   settings=EntitySettings(continue_as_new_after=CAN_AFTER, report_interval_seconds=0)),
        id=wf_id, task_queue=f"{prefix}{level.value}")
    assert handle.first_execution_run_id is not None
    return wf_id, handle.first_execution_run_id


def latest(client: Client, wf_id: str) -> WorkflowHandle[Any, Any]:
    """A handle on whatever run is current (a handle from start_workflow stays on the first run)."""
    return client.get_workflow_handle(wf_id)


async def describe(client: Client, wf_id: str) -> LevelView:
    view: LevelView = await latest(client, wf_id).query(ManagementEntity.describe)
    return view


async def eventually_continued(client: Client, wf_id: str, within: float = 10.0) -> LevelView:
    """The entity's view once it has continued as new at least once (or when the time is up)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        view = await describe(client, wf_id)
        if view.continued_as_new >= 1 or asyncio.get_running_loop().time() > deadline:
            return view
        await asyncio.sleep(0.1)


async def register(client: Client, wf_id: str, name: str, cpu: int = 1, rid: str | None = None) -> bool:
    result = await latest(client, wf_id).execute_update(
        ManagementEntity.register_child,
        RegisterChild(request_id=rid or f"req-{name}", name=name, resources=res(cpu)))
    return result.created


@pytest.mark.parametrize("level", [Level.SUPERVISOR, Level.MANAGER])
async def test_entity_continues_as_new_losing_nothing(tc: TetrarchClient, client: Client, prefix: str,
                                                      level: Level) -> None:
    """32 Updates against an entity that continues as new every 5: every change survives every run."""
    d = domain_name("can")
    if level is Level.SUPERVISOR:
        # A real manager above (it ignores reports from a supervisor it never admitted).
        await tc.create_domain(CreateDomainRequest(domain=d, resources=res(5)))
    wf_id, first_run = await start_entity(client, prefix, level, d, res(30))
    created_at = (await describe(client, wf_id)).created_at

    updates = 0
    for i in range(24):
        assert await register(client, wf_id, f"c-{i}") is True
        updates += 1
    for i in range(6):
        await latest(client, wf_id).execute_update(ManagementEntity.unregister_child,
                                                   ChildRef(request_id=f"rm-{i}", name=f"c-{i}"))
        updates += 1
    if level is Level.SUPERVISOR:  # an agent grows by a further allocation, not by resizing a slice
        await latest(client, wf_id).execute_update(ManagementEntity.reserve, Reserve(
            request_id="grow", key=f"{d}/c-10#grow", child="c-10", resources=res(2), escalate=False))
    else:
        await latest(client, wf_id).execute_update(
            ManagementEntity.reconfigure_child, ReconfigureChild(request_id="grow", name="c-10", resources=res(3)))
    updates += 1
    policy = Policy(version=2, max_children=25)
    await latest(client, wf_id).execute_update(ManagementEntity.configure, ConfigureLevel(policy=policy))
    updates += 1

    # Retrying an earlier request after several runs takes nothing again; a new request for the same
    # child is told it already existed.
    assert await register(client, wf_id, "c-7") is True
    assert await register(client, wf_id, "c-7", rid="another-request") is False
    updates += 2

    # A run may take a few more Updates than the threshold while its loop is busy reporting, so the
    # count of runs is at least a few, not exactly updates / 5.
    view = await describe(client, wf_id)
    assert view.continued_as_new >= 2
    assert view.run_updates < updates, "the per-run counter starts again in every run"
    desc = await latest(client, wf_id).describe()
    assert desc.run_id != first_run
    current = await latest(client, wf_id).fetch_history()
    assert len(current.events) < 120, "the current run's history stays short"

    names = [f"c-{i}" for i in range(6, 24)]
    assert [c.name for c in view.children] == sorted(names)
    expected = {n: res(3) if n == "c-10" else res(1) for n in names}
    assert {c.name: c.resources for c in view.children} == expected
    granted = sum(expected.values(), Resources())
    assert view.pool == PoolView(capacity=res(30), granted=granted, free=res(30).minus(granted))
    assert view.policy == policy
    assert view.level is level and view.created_at == created_at

    # Still fully working: the limit set before the last runs is enforced.
    for i in range(24, 31):
        await register(client, wf_id, f"c-{i}")
    with pytest.raises(WorkflowUpdateFailedError) as e:
        await register(client, wf_id, "c-99")
    assert isinstance(e.value.cause, ApplicationError)
    assert e.value.cause.type == "LimitExceeded" and "max_children" in e.value.cause.message
    assert len((await describe(client, wf_id)).children) == 25

    await latest(client, wf_id).terminate("test cleanup")
    if level is Level.SUPERVISOR:
        await tc.remove_domain(RemoveDomainRequest(domain=d))


async def test_concurrent_updates_across_continue_as_new(tc: TetrarchClient, client: Client,
                                                         prefix: str) -> None:
    """Updates racing a continue-as-new are neither lost nor applied twice."""
    d = domain_name("canrace")
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(5)))
    wf_id, first_run = await start_entity(client, prefix, Level.SUPERVISOR, d, res(40))

    results = await asyncio.gather(*(register(client, wf_id, f"r-{i}") for i in range(30)))
    assert all(results)

    # The burst may all land in one run; that run continues as new once its handlers are done.
    view = await eventually_continued(client, wf_id)
    assert view.continued_as_new >= 1
    assert (await latest(client, wf_id).describe()).run_id != first_run
    assert sorted(c.name for c in view.children) == sorted(f"r-{i}" for i in range(30))
    assert view.pool == PoolView(capacity=res(40), granted=res(30), free=res(10))

    await latest(client, wf_id).terminate("test cleanup")
    await tc.remove_domain(RemoveDomainRequest(domain=d))
