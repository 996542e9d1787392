"""BatchSpawnAgents against a real server: one validation pass, all or nothing, or best effort."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res
from tetrarch.errors import LimitExceeded, NotFound, PolicyDenied
from tetrarch.models import AgentStatus
from tetrarch.operations import (
    BatchAgent,
    BatchSpawnRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
)
from tetrarch.policy import Policy, ResourcePolicy
from tetrarch_cli.client import TetrarchClient


async def domain(tc: TetrarchClient, tag: str, policy: Policy | None = None, sup_policy: Policy | None = None) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(20), policy=policy or Policy()))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s", resources=res(8),
                                                       policy=sup_policy or Policy()))
    return d


async def audited(tc: TetrarchClient, d: str) -> None:
    report = await tc.audit([d])
    assert report.ok, report.problems


async def test_batch_spawns_every_agent_in_one_pass(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "batch")
    agents = [BatchAgent(name=f"b{i}", resources=res(1, 1)) for i in range(12)]  # 12 CPU: 8 here, 4 borrowed
    result = await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s", agents=agents, request_id="r1"))
    assert (result.spawned, result.refused) == (12, 0)
    assert all(o.spawned and o.created for o in result.agents)
    sup = await tc.supervisor_status(d, "s")
    assert {c.name for c in sup.children} == {a.name for a in agents}
    assert sup.pool.free == res(0, 0) and sup.pool.borrowed == res(4, 4)
    for a in agents:
        assert (await tc.agent_status(d, a.name)).status is AgentStatus.RUNNING
    again = await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s", agents=agents, request_id="r1"))
    assert again == result, "the same request id returns the first outcome"
    await audited(tc, d)
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s"}
                                       | {f"agent/{d}/{a.name}" for a in agents})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_all_or_nothing_refuses_the_whole_batch(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "batch-aon", sup_policy=Policy(max_children=5))
    before = await tc.pools([d])
    agents = [BatchAgent(name=f"b{i}", resources=res(1)) for i in range(6)]
    with pytest.raises(LimitExceeded) as e:
        await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s", agents=agents))
    assert e.value.level == "supervisor"
    assert await tc.pools([d]) == before
    assert (await tc.supervisor_status(d, "s")).children == []
    assert (await tc.domain_status(d)).agents == 0
    with pytest.raises(NotFound):
        await tc.agent_status(d, "b0")
    await audited(tc, d)
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_best_effort_spawns_what_the_limits_admit(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "batch-be", policy=Policy(max_agents=4),
                     sup_policy=Policy(resources=ResourcePolicy(borrowing=False)))
    agents = [BatchAgent(name=f"b{i}", resources=res(1)) for i in range(5)] + [
        BatchAgent(name="huge", resources=res(50))]
    result = await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s", agents=agents, all_or_nothing=False))
    by = {o.name: o for o in result.agents}
    huge = by["huge"].error
    assert by["huge"].spawned is False and huge is not None and huge.code == "CapacityExceeded"
    spawned = {n for n, o in by.items() if o.spawned}
    assert len(spawned) == 4 and spawned <= {f"b{i}" for i in range(5)}
    left_out = ({f"b{i}" for i in range(5)} - spawned).pop()
    err = by[left_out].error
    assert err is not None and err.code == "LimitExceeded"
    sup = await tc.supervisor_status(d, "s")
    assert {c.name for c in sup.children} == spawned
    assert sup.pool.granted == res(4)
    assert (await tc.domain_status(d)).agents == 4
    await audited(tc, d)
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s"}
                                       | {f"agent/{d}/{n}" for n in spawned})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_a_batch_above_a_policy_is_refused_by_the_highest_level(tc: TetrarchClient) -> None:
    d = await domain(tc, "batch-pol", policy=Policy(max_agents=2))
    with pytest.raises(PolicyDenied) as e:
        await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s",
                                               agents=[BatchAgent(name=f"b{i}") for i in range(3)]))
    assert e.value.level == "manager" and "max_agents" in str(e.value.data)
    assert (await tc.supervisor_status(d, "s")).children == []
    await audited(tc, d)
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_a_batch_gives_every_agent_its_entity_settings(tc: TetrarchClient, client: Client) -> None:
    """Agents spawned by the thousand must be able to stay quiet: the batch carries their heartbeat."""
    from tetrarch.models import LevelRef
    from tetrarch.operations import AgentInput, EntitySettings

    d = await domain(tc, "batchset")
    quiet = EntitySettings(heartbeat_seconds=3600)
    await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s", settings=quiet,
                                           agents=[BatchAgent(name=f"q{i}", resources=res(1, 1)) for i in range(2)]))
    for name in ("q0", "q1"):
        history = await client.get_workflow_handle(LevelRef.agent(d, name).entity_id).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        inp = (await client.data_converter.decode(started.input.payloads, [AgentInput]))[0]
        assert isinstance(inp, AgentInput) and inp.settings.heartbeat_seconds == 3600
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
