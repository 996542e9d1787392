"""Faults a review found: a reused request id, agents whose workflow died, drains across them.

Each scenario checks that nothing is left behind: the supervisor's slices, the domain's and the
orchestrator's agent counts, and the ability to remove what is left.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from tests.conftest import domain_name
from tests.workflow.helpers import res
from tetrarch.errors import NotFound
from tetrarch.models import LevelRef
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    RemoveSupervisorRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch_cli.client import TetrarchClient
from workflows.agents import SpawnAgentWorkflow


async def domain_with_supervisor(tc: TetrarchClient, tag: str) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s", resources=res(4)))
    return d


async def counts(tc: TetrarchClient, d: str) -> tuple[int, int, list[str]]:
    """(agents counted at the domain, cpu millis granted at the supervisor, its children)."""
    manager = await tc.domain_status(d)
    sup = await tc.supervisor_status(d, "s")
    return manager.agents, sup.pool.granted.cpu_millis, [c.name for c in sup.children]


async def test_a_request_id_reused_for_another_agent_does_not_return_the_first_result(tc: TetrarchClient) -> None:
    d = await domain_with_supervisor(tc, "reuse")
    first = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a1", request_id="same"))
    second = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a2", request_id="same"))
    assert first.agent.name == "a1" and second.agent.name == "a2"
    assert second.created
    assert await counts(tc, d) == (2, 2000, ["a1", "a2"])
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_stopping_an_agent_whose_workflow_was_terminated_releases_what_it_held(
        tc: TetrarchClient, client: Client) -> None:
    d = await domain_with_supervisor(tc, "dead")
    before = (await tc.describe(LevelRef.orchestrator())).agents
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a1"))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a2"))
    await client.get_workflow_handle(LevelRef.agent(d, "a1").entity_id).terminate("simulated crash")
    result = await tc.stop_agent(StopAgentRequest(domain=d, name="a1"))
    assert result.released == res(1)
    assert await counts(tc, d) == (1, 1000, ["a2"])
    assert (await tc.describe(LevelRef.orchestrator())).agents == before + 1  # only a2 still counted
    # Once cleaned up, stopping it again finds nothing to stop.
    with pytest.raises(NotFound):
        await tc.stop_agent(StopAgentRequest(domain=d, name="a1"))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_a_drain_completes_across_a_dead_agent_and_leaves_nothing(tc: TetrarchClient, client: Client) -> None:
    d = await domain_with_supervisor(tc, "drain")
    before = (await tc.describe(LevelRef.orchestrator())).agents
    for i in range(4):
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name=f"a{i}"))
    await client.get_workflow_handle(LevelRef.agent(d, "a2").entity_id).terminate("simulated crash")
    removed = await tc.remove_supervisor(RemoveSupervisorRequest(domain=d, name="s", drain=True))
    assert sorted(removed.drained) == ["a0", "a1", "a2", "a3"]
    manager = await tc.domain_status(d)
    assert manager.agents == 0 and manager.children == []
    assert manager.pool.granted == res(0)
    assert (await tc.describe(LevelRef.orchestrator())).agents == before  # tests run one at a time
    await tc.remove_domain(RemoveDomainRequest(domain=d))


async def test_cancelled_spawns_either_complete_whole_or_leave_nothing(tc: TetrarchClient, client: Client) -> None:
    """Spawns cancelled at varying moments: every agent is either running, sliced and counted, or absent."""
    d = await domain_with_supervisor(tc, "cancel")
    before = (await tc.describe(LevelRef.orchestrator())).agents
    handles = []
    for i in range(8):
        handles.append(await client.start_workflow(
            SpawnAgentWorkflow.run, SpawnAgentRequest(domain=d, supervisor="s", name=f"c{i}", request_id=f"c{i}",
                                                      resources=res(0, 0).model_copy(update={"cpu_millis": 250})),
            id=f"op/spawn-agent/{d}/c{i}", task_queue=f"{tc.queues.supervisor}"))
        await asyncio.sleep(0.02 * i)  # cancel each one a little later than the one before
        await handles[-1].cancel()
    for h in handles:
        with contextlib.suppress(WorkflowFailureError):
            await h.result()
    running = set()
    for i in range(8):
        desc = None
        with contextlib.suppress(RPCError):
            desc = await client.get_workflow_handle(LevelRef.agent(d, f"c{i}").entity_id).describe()
        if desc is not None and desc.status is not None and desc.status.name == "RUNNING":
            running.add(f"c{i}")
    manager = await tc.domain_status(d)
    sup = await tc.supervisor_status(d, "s")
    assert {c.name for c in sup.children} == running
    assert sup.pool.granted.cpu_millis == 250 * len(running)
    assert manager.agents == len(running)
    assert (await tc.describe(LevelRef.orchestrator())).agents == before + len(running)
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
