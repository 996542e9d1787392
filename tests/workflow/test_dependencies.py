"""manageAgentDependencies on a real server: a spawn waits for the agents it depends on; stopping an
agent others depend on is refused unless cascaded."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res
from tetrarch.errors import Conflict, InvalidRequest, NotFound
from tetrarch.models import AgentStatus
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch_cli.client import TetrarchClient


async def domain(tc: TetrarchClient, tag: str) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s", resources=res(5)))
    return d


def spawn(d: str, name: str, *deps: str, timeout: float = 60) -> SpawnAgentRequest:
    return SpawnAgentRequest(domain=d, supervisor="s", name=name, resources=res(1), depends_on=list(deps),
                             dependency_timeout_seconds=timeout)


async def test_spawn_waits_for_its_dependencies_and_stop_respects_them(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "deps")
    waiting = asyncio.ensure_future(tc.spawn_agent(spawn(d, "app", "db")))
    await asyncio.sleep(1.0)
    assert not waiting.done(), "the spawn waits for db"
    with pytest.raises(NotFound):
        await tc.agent_status(d, "app")
    await tc.spawn_agent(spawn(d, "db"))
    app = await asyncio.wait_for(waiting, timeout=30)
    assert app.created and (await tc.agent_status(d, "app")).status is AgentStatus.RUNNING

    before = await tc.pools([d])
    with pytest.raises(Conflict) as e:
        await tc.stop_agent(StopAgentRequest(domain=d, name="db"))
    assert "app" in e.value.message and "cascade" in e.value.message
    assert await tc.pools([d]) == before and (await tc.agent_status(d, "db")).status is AgentStatus.RUNNING
    await tc.stop_agent(StopAgentRequest(domain=d, name="db", cascade=True))
    for gone in ("db", "app"):
        with pytest.raises(NotFound):
            await tc.agent_status(d, gone)
    report = await tc.audit([d])
    assert report.ok, report.problems
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_a_dependency_that_never_runs_refuses_the_spawn(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "deps-missing")
    before = await tc.pools([d])
    with pytest.raises(Conflict) as e:
        await tc.spawn_agent(spawn(d, "app", "ghost", timeout=1))
    assert "ghost" in e.value.message
    with pytest.raises(InvalidRequest):
        await tc.spawn_agent(spawn(d, "self", "self"))
    assert await tc.pools([d]) == before
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
