import asyncio

from tests.conftest import domain_name
from tetrarch.operations import CreateDomainRequest, CreateSupervisorRequest, SpawnAgentRequest
from tetrarch.resources import Resources


async def test_create_domain_supervisor_agent(tc):
    d = domain_name()
    r = await tc.create_domain(CreateDomainRequest(domain=d, resources=Resources.of(cpu=20, memory="20Gi")))
    assert r.created
    s = await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=Resources.of(cpu=4, memory="4Gi")))
    assert s.created
    a = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1"))
    assert a.agent.resources == Resources.of(cpu=1, memory="1Gi")
    for _ in range(50):
        st = await tc.system_status()
        dv = await tc.domain_status(d)
        if dv.metrics.agents_by_status.get("running") == 1:
            break
        await asyncio.sleep(0.2)
    print(dv.model_dump_json(indent=1)[:3000])
    assert dv.metrics.agents_by_status == {"running": 1}
