"""Supervisor operations through the client against a real server: create, configure, status, remove, scale.

Each test works in a domain of its own. Every step is checked through Queries on the manager and
the supervisors, with the pool accounting (capacity, granted, free) at each level; refusals must
name what they refuse and change nothing, and leave no operation workflow running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res, shape
from tetrarch.agent import AgentState
from tetrarch.errors import CapacityExceeded, Conflict, HasChildren, InvalidRequest, LimitExceeded, NotFound
from tetrarch.level import LevelState
from tetrarch.models import AgentStatus, ChildStatus, Health, PoolView
from tetrarch.names import Level
from tetrarch.operations import (
    ConfigureDomainRequest,
    ConfigureSupervisorRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    EntitySettings,
    LevelInput,
    RemoveDomainRequest,
    RemoveSupervisorRequest,
    ScaleSupervisorsRequest,
    SpawnAgentRequest,
)
from tetrarch.policy import Policy
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient
from workflows.levels import SupervisorWorkflow


async def new_domain(tc: TetrarchClient, tag: str, cpu: int = 20, policy: Policy | None = None) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(cpu), policy=policy or Policy()))
    return d


def sup_ids(d: str, *names: str) -> set[str]:
    return {f"supervisor/{d}/{n}" for n in names}


async def test_supervisor_lifecycle_with_accounting(tc: TetrarchClient, client: Client) -> None:
    """Create, read, list, resize, re-police and remove a supervisor; the domain pool follows each step."""
    d = await new_domain(tc, "sup")
    orch_before = (await tc.system_status()).orchestrator.pool

    created = await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(4)))
    assert created.created is True
    assert created.supervisor.name == "s1" and created.supervisor.entity_id == f"supervisor/{d}/s1"
    assert created.supervisor.resources == res(4)

    dom = await tc.domain_status(d)
    assert dom.pool == PoolView(capacity=res(20), granted=res(4), free=res(16))
    assert [(c.name, c.status, c.resources) for c in dom.children] == [("s1", ChildStatus.ACTIVE, res(4))]
    assert [c.name for c in await tc.list_supervisors(d)] == ["s1"]

    sup = await tc.supervisor_status(d, "s1")
    assert sup.id == f"supervisor/{d}/s1" and sup.level is Level.SUPERVISOR
    assert sup.scope == f"supervisor:{d}/s1" and sup.domain == d and sup.name == "s1"
    assert sup.status is ChildStatus.ACTIVE and sup.health is Health.HEALTHY
    assert sup.pool == PoolView(capacity=res(4), granted=Resources(), free=res(4))
    assert sup.children == []

    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s2", resources=res(3, 1)))
    assert (await tc.domain_status(d)).pool == PoolView(capacity=res(20), granted=res(7, 5), free=res(13, 15))

    grown = await tc.configure_supervisor(ConfigureSupervisorRequest(domain=d, name="s1", resources=res(6)))
    assert grown.supervisor.resources == res(6)
    assert (await tc.supervisor_status(d, "s1")).pool.capacity == res(6)
    assert (await tc.domain_status(d)).pool == PoolView(capacity=res(20), granted=res(9, 7), free=res(11, 13))

    policy = Policy(version=2, max_children=4, default_agent_resources=res(1, 2))
    await tc.configure_supervisor(ConfigureSupervisorRequest(domain=d, name="s1", policy=policy))
    s1 = await tc.supervisor_status(d, "s1")
    assert s1.policy == policy and s1.pool.capacity == res(6)

    removed = await tc.remove_supervisor(RemoveSupervisorRequest(domain=d, name="s1"))
    assert removed.entity_id == f"supervisor/{d}/s1" and removed.released == res(6) and removed.drained == []
    assert (await tc.domain_status(d)).pool == PoolView(capacity=res(20), granted=res(3, 1), free=res(17, 19))
    assert [c.name for c in await tc.list_supervisors(d)] == ["s2"]
    with pytest.raises(NotFound) as e:
        await tc.supervisor_status(d, "s1")
    assert f"{d}/s1" in str(e.value)
    desc = await client.get_workflow_handle(f"supervisor/{d}/s1").describe()
    assert desc.status is WorkflowExecutionStatus.COMPLETED
    # Supervisors only ever take from their domain: the global pool never moved.
    assert (await tc.system_status()).orchestrator.pool == orch_before

    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "s2"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_create_existing_supervisor(tc: TetrarchClient, client: Client) -> None:
    """Identically again: created False, nothing changed; differently: Conflict naming it, nothing changed."""
    d = await new_domain(tc, "supx")
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(4)))
    dom_before = shape(await tc.domain_status(d))
    sup_before = shape(await tc.supervisor_status(d, "s1"))

    again = await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(4)))
    assert again.created is False and again.supervisor.resources == res(4)
    assert shape(await tc.domain_status(d)) == dom_before

    with pytest.raises(Conflict) as e:
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(5)))
    assert "'s1'" in e.value.message and "different definition" in e.value.message
    assert e.value.level == "manager"
    with pytest.raises(Conflict) as e2:
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(4),
                                                           policy=Policy(max_children=2)))
    assert "'s1'" in e2.value.message

    assert shape(await tc.domain_status(d)) == dom_before
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before
    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "s1"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_unknown_supervisor_is_not_found_everywhere(tc: TetrarchClient, client: Client) -> None:
    """Every operation and status read naming a supervisor that does not exist is NotFound naming it."""
    d = await new_domain(tc, "supnf")
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="real", resources=res(2)))
    dom_before = shape(await tc.domain_status(d))

    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("configure", lambda: tc.configure_supervisor(
            ConfigureSupervisorRequest(domain=d, name="ghost", resources=res(1)))),
        ("configure policy", lambda: tc.configure_supervisor(
            ConfigureSupervisorRequest(domain=d, name="ghost", policy=Policy()))),
        ("remove", lambda: tc.remove_supervisor(RemoveSupervisorRequest(domain=d, name="ghost"))),
        ("remove drain", lambda: tc.remove_supervisor(RemoveSupervisorRequest(domain=d, name="ghost",
                                                                             drain=True))),
        ("status", lambda: tc.supervisor_status(d, "ghost")),
        ("list agents", lambda: tc.list_agents(d, "ghost")),
        ("spawn", lambda: tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="ghost", name="a"))),
    ]
    for what, call in calls:
        with pytest.raises(NotFound) as e:
            await call()
        assert "ghost" in str(e.value), f"{what}: {e.value}"

    assert shape(await tc.domain_status(d)) == dom_before
    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "real"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_supervisor_capacity_and_limits(tc: TetrarchClient, client: Client) -> None:
    """CapacityExceeded and LimitExceeded reserve nothing and start nothing; bad names are InvalidRequest."""
    d = await new_domain(tc, "suplim", cpu=10, policy=Policy(max_children=2))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(4)))
    dom_before = shape(await tc.domain_status(d))

    with pytest.raises(CapacityExceeded) as e:
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="huge", resources=res(7)))
    assert "'huge'" in e.value.message and "cpu" in e.value.message
    with pytest.raises(NotFound):
        await tc.supervisor_status(d, "huge")
    assert shape(await tc.domain_status(d)) == dom_before

    with pytest.raises(CapacityExceeded) as e2:
        await tc.configure_supervisor(ConfigureSupervisorRequest(domain=d, name="s1", resources=res(11)))
    assert "'s1'" in e2.value.message
    assert shape(await tc.domain_status(d)) == dom_before
    assert (await tc.supervisor_status(d, "s1")).pool.capacity == res(4)

    with pytest.raises(InvalidRequest) as e3:
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="No Spaces", resources=res(1)))
    assert "No Spaces" in e3.value.message
    assert shape(await tc.domain_status(d)) == dom_before

    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s2", resources=res(1)))
    dom_before = shape(await tc.domain_status(d))
    with pytest.raises(LimitExceeded) as e4:
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s3", resources=res(1)))
    assert "max_children" in e4.value.message and "2" in e4.value.message
    with pytest.raises(NotFound):
        await tc.supervisor_status(d, "s3")
    assert shape(await tc.domain_status(d)) == dom_before

    # Raising the domain's limit lets the same request through.
    await tc.configure_domain(ConfigureDomainRequest(domain=d, policy=Policy(version=2, max_children=3)))
    assert (await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s3", resources=res(1)))).created

    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "s1", "s2", "s3"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_configure_supervisor_below_its_agents_restores_the_slice(tc: TetrarchClient,
                                                                         client: Client) -> None:
    """Shrinking below what agents hold: the supervisor refuses and the manager's slice is restored."""
    d = await new_domain(tc, "supshr")
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(6)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(2)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(2)))
    dom_before = shape(await tc.domain_status(d))
    sup_before = shape(await tc.supervisor_status(d, "s1"))

    with pytest.raises(Conflict) as e:
        await tc.configure_supervisor(ConfigureSupervisorRequest(domain=d, name="s1", resources=res(3)))
    assert f"{d}/s1" in e.value.message and "children hold more" in e.value.message
    assert e.value.level == "supervisor"
    assert shape(await tc.domain_status(d)) == dom_before
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before

    with pytest.raises(Conflict):
        await tc.configure_supervisor(ConfigureSupervisorRequest(domain=d, name="s1",
                                                                 policy=Policy(version=2, max_children=1)))
    assert shape(await tc.domain_status(d)) == dom_before
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before

    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1",
                                                   f"agent/{d}/a1", f"agent/{d}/a2"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_remove_supervisor_with_agents_needs_drain(tc: TetrarchClient, client: Client) -> None:
    """HasChildren without drain (nothing changes); drain stops every agent cleanly and frees every level."""
    d = await new_domain(tc, "supdr")
    orch_before = (await tc.system_status()).orchestrator.pool
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(6)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s2", resources=res(2)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1"))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(3)))
    dom_before = shape(await tc.domain_status(d))
    sup_before = shape(await tc.supervisor_status(d, "s1"))
    assert (await tc.supervisor_status(d, "s1")).pool == PoolView(capacity=res(6), granted=res(4), free=res(2))

    with pytest.raises(HasChildren) as e:
        await tc.remove_supervisor(RemoveSupervisorRequest(domain=d, name="s1"))
    assert f"{d}/s1" in e.value.message and "a1" in e.value.message and "a2" in e.value.message
    assert shape(await tc.domain_status(d)) == dom_before
    sup = await tc.supervisor_status(d, "s1")
    assert shape(sup) == sup_before and sup.health is not Health.DRAINING
    for agent in ("a1", "a2"):
        assert (await tc.agent_status(d, agent)).status is AgentStatus.RUNNING
    await assert_only_entities_running(client, d, {f"manager/{d}", f"agent/{d}/a1", f"agent/{d}/a2"}
                                       | sup_ids(d, "s1", "s2"))
    # The refusal left s1 admitting agents.
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a3"))

    removed = await tc.remove_supervisor(RemoveSupervisorRequest(domain=d, name="s1", drain=True))
    assert removed.released == res(6) and sorted(removed.drained) == ["a1", "a2", "a3"]
    for agent in ("a1", "a2", "a3"):
        final: AgentState = await client.get_workflow_handle(f"agent/{d}/{agent}", result_type=AgentState).result()
        assert final.status is AgentStatus.STOPPED and final.status_reason == "supervisor drained"
        with pytest.raises(NotFound):
            await tc.agent_status(d, agent)
    assert (await tc.domain_status(d)).pool == PoolView(capacity=res(20), granted=res(2), free=res(18))
    assert [c.name for c in (await tc.domain_status(d)).children] == ["s2"]
    assert (await tc.system_status()).orchestrator.pool == orch_before
    with pytest.raises(NotFound):
        await tc.supervisor_status(d, "s1")

    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "s2"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_create_supervisor_compensates_when_the_entity_cannot_start(tc: TetrarchClient, client: Client,
                                                                         prefix: str) -> None:
    """A supervisor entity already running with another pool fails step two; the manager's slice is undone."""
    d = await new_domain(tc, "supcomp")
    now = (await tc.domain_status(d)).updated_at
    squatter = await client.start_workflow(
        SupervisorWorkflow.run,
        LevelInput(level_state=LevelState(level=Level.SUPERVISOR, name="s1", domain=d, capacity=res(2),
                                          created_at=now, updated_at=now),
                   settings=EntitySettings(report_interval_seconds=0)),
        id=f"supervisor/{d}/s1", task_queue=f"{prefix}supervisor")
    dom_before = shape(await tc.domain_status(d))
    assert dom_before["pool"] == PoolView(capacity=res(20), granted=Resources(), free=res(20))

    with pytest.raises(Conflict) as e:
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(5)))
    assert f"supervisor/{d}/s1" in e.value.message

    dom = await tc.domain_status(d)
    assert shape(dom) == dom_before
    assert dom.children == [] and dom.pool.free == res(20)
    assert (await tc.supervisor_status(d, "s1")).pool.capacity == res(2), "the running entity is untouched"
    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "s1"))
    await squatter.terminate("test cleanup")
    await tc.remove_domain(RemoveDomainRequest(domain=d))


