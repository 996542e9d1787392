"""Upward reports, the common ManagementLevel face, and the search attributes that tag every entity.

Reports travel agent -> supervisor -> manager -> orchestrator as debounced signals, so the tests
poll (with a generous limit) until the expected figures arrive and then assert them exactly.
Visibility is eventually consistent too, so list queries are polled the same way.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import eventually, res
from tetrarch.models import ChildView, LevelRef, LevelSummary, LevelView, ResourceTotals
from tetrarch.names import Level, SearchAttr
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient
from workflows.common import AGENT_STATUS_KEY, DOMAIN_KEY, LEVEL_KEY, OPERATION_KEY, SUPERVISOR_KEY

#: Query name of the level tag ("level" alone is a keyword of the visibility query language).
LEVEL = SearchAttr.LEVEL



def totals(capacity: Resources, granted: Resources) -> ResourceTotals:
    return ResourceTotals(capacity=capacity, granted=granted)



def figures(report: LevelSummary | None) -> dict[str, Any] | None:
    """The parts of a report the hierarchy adds up."""
    if report is None:
        return None
    return {"supervisors": report.supervisors, "agents_by_status": report.agents_by_status,
            "resources_by_level": report.resources_by_level}


async def domain_report(tc: TetrarchClient, d: str) -> LevelSummary | None:
    """The manager's last report as the orchestrator holds it."""
    child = next((c for c in await tc.list_domains() if c.name == d), None)
    return child.last_report if child is not None else None


async def listed(client: Client, query: str) -> dict[str, dict[str, str | None]]:
    """Workflows matching a visibility query: id -> the project's search attributes."""
    out: dict[str, dict[str, str | None]] = {}
    async for wf in client.list_workflows(query):
        sa = wf.typed_search_attributes
        out[wf.id] = {"Level": sa.get(LEVEL_KEY), "Domain": sa.get(DOMAIN_KEY),
                      "Supervisor": sa.get(SUPERVISOR_KEY), "AgentStatus": sa.get(AGENT_STATUS_KEY),
                      "Operation": sa.get(OPERATION_KEY)}
    return out


async def build(tc: TetrarchClient, tag: str) -> str:
    """Domain of 20 CPU; s1 (6 CPU) with a1 (1) and a2 (2); s2 (4 CPU) with a3 (1)."""
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(20)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(6)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s2", resources=res(4)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(1)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(2)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s2", name="a3", resources=res(1)))
    return d


async def test_reports_reach_every_level(tc: TetrarchClient) -> None:
    """Counts and resource totals add up exactly at supervisor, manager and orchestrator, and follow changes."""
    d = await build(tc, "rep")

    s1_expected = {"supervisors": 1, "agents_by_status": {"running": 2},
                   "resources_by_level": {"supervisor": totals(res(6), res(3)),
                                          "agent": totals(res(3), res(3))}}
    s1 = await eventually(lambda: tc.supervisor_status(d, "s1"), lambda v: figures(v.metrics) == s1_expected)
    assert figures(s1.metrics) == s1_expected
    assert s1.metrics.entity_id == f"supervisor/{d}/s1" and s1.metrics.level is Level.SUPERVISOR
    # Each agent's own report is what its supervisor holds.
    a1 = next(c for c in s1.children if c.name == "a1")
    assert a1.last_report is not None
    assert (a1.last_report.level, a1.last_report.status, a1.last_report.resources) == (Level.AGENT, "running",
                                                                                      res(1))

    domain_expected = {"supervisors": 2, "agents_by_status": {"running": 3},
                       "resources_by_level": {"manager": totals(res(20), res(10)),
                                              "supervisor": totals(res(10), res(4)),
                                              "agent": totals(res(4), res(4))}}
    manager = await eventually(lambda: tc.domain_status(d), lambda v: figures(v.metrics) == domain_expected)
    assert figures(manager.metrics) == domain_expected

    at_top = await eventually(lambda: domain_report(tc, d), lambda r: figures(r) == domain_expected)
    assert figures(at_top) == domain_expected
    assert at_top is not None and at_top.entity_id == f"manager/{d}" and at_top.level is Level.MANAGER
    seq_before = at_top.seq

    # The system view adds up the domains' reports it holds, this one included.
    system = await tc.system_status()
    reports = [c.last_report for c in system.orchestrator.children if c.last_report is not None]
    assert any(r.entity_id == f"manager/{d}" for r in reports)
    assert system.domains == len(system.orchestrator.children)
    assert system.supervisors == sum(r.supervisors for r in reports)
    assert system.agents_by_status.get("running", 0) == sum(r.agents_by_status.get("running", 0) for r in reports)
    assert system.agents_total == sum(system.agents_by_status.values())
    assert system.agents_by_status.get("running", 0) >= 3 and system.supervisors >= 2

    # Changes travel up too: one agent fewer, one supervisor more.
    await tc.stop_agent(StopAgentRequest(domain=d, name="a2"))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s3", resources=res(2)))
    changed = {"supervisors": 3, "agents_by_status": {"running": 2},
               "resources_by_level": {"manager": totals(res(20), res(12)),
                                      "supervisor": totals(res(12), res(2)),
                                      "agent": totals(res(2), res(2))}}
    at_top = await eventually(lambda: domain_report(tc, d), lambda r: figures(r) == changed)
    assert figures(at_top) == changed
    assert at_top is not None and at_top.seq > seq_before
    assert figures((await tc.domain_status(d)).metrics) == changed

    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
    assert await domain_report(tc, d) is None


