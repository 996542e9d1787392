"""Agent operations through the client against a real server: spawn and stop.

Each test works in a domain of its own. Every step is checked through the agent's and its
supervisor's Queries and the pool accounting at each level; refusals must name what they refuse,
change nothing and leave no operation workflow running.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res, shape
from tetrarch.agent import AgentState
from tetrarch.errors import CapacityExceeded, Conflict, InvalidRequest, LimitExceeded, NotFound
from tetrarch.models import AgentStatus, ChildStatus, PoolView
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.policy import Policy, ResourcePolicy
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient


async def new_domain(tc: TetrarchClient, tag: str, supervisors: dict[str, tuple[Resources, Policy]]) -> str:
    """A 20-CPU domain with the given supervisors."""
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(20)))
    for name, (resources, policy) in supervisors.items():
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name=name, resources=resources,
                                                           policy=policy))
    return d


async def final_state(client: Client, d: str, agent: str) -> AgentState:
    """The result of an agent's workflow (it completes once stopped)."""
    state: AgentState = await client.get_workflow_handle(f"agent/{d}/{agent}", result_type=AgentState).result()
    return state


async def test_spawn_and_stop_with_accounting(tc: TetrarchClient, client: Client) -> None:
    """Spawn takes a slice of the supervisor's pool and runs the agent; stop ends it and gives the slice back."""
    d = await new_domain(tc, "ag", {"s1": (res(6), Policy())})
    dom_before = shape(await tc.domain_status(d))
    orch_before = (await tc.system_status()).orchestrator.pool

    spawned = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1"))
    assert spawned.created is True
    assert spawned.agent.name == "a1" and spawned.agent.entity_id == f"agent/{d}/a1"
    assert spawned.agent.resources == res(1), "the default agent slice is 1 CPU / 1Gi"
    sup = await tc.supervisor_status(d, "s1")
    assert sup.pool == PoolView(capacity=res(6), granted=res(1), free=res(5))
    assert [(c.name, c.status, c.entity_id) for c in sup.children] == [("a1", ChildStatus.ACTIVE, f"agent/{d}/a1")]

    a1 = await tc.agent_status(d, "a1")
    assert a1.status is AgentStatus.RUNNING and a1.entity_id == f"agent/{d}/a1"
    assert (a1.spec.domain, a1.spec.supervisor, a1.spec.name, a1.spec.resources) == (d, "s1", "a1", res(1))

    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(2, 4),
                                           image="calculator@1.0.0", labels={"team": "x"}))
    a2 = await tc.agent_status(d, "a2")
    assert a2.status is AgentStatus.RUNNING
    assert a2.spec.resources == res(2, 4) and a2.spec.image == "calculator@1.0.0" and a2.spec.labels == {"team": "x"}
    assert (await tc.supervisor_status(d, "s1")).pool == PoolView(capacity=res(6), granted=res(3, 5),
                                                                  free=res(3, 1))
    assert [c.name for c in await tc.list_agents(d, "s1")] == ["a1", "a2"]
    # Agents take from their supervisor only: the domain and global pools do not move.
    assert shape(await tc.domain_status(d)) == dom_before
    assert (await tc.system_status()).orchestrator.pool == orch_before

    stopped = await tc.stop_agent(StopAgentRequest(domain=d, name="a1", reason="done for today"))
    assert stopped.entity_id == f"agent/{d}/a1" and stopped.released == res(1)
    final = await final_state(client, d, "a1")
    assert final.status is AgentStatus.STOPPED and final.status_reason == "done for today"
    assert (await client.get_workflow_handle(f"agent/{d}/a1").describe()).status \
        is WorkflowExecutionStatus.COMPLETED
    with pytest.raises(NotFound) as e:
        await tc.agent_status(d, "a1")
    assert f"{d}/a1" in str(e.value)
    assert (await tc.supervisor_status(d, "s1")).pool == PoolView(capacity=res(6), granted=res(2, 4),
                                                                  free=res(4, 2))
    assert [c.name for c in await tc.list_agents(d, "s1")] == ["a2"]

    # The name is free again once stopped.
    again = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1"))
    assert again.created is True
    assert (await tc.agent_status(d, "a1")).status is AgentStatus.RUNNING
    assert (await tc.supervisor_status(d, "s1")).pool.granted == res(3, 5)

    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1",
                                                   f"agent/{d}/a1", f"agent/{d}/a2"})
    await tc.stop_agent(StopAgentRequest(domain=d, name="a1"))
    await tc.stop_agent(StopAgentRequest(domain=d, name="a2"))
    assert (await tc.supervisor_status(d, "s1")).pool == PoolView(capacity=res(6), granted=Resources(),
                                                                  free=res(6))
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_spawn_existing_agent(tc: TetrarchClient, client: Client) -> None:
    """Identical: created False; different slice or another supervisor: Conflict naming it; nothing changes."""
    d = await new_domain(tc, "agx", {"s1": (res(6), Policy()), "s2": (res(4), Policy())})
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(2)))
    s1_before = shape(await tc.supervisor_status(d, "s1"))
    s2_before = shape(await tc.supervisor_status(d, "s2"))
    a1_before = await tc.agent_status(d, "a1")

    again = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(2)))
    assert again.created is False and again.agent.resources == res(2)

    with pytest.raises(Conflict) as e:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(3)))
    assert "'a1'" in e.value.message and "different definition" in e.value.message

    # s2 admits the name (it does not know a1), then the running agent names its real supervisor:
    # the saga gives s2's slice back.
    with pytest.raises(Conflict) as e2:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s2", name="a1", resources=res(2)))
    assert f"{d}/a1" in e2.value.message and "s1" in e2.value.message

    assert shape(await tc.supervisor_status(d, "s1")) == s1_before
    assert shape(await tc.supervisor_status(d, "s2")) == s2_before
    a1 = await tc.agent_status(d, "a1")
    assert a1.status is AgentStatus.RUNNING and a1.spec == a1_before.spec and a1.started_at == a1_before.started_at
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"supervisor/{d}/s2",
                                                   f"agent/{d}/a1"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_unknown_agent_is_not_found(tc: TetrarchClient, client: Client) -> None:
    """Stopping or reading an agent that does not exist (or no longer runs) is NotFound naming it."""
    d = await new_domain(tc, "agnf", {"s1": (res(4), Policy())})
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="real"))
    sup_before = shape(await tc.supervisor_status(d, "s1"))

    with pytest.raises(NotFound) as e:
        await tc.stop_agent(StopAgentRequest(domain=d, name="ghost"))
    assert f"{d}/ghost" in str(e.value)
    with pytest.raises(NotFound) as e2:
        await tc.agent_status(d, "ghost")
    assert f"{d}/ghost" in str(e2.value)
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before

    await tc.stop_agent(StopAgentRequest(domain=d, name="real"))
    sup_after = shape(await tc.supervisor_status(d, "s1"))
    with pytest.raises(NotFound) as e3:
        await tc.stop_agent(StopAgentRequest(domain=d, name="real"))
    assert f"{d}/real" in str(e3.value)
    assert shape(await tc.supervisor_status(d, "s1")) == sup_after
    assert (await final_state(client, d, "real")).status is AgentStatus.STOPPED

    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_agent_capacity_limits_and_policy_defaults(tc: TetrarchClient, client: Client) -> None:
    """CapacityExceeded and LimitExceeded start no agent and reserve nothing; the policy default slice applies.

    Borrowing is off at this supervisor, so what its pool cannot pay is refused there (with borrowing
    on, the domain would lend it: see test_allocation.py).
    """
    policy = Policy(max_children=2, default_agent_resources=res(2, 1), resources=ResourcePolicy(borrowing=False))
    d = await new_domain(tc, "aglim", {"s1": (res(5), policy)})
    sup_before = shape(await tc.supervisor_status(d, "s1"))

    with pytest.raises(CapacityExceeded) as e:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="huge", resources=res(6)))
    assert "'huge'" in e.value.message and "cpu" in e.value.message
    assert e.value.level == "supervisor"
    with pytest.raises(NotFound):
        await tc.agent_status(d, "huge")
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before

    with pytest.raises(InvalidRequest) as e2:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="-bad-"))
    assert "-bad-" in e2.value.message
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before

    first = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1"))
    assert first.agent.resources == res(2, 1), "the supervisor policy's default slice"
    assert (await tc.agent_status(d, "a1")).spec.resources == res(2, 1)
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(1)))
    assert (await tc.supervisor_status(d, "s1")).pool == PoolView(capacity=res(5), granted=res(3, 2),
                                                                  free=res(2, 3))
    sup_before = shape(await tc.supervisor_status(d, "s1"))

    with pytest.raises(LimitExceeded) as e3:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a3", resources=res(1)))
    assert "max_children" in e3.value.message and "2" in e3.value.message
    with pytest.raises(NotFound):
        await tc.agent_status(d, "a3")
    assert shape(await tc.supervisor_status(d, "s1")) == sup_before

    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1",
                                                   f"agent/{d}/a1", f"agent/{d}/a2"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_concurrent_spawns_never_oversubscribe(tc: TetrarchClient, client: Client) -> None:
    """Twelve spawns at once into room for eight (no borrowing): eight run, four are refused, the pool is full."""
    d = await new_domain(tc, "agrace", {"s1": (res(8), Policy(resources=ResourcePolicy(borrowing=False)))})
    names = [f"a{i}" for i in range(12)]
    outcomes = await asyncio.gather(*(tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name=n))
                                      for n in names), return_exceptions=True)
    admitted = {n for n, o in zip(names, outcomes, strict=True) if not isinstance(o, BaseException)}
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(admitted) == 8
    assert len(refused) == 4 and all(isinstance(o, CapacityExceeded) for o in refused), refused

    sup = await tc.supervisor_status(d, "s1")
    assert sup.pool == PoolView(capacity=res(8), granted=res(8), free=Resources())
    assert {c.name for c in sup.children} == admitted
    for n in names:
        if n in admitted:
            assert (await tc.agent_status(d, n)).status is AgentStatus.RUNNING
        else:
            with pytest.raises(NotFound):
                await tc.agent_status(d, n)
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1"}
                                       | {f"agent/{d}/{n}" for n in admitted})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_concurrent_stops_release_once(tc: TetrarchClient, client: Client) -> None:
    """Two stops of one agent at once: it stops once and its slice comes back once."""
    d = await new_domain(tc, "agstop", {"s1": (res(4), Policy())})
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(2)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(1)))

    outcomes = await asyncio.gather(*(tc.stop_agent(StopAgentRequest(domain=d, name="a1")) for _ in range(2)),
                                    return_exceptions=True)
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert done, outcomes
    assert all(isinstance(o, NotFound) for o in outcomes if isinstance(o, BaseException)), outcomes
    assert (await final_state(client, d, "a1")).status is AgentStatus.STOPPED

    sup = await tc.supervisor_status(d, "s1")
    assert [(c.name, c.status) for c in sup.children] == [("a2", ChildStatus.ACTIVE)]
    assert sup.pool == PoolView(capacity=res(4), granted=res(1), free=res(3))
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"agent/{d}/a2"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