async def test_scale_up_and_down(tc: TetrarchClient, client: Client) -> None:
    """+N adds sup-1..N with their pools; -N removes empty supervisors and returns their pools."""
    d = await new_domain(tc, "scale")
    added = await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=3, resources=res(3)))
    assert added.domain == d and added.added == ["sup-1", "sup-2", "sup-3"] and added.removed == []
    dom = await tc.domain_status(d)
    assert [(c.name, c.resources) for c in dom.children] == [(f"sup-{i}", res(3)) for i in (1, 2, 3)]
    assert dom.pool == PoolView(capacity=res(20), granted=res(9), free=res(11))
    for i in (1, 2, 3):
        assert (await tc.supervisor_status(d, f"sup-{i}")).pool.capacity == res(3)

    more = await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=1, resources=res(2)))
    assert more.added == ["sup-4"]
    assert (await tc.domain_status(d)).pool.granted == res(11)

    down = await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=-2))
    assert len(down.removed) == 2 and down.added == []
    remaining = {f"sup-{i}" for i in (1, 2, 3, 4)} - set(down.removed)
    dom = await tc.domain_status(d)
    assert {c.name for c in dom.children} == remaining
    assert dom.pool.granted == sum((c.resources for c in dom.children), Resources())
    for name in down.removed:
        with pytest.raises(NotFound):
            await tc.supervisor_status(d, name)

    with pytest.raises(InvalidRequest):
        await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=0))
    with pytest.raises(InvalidRequest) as e:
        await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=1, name_prefix="Bad_"))
    assert "Bad_" in e.value.message
    assert {c.name for c in (await tc.domain_status(d)).children} == remaining

    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, *remaining))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_scale_up_beyond_the_domain_pool_adds_nothing(tc: TetrarchClient, client: Client) -> None:
    """Asking for more supervisors than the pool holds is refused whole: none is added."""
    d = await new_domain(tc, "scalecap", cpu=10)
    dom_before = shape(await tc.domain_status(d))
    with pytest.raises(CapacityExceeded):
        await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=3, resources=res(4)))
    assert shape(await tc.domain_status(d)) == dom_before
    await assert_only_entities_running(client, d, {f"manager/{d}"})

    d2 = await new_domain(tc, "scalelim", cpu=10, policy=Policy(max_children=2))
    dom2_before = shape(await tc.domain_status(d2))
    with pytest.raises(LimitExceeded):
        await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d2, delta=3, resources=res(1)))
    assert shape(await tc.domain_status(d2)) == dom2_before
    await assert_only_entities_running(client, d2, {f"manager/{d2}"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
    await tc.remove_domain(RemoveDomainRequest(domain=d2, drain=True))


async def test_scale_down_without_drain_refused_before_anything_is_removed(tc: TetrarchClient,
                                                                          client: Client) -> None:
    """Too few empty supervisors: HasChildren, and every supervisor and agent is still there."""
    d = await new_domain(tc, "scaleno")
    await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=3, resources=res(3)))
    # Asked right after the spawn: the decision must not rest on a report that has not arrived yet.
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="sup-1", name="a1"))
    dom_before = shape(await tc.domain_status(d))

    with pytest.raises(HasChildren) as e:
        await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=-3))
    assert d in e.value.message
    dom = await tc.domain_status(d)
    assert shape(dom) == dom_before
    assert all(c.status is ChildStatus.ACTIVE for c in dom.children)
    for i in (1, 2, 3):
        assert (await tc.supervisor_status(d, f"sup-{i}")).status is ChildStatus.ACTIVE
    assert (await tc.agent_status(d, "a1")).status is AgentStatus.RUNNING

    # Two can go without draining: the two empty ones, never the one with an agent.
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="sup-1", name="a2"))
    down = await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=-2))
    assert sorted(down.removed) == ["sup-2", "sup-3"]
    dom = await tc.domain_status(d)
    assert [c.name for c in dom.children] == ["sup-1"]
    assert dom.pool == PoolView(capacity=res(20), granted=res(3), free=res(17))
    assert {c.name for c in await tc.list_agents(d, "sup-1")} == {"a1", "a2"}

    await assert_only_entities_running(client, d, {f"manager/{d}", f"agent/{d}/a1", f"agent/{d}/a2"}
                                       | sup_ids(d, "sup-1"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_scale_down_with_drain_picks_the_least_loaded(tc: TetrarchClient, client: Client) -> None:
    """With drain, the supervisors with the fewest agents go first and their agents stop cleanly."""
    d = await new_domain(tc, "scaledr")
    await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=2, resources=res(4)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="sup-1", name="a1"))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="sup-1", name="a2"))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="sup-2", name="b1"))

    down = await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=-1, drain=True))
    assert down.removed == ["sup-2"]
    final: AgentState = await client.get_workflow_handle(f"agent/{d}/b1", result_type=AgentState).result()
    assert final.status is AgentStatus.STOPPED
    dom = await tc.domain_status(d)
    assert [c.name for c in dom.children] == ["sup-1"]
    assert dom.pool == PoolView(capacity=res(20), granted=res(4), free=res(16))
    assert (await tc.supervisor_status(d, "sup-1")).pool.granted == res(2)

    await assert_only_entities_running(client, d, {f"manager/{d}", f"agent/{d}/a1", f"agent/{d}/a2"}
                                       | sup_ids(d, "sup-1"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_scale_up_that_fails_half_way_is_undone(tc: TetrarchClient, client: Client, prefix: str) -> None:
    """One of three new supervisors cannot start: the two created are removed again, the pool restored."""
    d = await new_domain(tc, "scaleundo")
    now = (await tc.domain_status(d)).updated_at
    squatter = await client.start_workflow(
        SupervisorWorkflow.run,
        LevelInput(level_state=LevelState(level=Level.SUPERVISOR, name="sup-2", domain=d, capacity=res(1),
                                          created_at=now, updated_at=now),
                   settings=EntitySettings(report_interval_seconds=0)),
        id=f"supervisor/{d}/sup-2", task_queue=f"{prefix}supervisor")
    dom_before = shape(await tc.domain_status(d))

    with pytest.raises(Conflict) as e:
        await tc.scale_supervisors(ScaleSupervisorsRequest(domain=d, delta=3, resources=res(3)))
    assert f"supervisor/{d}/sup-2" in e.value.message

    assert shape(await tc.domain_status(d)) == dom_before
    for name in ("sup-1", "sup-3"):
        desc = await client.get_workflow_handle(f"supervisor/{d}/{name}").describe()
        assert desc.status is WorkflowExecutionStatus.COMPLETED, name
    await assert_only_entities_running(client, d, {f"manager/{d}"} | sup_ids(d, "sup-2"))
    await squatter.terminate("test cleanup")
    await tc.remove_domain(RemoveDomainRequest(domain=d))