def _face_keys(dumped: dict[str, Any]) -> dict[str, Any]:
    """The field names of a dumped LevelView, its pool, metrics and children (values dropped)."""
    return {"view": sorted(dumped), "pool": sorted(dumped["pool"]), "metrics": sorted(dumped["metrics"]),
            "pool.capacity": sorted(dumped["pool"]["capacity"]),
            "children": sorted({k for c in dumped["children"] for k in c})}


async def test_every_level_shows_the_same_face(tc: TetrarchClient) -> None:
    """Orchestrator, manager and supervisor all answer the same LevelView, consistent with themselves."""
    d = await build(tc, "face")
    views = {
        Level.ORCHESTRATOR: await tc.describe(LevelRef.orchestrator()),
        Level.MANAGER: await tc.describe(LevelRef.manager(d)),
        Level.SUPERVISOR: await tc.describe(LevelRef.supervisor(d, "s1")),
    }
    expected_ids = {Level.ORCHESTRATOR: "orchestrator", Level.MANAGER: f"manager/{d}",
                    Level.SUPERVISOR: f"supervisor/{d}/s1"}
    expected_scopes = {Level.ORCHESTRATOR: "system", Level.MANAGER: f"domain:{d}",
                       Level.SUPERVISOR: f"supervisor:{d}/s1"}
    child_prefix = {Level.ORCHESTRATOR: "manager/", Level.MANAGER: f"supervisor/{d}/",
                    Level.SUPERVISOR: f"agent/{d}/"}
    face = {"id", "level", "scope", "policy", "pool", "health", "children", "metrics"}
    dumped = {}
    for level, view in views.items():
        assert isinstance(view, LevelView)
        assert view.level is level and view.id == expected_ids[level] and view.scope == expected_scopes[level]
        assert view.metrics.level is level and view.metrics.entity_id == view.id
        assert view.pool.granted == sum((c.resources for c in view.children), Resources())
        assert view.pool.free == view.pool.capacity.minus(view.pool.granted)
        assert view.children, f"{level} has children in this test"
        assert all(isinstance(c, ChildView) and c.entity_id == child_prefix[level] + c.name for c in view.children)
        d_json = view.model_dump(mode="json")
        assert face <= set(d_json)
        dumped[level] = d_json
    # The same fields, nested, at every level.
    shapes = [_face_keys(d_json) for d_json in dumped.values()]
    assert shapes[0] == shapes[1] == shapes[2]

    mgr = views[Level.MANAGER]
    assert [c.name for c in mgr.children] == ["s1", "s2"]
    assert mgr.pool.capacity == res(20) and mgr.pool.granted == res(10)
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_entities_carry_search_attributes(tc: TetrarchClient, client: Client) -> None:
    """Level, Domain, Supervisor and AgentStatus tag the entities; operations carry Operation."""
    d = await build(tc, "sa")

    agents_q = f"Domain='{d}' AND {LEVEL}='agent'"
    agents = await eventually(lambda: listed(client, agents_q),
                              lambda r: len(r) == 3 and all(v["AgentStatus"] == "running" for v in r.values()))
    assert agents == {
        f"agent/{d}/a1": {"Level": "agent", "Domain": d, "Supervisor": "s1", "AgentStatus": "running",
                          "Operation": None},
        f"agent/{d}/a2": {"Level": "agent", "Domain": d, "Supervisor": "s1", "AgentStatus": "running",
                          "Operation": None},
        f"agent/{d}/a3": {"Level": "agent", "Domain": d, "Supervisor": "s2", "AgentStatus": "running",
                          "Operation": None},
    }
    sup_q = f"Domain='{d}' AND {LEVEL}='supervisor'"
    sups = await eventually(lambda: listed(client, sup_q), lambda r: len(r) == 2)
    assert sups == {f"supervisor/{d}/{n}": {"Level": "supervisor", "Domain": d, "Supervisor": n,
                                            "AgentStatus": None, "Operation": None} for n in ("s1", "s2")}
    mgr_q = f"Domain='{d}' AND {LEVEL}='manager'"
    mgrs = await eventually(lambda: listed(client, mgr_q), lambda r: len(r) == 1)
    assert mgrs == {f"manager/{d}": {"Level": "manager", "Domain": d, "Supervisor": None, "AgentStatus": None,
                                     "Operation": None}}
    by_sup_q = f"Domain='{d}' AND Supervisor='s1' AND {LEVEL}='agent'"
    by_sup = await eventually(lambda: listed(client, by_sup_q), lambda r: len(r) == 2)
    assert set(by_sup) == {f"agent/{d}/a1", f"agent/{d}/a2"}
    spawn_q = f"Domain='{d}' AND Operation='SpawnAgent'"
    spawns = await eventually(lambda: listed(client, spawn_q), lambda r: len(r) == 3)
    assert len(spawns) == 3 and all(v["Level"] is None and v["Supervisor"] in ("s1", "s2")
                                    for v in spawns.values())

    # The status tag follows the agent's life.
    await tc.stop_agent(StopAgentRequest(domain=d, name="a2"))
    stopped_q = f"Domain='{d}' AND {LEVEL}='agent' AND AgentStatus='stopped'"
    stopped = await eventually(lambda: listed(client, stopped_q), lambda r: len(r) == 1)
    assert set(stopped) == {f"agent/{d}/a2"}
    running_q = f"Domain='{d}' AND {LEVEL}='agent' AND AgentStatus='running' AND ExecutionStatus='Running'"
    running = await eventually(lambda: listed(client, running_q), lambda r: len(r) == 2)
    assert set(running) == {f"agent/{d}/a1", f"agent/{d}/a3"}
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
