"""Domain operations through the client against a real server: create, configure, status, list, remove.

Every step is checked through the entities' Queries (the orchestrator's and the manager's views)
and through resource accounting (capacity, granted and free at every level). Refusals are checked
to name what they refuse and to change nothing, and Temporal visibility is checked to hold no
operation workflow left running after them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res, shape
from tetrarch.agent import AgentState
from tetrarch.errors import CapacityExceeded, Conflict, HasChildren, InvalidRequest, NotFound
from tetrarch.level import LevelState
from tetrarch.models import AgentStatus, ChildStatus, Health, PoolView
from tetrarch.names import Level
from tetrarch.operations import (
    ConfigureDomainRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    EntitySettings,
    LevelInput,
    RemoveDomainRequest,
    ScaleSupervisorsRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.policy import Policy
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient
from workflows.levels import ManagerWorkflow


async def orchestrator_child(tc: TetrarchClient, domain: str) -> Any:
    return next((c for c in await tc.list_domains() if c.name == domain), None)


async def test_domain_lifecycle_with_accounting(tc: TetrarchClient, client: Client) -> None:
    """Create, read, list, grow, shrink, re-police and remove a domain; the global pool follows each step."""
    d = domain_name("dom")
    base = (await tc.system_status()).orchestrator.pool

    created = await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    assert created.created is True
    assert created.domain.name == d and created.domain.entity_id == f"manager/{d}"
    assert created.domain.resources == res(10)

    orch = (await tc.system_status()).orchestrator.pool
    assert orch.capacity == base.capacity
    assert orch.granted == base.granted + res(10)
    assert orch.free == base.free.minus(res(10))

    view = await tc.domain_status(d)
    assert view.id == f"manager/{d}" and view.level is Level.MANAGER
    assert view.scope == f"domain:{d}" and view.domain == d and view.name == d
    assert view.status is ChildStatus.ACTIVE and view.health is Health.HEALTHY
    assert view.pool.capacity == res(10) and view.pool.granted == Resources() and view.pool.free == res(10)
    assert view.children == []
    assert view.policy == Policy()

    listed = await orchestrator_child(tc, d)
    assert listed is not None and listed.status is ChildStatus.ACTIVE and listed.resources == res(10)

    grown = await tc.configure_domain(ConfigureDomainRequest(domain=d, resources=res(15, 12)))
    assert grown.domain.resources == res(15, 12)
    assert (await tc.domain_status(d)).pool.capacity == res(15, 12)
    orch = (await tc.system_status()).orchestrator.pool
    assert orch.granted == base.granted + res(15, 12) and orch.free == base.free.minus(res(15, 12))

    await tc.configure_domain(ConfigureDomainRequest(domain=d, resources=res(12)))
    assert (await tc.domain_status(d)).pool == PoolView(capacity=res(12), granted=Resources(), free=res(12))
    assert (await tc.system_status()).orchestrator.pool.granted == base.granted + res(12)

    policy = Policy(version=2, max_children=3)
    await tc.configure_domain(ConfigureDomainRequest(domain=d, policy=policy))
    after_policy = await tc.domain_status(d)
    assert after_policy.policy == policy
    assert after_policy.pool.capacity == res(12), "a policy change must leave the pool alone"

    removed = await tc.remove_domain(RemoveDomainRequest(domain=d))
    assert removed.entity_id == f"manager/{d}"
    assert removed.released == res(12) and removed.drained == []
    assert await orchestrator_child(tc, d) is None
    assert (await tc.system_status()).orchestrator.pool == base
    with pytest.raises(NotFound) as e:
        await tc.domain_status(d)
    assert d in str(e.value)
    desc = await client.get_workflow_handle(f"manager/{d}").describe()
    assert desc.status is WorkflowExecutionStatus.COMPLETED
    await assert_only_entities_running(client, d, set())


async def test_create_existing_domain_identically_is_a_no_op(tc: TetrarchClient, client: Client) -> None:
    """Same definition again: created False and nothing taken twice; a retried request id neither."""
    d = domain_name("same")
    first = await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10), request_id="req-1"))
    assert first.created is True
    orch_before = shape((await tc.system_status()).orchestrator)
    dom_before = shape(await tc.domain_status(d))

    again = await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    assert again.created is False
    assert again.domain.resources == res(10)
    # The same request retried (same id) is the same creation: it reports it, and takes nothing again.
    retried = await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10), request_id="req-1"))
    assert retried.created is True and retried.domain.resources == res(10)

    assert shape((await tc.system_status()).orchestrator) == orch_before
    assert shape(await tc.domain_status(d)) == dom_before
    await assert_only_entities_running(client, d, {f"manager/{d}"})
    await tc.remove_domain(RemoveDomainRequest(domain=d))


async def test_create_existing_domain_differently_is_a_conflict(tc: TetrarchClient, client: Client) -> None:
    """A different pool or policy for an existing domain is refused naming it; nothing changes."""
    d = domain_name("conf")
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    orch_before = shape((await tc.system_status()).orchestrator)
    dom_before = shape(await tc.domain_status(d))

    with pytest.raises(Conflict) as e:
        await tc.create_domain(CreateDomainRequest(domain=d, resources=res(11)))
    assert d in e.value.message and "different definition" in e.value.message
    assert e.value.level == "orchestrator"

    with pytest.raises(Conflict) as e2:
        await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10), policy=Policy(max_children=1)))
    assert d in e2.value.message

    assert shape((await tc.system_status()).orchestrator) == orch_before
    assert shape(await tc.domain_status(d)) == dom_before
    await assert_only_entities_running(client, d, {f"manager/{d}"})
    await tc.remove_domain(RemoveDomainRequest(domain=d))


async def test_unknown_domain_is_not_found_everywhere(tc: TetrarchClient, client: Client) -> None:
    """Every operation and status read on a domain that does not exist is NotFound naming it."""
    d = domain_name("ghost")
    orch_before = shape((await tc.system_status()).orchestrator)

    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("configure", lambda: tc.configure_domain(ConfigureDomainRequest(domain=d, resources=res(2)))),
        ("configure policy", lambda: tc.configure_domain(ConfigureDomainRequest(domain=d, policy=Policy()))),
        ("remove", lambda: tc.remove_domain(RemoveDomainRequest(domain=d))),
        ("remove drain", lambda: tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))),
        ("status", lambda: tc.domain_status(d)),
        ("list supervisors", lambda: tc.list_supervisors(d)),
        ("create supervisor", lambda: tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s"))),
        ("scale", lambda: tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=1))),
        ("spawn", lambda: tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a"))),
        ("stop", lambda: tc.stop_agent(StopAgentRequest(domain=d, name="a"))),
    ]
    for what, call in calls:
        with pytest.raises(NotFound) as e:
            await call()
        assert d in str(e.value), f"{what}: {e.value}"

    assert shape((await tc.system_status()).orchestrator) == orch_before
    assert await orchestrator_child(tc, d) is None
    await assert_only_entities_running(client, d, set())


async def test_invalid_domain_name_is_refused(tc: TetrarchClient, client: Client) -> None:
    """A name that is not a DNS label is an InvalidRequest; no pool is carved, no manager starts."""
    orch_before = shape((await tc.system_status()).orchestrator)
    with pytest.raises(InvalidRequest) as e:
        await tc.create_domain(CreateDomainRequest(domain="Bad_Name", resources=res(1)))
    assert "Bad_Name" in e.value.message
    assert shape((await tc.system_status()).orchestrator) == orch_before


async def test_create_domain_beyond_global_pool(tc: TetrarchClient, client: Client) -> None:
    """More than the global pool has free: CapacityExceeded, nothing reserved, no manager started."""
    d = domain_name("big")
    orch = (await tc.system_status()).orchestrator
    too_much = Resources(cpu_millis=orch.pool.free.cpu_millis + 1000, memory_mib=1024)
    with pytest.raises(CapacityExceeded) as e:
        await tc.create_domain(CreateDomainRequest(domain=d, resources=too_much))
    assert d in e.value.message and "cpu" in e.value.message
    assert e.value.level == "orchestrator"

    assert shape((await tc.system_status()).orchestrator) == shape(orch)
    assert await orchestrator_child(tc, d) is None
    with pytest.raises(NotFound):
        await tc.domain_status(d)
    await assert_only_entities_running(client, d, set())


async def test_configure_domain_beyond_global_pool(tc: TetrarchClient, client: Client) -> None:
    """Growing a domain past the global free pool is refused; both levels stay as they were."""
    d = domain_name("grow")
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    orch = (await tc.system_status()).orchestrator
    dom_before = shape(await tc.domain_status(d))
    too_much = res(10) + Resources(cpu_millis=orch.pool.free.cpu_millis + 1000)

    with pytest.raises(CapacityExceeded) as e:
        await tc.configure_domain(ConfigureDomainRequest(domain=d, resources=too_much))
    assert d in e.value.message

    assert shape((await tc.system_status()).orchestrator) == shape(orch)
    assert shape(await tc.domain_status(d)) == dom_before
    await assert_only_entities_running(client, d, {f"manager/{d}"})
    await tc.remove_domain(RemoveDomainRequest(domain=d))


async def test_configure_domain_below_its_supervisors_restores_the_slice(tc: TetrarchClient,
                                                                         client: Client) -> None:
    """Shrinking below what supervisors hold: the manager refuses and the orchestrator's slice is restored."""
    d = domain_name("shrink")
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(20)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(8)))
    orch_before = shape((await tc.system_status()).orchestrator)
    dom_before = shape(await tc.domain_status(d))

    with pytest.raises(Conflict) as e:
        await tc.configure_domain(ConfigureDomainRequest(domain=d, resources=res(5)))
    assert d in e.value.message and "children hold more" in e.value.message
    assert e.value.level == "manager"

    # The orchestrator had already carved the smaller slice; the saga gave the old one back.
    assert shape((await tc.system_status()).orchestrator) == orch_before
    assert (await orchestrator_child(tc, d)).resources == res(20)
    assert shape(await tc.domain_status(d)) == dom_before

    with pytest.raises(Conflict) as e2:
        await tc.configure_domain(ConfigureDomainRequest(domain=d, policy=Policy(version=2, max_children=0)))
    assert "max_children" in e2.value.message
    assert shape(await tc.domain_status(d)) == dom_before
    assert shape((await tc.system_status()).orchestrator) == orch_before

    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_remove_domain_with_supervisors_needs_drain(tc: TetrarchClient, client: Client) -> None:
    """HasChildren without drain (nothing changes); drain removes supervisors and stops agents cleanly."""
    d = domain_name("drain")
    base = (await tc.system_status()).orchestrator.pool
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(20)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(5)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s2", resources=res(5)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1"))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(2)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s2", name="a3"))
    orch_before = shape((await tc.system_status()).orchestrator)
    dom_before = shape(await tc.domain_status(d))
    s1_before = shape(await tc.supervisor_status(d, "s1"))

    with pytest.raises(HasChildren) as e:
        await tc.remove_domain(RemoveDomainRequest(domain=d))
    assert d in e.value.message and "s1" in e.value.message and "s2" in e.value.message

    assert shape((await tc.system_status()).orchestrator) == orch_before
    assert (await orchestrator_child(tc, d)).status is ChildStatus.ACTIVE
    dom = await tc.domain_status(d)
    assert shape(dom) == dom_before and dom.health is not Health.DRAINING
    assert shape(await tc.supervisor_status(d, "s1")) == s1_before
    entities = {f"manager/{d}", f"supervisor/{d}/s1", f"supervisor/{d}/s2",
                f"agent/{d}/a1", f"agent/{d}/a2", f"agent/{d}/a3"}
    await assert_only_entities_running(client, d, entities)
    # Still usable after the refusal.
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s2", name="a4"))
    entities.add(f"agent/{d}/a4")

    removed = await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
    assert removed.released == res(20)
    assert sorted(removed.drained) == ["s1", "s2"]

    for agent in ("a1", "a2", "a3", "a4"):
        final: AgentState = await client.get_workflow_handle(f"agent/{d}/{agent}", result_type=AgentState).result()
        assert final.status is AgentStatus.STOPPED, agent
        assert final.status_reason == "supervisor drained"
    for wf_id in entities:
        desc = await client.get_workflow_handle(wf_id).describe()
        assert desc.status is WorkflowExecutionStatus.COMPLETED, wf_id
    assert (await tc.system_status()).orchestrator.pool == base
    assert await orchestrator_child(tc, d) is None
    with pytest.raises(NotFound):
        await tc.supervisor_status(d, "s1")
    with pytest.raises(NotFound):
        await tc.agent_status(d, "a1")
    await assert_only_entities_running(client, d, set())


async def test_create_domain_compensates_when_the_manager_cannot_start(tc: TetrarchClient, client: Client,
                                                                      prefix: str) -> None:
    """A manager entity already running with another pool fails step two; the slice is given back."""
    d = domain_name("comp")
    now = (await tc.system_status()).orchestrator.updated_at
    squatter = await client.start_workflow(
        ManagerWorkflow.run,
        LevelInput(level_state=LevelState(level=Level.MANAGER, name=d, domain=d, capacity=res(3),
                                          created_at=now, updated_at=now),
                   settings=EntitySettings(report_interval_seconds=0)),
        id=f"manager/{d}", task_queue=f"{prefix}manager")
    orch_before = shape((await tc.system_status()).orchestrator)

    with pytest.raises(Conflict) as e:
        await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    assert f"manager/{d}" in e.value.message

    assert shape((await tc.system_status()).orchestrator) == orch_before
    assert await orchestrator_child(tc, d) is None
    # The entity that was there is left as it was.
    assert (await tc.domain_status(d)).pool.capacity == res(3)
    await assert_only_entities_running(client, d, {f"manager/{d}"})
    await squatter.terminate("test cleanup")
