"""AllocateResources against a real server: the seed's example 3 at every escalation depth.

Each test works in a domain of its own, reads every level's pool and ledger after each step, and
ends with the conservation audit over the whole hierarchy.
"""

from __future__ import annotations

import pytest

from tests.conftest import domain_name
from tests.workflow.helpers import res
from tetrarch.errors import CapacityExceeded
from tetrarch.operations import CreateDomainRequest, CreateSupervisorRequest, SpawnAgentRequest
from tetrarch.resource_ops import AllocateRequest, ReleaseRequest
from tetrarch_cli.client import TetrarchClient


async def small_domain(tc: TetrarchClient, tag: str) -> str:
    """A 6-CPU domain with one 2-CPU supervisor s1 holding agent a1 (1 CPU)."""
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(6)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(2)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(1)))
    return d


async def assert_balanced(tc: TetrarchClient, d: str) -> None:
    report = await tc.audit()
    assert report.ok, report.problems


async def test_each_escalation_depth(tc: TetrarchClient) -> None:
    d = await small_domain(tc, "esc")
    by_sup = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(1)))
    assert by_sup.served_by == "supervisor" and by_sup.parts == {"supervisor": res(1)}
    by_dom = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(3)))
    assert by_dom.served_by == "manager" and by_dom.parts == {"supervisor": res(0, 0), "manager": res(3)}
    sup = await tc.supervisor_status(d, "s1")
    assert sup.pool.borrowed == res(3) and sup.pool.free == res(0, 0)
    dom = await tc.domain_status(d)
    assert dom.pool.lent == res(3) and dom.pool.free == res(1)
    by_glob = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(2)))
    assert by_glob.served_by == "orchestrator"
    assert by_glob.parts == {"supervisor": res(0, 0), "manager": res(1), "orchestrator": res(1)}
    assert by_glob.agent_total == res(7)
    await assert_balanced(tc, d)
    before = await tc.pools([d])
    with pytest.raises(CapacityExceeded) as e:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(100_000)))
    assert e.value.level == "orchestrator"
    assert await tc.pools([d]) == before
    released = await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id=by_glob.allocation_id))
    assert released.returned == {"supervisor": res(0, 0), "manager": res(1), "orchestrator": res(1)}
    again = await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id=by_glob.allocation_id))
    assert again.released == []
    await assert_balanced(tc, d)
