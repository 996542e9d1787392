"""coordinateAgentOperations on a real server: one saga over one supervisor's agents, in dependency order,
all or none."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res
from tetrarch.coordination import plan
from tetrarch.errors import InvalidRequest, NotFound, TetrarchError
from tetrarch.lifecycle_ops import CoordinatedOp, CoordinateRequest
from tetrarch.models import AgentStatus
from tetrarch.operations import CreateDomainRequest, CreateSupervisorRequest, RemoveDomainRequest, SpawnAgentRequest
from tetrarch_cli.client import TetrarchClient


def test_plan_puts_dependencies_first_and_refuses_cycles() -> None:
    ops = [CoordinatedOp(op="spawn", agent="app", depends_on=["db"]), CoordinatedOp(op="spawn", agent="db"),
           CoordinatedOp(op="checkpoint", agent="app"), CoordinatedOp(op="clone", agent="db2", source="db")]
    assert [f"{o.op} {o.agent}" for o in plan(ops)] == ["spawn db", "spawn app", "checkpoint app", "clone db2"]
    cycle = [CoordinatedOp(op="spawn", agent="x", depends_on=["y"]),
             CoordinatedOp(op="spawn", agent="y", depends_on=["x"])]
    with pytest.raises(InvalidRequest) as e:
        plan(cycle)
    assert "cycle" in e.value.message
    with pytest.raises(InvalidRequest):
        plan([CoordinatedOp(op="spawn", agent="a"), CoordinatedOp(op="spawn", agent="a")])


async def domain(tc: TetrarchClient, tag: str) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    for s in ("s", "other"):
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name=s, resources=res(4)))
    return d


async def test_a_coordinated_set_applies_in_order_or_not_at_all(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "coord")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="old", resources=res(1)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="other", name="elsewhere", resources=res(1)))
    done = await tc.coordinate(CoordinateRequest(domain=d, supervisor="s", operations=[
        CoordinatedOp(op="spawn", agent="app", depends_on=["db"], resources=res(1)),
        CoordinatedOp(op="spawn", agent="db", resources=res(1)),
        CoordinatedOp(op="stop", agent="old")]))
    assert done.order == ["spawn db", "spawn app", "stop old"]
    assert (await tc.agent_status(d, "app")).status is AgentStatus.RUNNING
    with pytest.raises(NotFound):
        await tc.agent_status(d, "old")
    before = await tc.pools([d])

    # The third operation fails (too big for the whole system): the first two are undone.
    with pytest.raises(TetrarchError) as e:
        await tc.coordinate(CoordinateRequest(domain=d, supervisor="s", operations=[
            CoordinatedOp(op="spawn", agent="extra", resources=res(1)),
            CoordinatedOp(op="stop", agent="app"),
            CoordinatedOp(op="spawn", agent="huge", resources=res(100_000))]))
    assert e.value.code == "CapacityExceeded"
    with pytest.raises(NotFound):
        await tc.agent_status(d, "extra")
    assert (await tc.agent_status(d, "app")).status is AgentStatus.RUNNING, "restored from its final checkpoint"
    assert await tc.pools([d]) == before
    with pytest.raises(InvalidRequest) as wrong:
        await tc.coordinate(CoordinateRequest(domain=d, supervisor="s", operations=[
            CoordinatedOp(op="checkpoint", agent="elsewhere")]))
    assert "supervisor other" in wrong.value.message
    report = await tc.audit([d])
    assert report.ok, report.problems
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s", f"supervisor/{d}/other",
                                                   f"agent/{d}/app", f"agent/{d}/db", f"agent/{d}/elsewhere"})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
