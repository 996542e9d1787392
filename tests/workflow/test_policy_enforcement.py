"""The policy hierarchy enforced end to end against a real server (Global > Domain > Supervisor).

Every test works in domains of its own and never changes the shared orchestrator's policy (the
global examples run in ``tests/e2e/test_policy_cli.py`` against a server of their own). A refusal
must name the level that decided and its rule, and leave nothing behind: no child, no slice, no
count at any level, no agent workflow, no operation workflow still running.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res, shape
from tetrarch.decisions import PolicyCheck
from tetrarch.errors import NotFound, PolicyConflict, PolicyDenied
from tetrarch.level import LevelState
from tetrarch.models import AgentStatus, ChildStatus, LevelRef, LevelView, PoolView
from tetrarch.names import Level, TaskQueues
from tetrarch.operations import (
    AgentResult,
    CreateDomainRequest,
    CreateSupervisorRequest,
    EntitySettings,
    LevelInput,
    RemoveDomainRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.policy import AgentLimits, OperationType, Policy
from tetrarch.resources import Resources, total
from tetrarch_cli.client import TetrarchClient
from workflows.levels import ManagerWorkflow

HALF = Resources.of(cpu=0.5, memory="512Mi")
QUARTER = Resources.of(cpu=0.25, memory="256Mi")


def cpu_cap(cpu: float | str, memory: str = "64Gi") -> AgentLimits:
    """A per-agent cap on CPU (memory capped generously: a cap with no memory would allow none)."""
    return AgentLimits(max_resources=Resources.of(cpu=cpu, memory=memory))


async def new_domain(tc: TetrarchClient, tag: str, supervisors: dict[str, Resources],
                     resources: Resources | None = None, policy: Policy | None = None) -> str:
    """A domain of its own (20 CPU unless told) with the given supervisors (no policy of their own)."""
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=resources or res(20), policy=policy or Policy()))
    await asyncio.gather(*(tc.create_supervisor(CreateSupervisorRequest(domain=d, name=name, resources=r))
                           for name, r in supervisors.items()))
    return d


async def orchestrator(tc: TetrarchClient) -> LevelView:
    return await tc.describe(LevelRef.orchestrator())


async def agent_workflow_exists(client: Client, d: str, name: str) -> bool:
    try:
        await client.get_workflow_handle(f"agent/{d}/{name}").describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def books(tc: TetrarchClient, d: str, supervisors: list[str]) -> dict[str, Any]:
    """What a refusal must leave unchanged: every level's shape and the agents each counts."""
    dom = await tc.domain_status(d)
    sups = [await tc.supervisor_status(d, s) for s in supervisors]
    return {"orchestrator_agents": (await orchestrator(tc)).agents, "manager_agents": dom.agents,
            "manager": shape(dom), **{f"supervisor {v.name}": shape(v) for v in sups}}


async def assert_refused_cleanly(tc: TetrarchClient, client: Client, d: str, supervisors: list[str],
                                 before: dict[str, Any], agent: str, running: set[str]) -> None:
    """The refused spawn of ``agent`` left nothing: same books, no agent workflow, no operation running."""
    assert await books(tc, d, supervisors) == before
    assert not await agent_workflow_exists(client, d, agent), f"agent/{d}/{agent} exists after its refusal"
    with pytest.raises(NotFound):
        await tc.agent_status(d, agent)
    await assert_only_entities_running(client, d, {f"manager/{d}", *(f"supervisor/{d}/{s}" for s in supervisors),
                                                   *(f"agent/{d}/{a}" for a in running)})


async def spawn(tc: TetrarchClient, d: str, sup: str, name: str, resources: Resources) -> AgentResult:
    return await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor=sup, name=name, resources=resources))


# -- the seed's examples ------------------------------------------------------------------------------


async def test_seed_examples_name_the_deciding_level_and_leave_nothing_behind(tc: TetrarchClient,
                                                                               client: Client) -> None:
    """Domain 100 CPU at `standard` (10% per agent), supervisor 10 CPU at `standard` (5% = 0.5 CPU)."""
    d = await new_domain(tc, "seed", {"s1": res(10)}, resources=res(100))
    dom = await tc.set_policy(SetPolicyRequest(domain=d, template="standard"))
    assert dom.applied and dom.policy.template == "standard" and dom.policy.version == 2
    assert dom.policy.agent.max_share is not None and dom.policy.agent.max_share.cpu_pct == 10
    sup = await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", template="standard"))
    assert sup.applied and sup.conflicts == [] and sup.policy.version == 2
    assert sup.policy.agent.max_share is not None and sup.policy.agent.max_share.cpu_pct == 5
    assert (await tc.supervisor_status(d, "s1")).policy == sup.policy
    # The manager keeps its record of the supervisor's policy in step.
    assert [c.policy for c in (await tc.domain_status(d)).children] == [sup.policy]

    # 1 CPU: the domain allows it (10 CPU), the supervisor does not (0.5 CPU): the supervisor decides.
    before = await books(tc, d, ["s1"])
    with pytest.raises(PolicyDenied) as e:
        await spawn(tc, d, "s1", "big", res(1))
    assert e.value.level == "supervisor" and e.value.entity == f"supervisor/{d}/s1"
    assert e.value.data["rule"] == "agent.max_share"
    assert "500m CPU" in e.value.message, e.value.message
    await assert_refused_cleanly(tc, client, d, ["s1"], before, "big", set())

    # 0.5 CPU is within both.
    small = await spawn(tc, d, "s1", "small", HALF)
    assert small.created and small.agent.resources == HALF
    assert (await tc.agent_status(d, "small")).status is AgentStatus.RUNNING
    assert (await tc.domain_status(d)).agents == 1

    # The domain caps one agent at 0.25 CPU: it refuses 0.5 CPU although the supervisor allows it.
    tight = dom.policy.model_copy(update={"agent": AgentLimits(max_resources=Resources.of(cpu=0.25, memory="64Gi"),
                                                                max_share=dom.policy.agent.max_share)})
    changed = await tc.set_policy(SetPolicyRequest(domain=d, policy=tight))
    assert changed.applied and changed.policy.version == 3 and changed.previous_version == 2
    assert changed.children_in_conflict == ["s1"], "s1's own 0.5 CPU cap now loosens the domain's 0.25"
    assert len(changed.agents_refused) == 1 and changed.agents_refused[0].startswith(f"{d}/small:")

    before = await books(tc, d, ["s1"])
    with pytest.raises(PolicyDenied) as e2:
        await spawn(tc, d, "s1", "half", HALF)
    assert e2.value.level == "manager" and e2.value.entity == f"manager/{d}"
    assert e2.value.data["rule"] == "agent.max_resources" and "250m CPU" in e2.value.message
    await assert_refused_cleanly(tc, client, d, ["s1"], before, "half", {"small"})

    # Both refuse 1 CPU: the higher level (the domain) is named.
    with pytest.raises(PolicyDenied) as e3:
        await spawn(tc, d, "s1", "big", res(1))
    assert e3.value.level == "manager" and e3.value.data["rule"] == "agent.max_resources"
    await assert_refused_cleanly(tc, client, d, ["s1"], before, "big", {"small"})

    # 0.25 CPU passes every level.
    await spawn(tc, d, "s1", "quarter", QUARTER)
    assert [c.name for c in await tc.list_agents(d, "s1")] == ["quarter", "small"]
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


# -- live counts ---------------------------------------------------------------------------------------


async def test_domain_max_agents_counts_agents_in_and_out(tc: TetrarchClient, client: Client) -> None:
    """max_agents 3 at the domain: the 4th spawn is refused by the manager; a stop makes room again."""
    d = await new_domain(tc, "maxag", {"s1": res(4), "s2": res(4)})
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(max_agents=3)))
    orch0 = (await orchestrator(tc)).agents
    for name, sup in (("a1", "s1"), ("a2", "s1"), ("a3", "s2")):
        await spawn(tc, d, sup, name, res(1))
    assert (await tc.domain_status(d)).agents == 3
    assert (await orchestrator(tc)).agents == orch0 + 3

    before = await books(tc, d, ["s1", "s2"])
    with pytest.raises(PolicyDenied) as e:
        await spawn(tc, d, "s2", "a4", res(1))  # s2 has room: only the domain's count refuses
    assert e.value.level == "manager" and e.value.data["rule"] == "max_agents"
    assert "at most 3 agents" in e.value.message
    await assert_refused_cleanly(tc, client, d, ["s1", "s2"], before, "a4", {"a1", "a2", "a3"})

    await tc.stop_agent(StopAgentRequest(domain=d, name="a2"))
    assert (await tc.domain_status(d)).agents == 2
    assert (await orchestrator(tc)).agents == orch0 + 2
    await spawn(tc, d, "s2", "a4", res(1))
    assert (await tc.domain_status(d)).agents == 3
    with pytest.raises(PolicyDenied):
        await spawn(tc, d, "s1", "a5", res(1))

    # Concurrent spawns against the live count: exactly the room left is admitted.
    await asyncio.gather(*(tc.stop_agent(StopAgentRequest(domain=d, name=a)) for a in ("a1", "a3", "a4")))
    assert (await tc.domain_status(d)).agents == 0
    outcomes = await asyncio.gather(*(spawn(tc, d, f"s{i % 2 + 1}", f"c{i}", res(1)) for i in range(6)),
                                    return_exceptions=True)
    admitted = [o for o in outcomes if isinstance(o, AgentResult)]
    refused = [o for o in outcomes if isinstance(o, PolicyDenied)]
    assert len(admitted) == 3 and len(refused) == 3, outcomes
    assert all(r.level == "manager" and r.data["rule"] == "max_agents" for r in refused)
    running = {o.agent.name for o in admitted}
    assert (await tc.domain_status(d)).agents == 3
    assert (await orchestrator(tc)).agents == orch0 + 3
    assert {c.name for s in ("s1", "s2") for c in await tc.list_agents(d, s)} == running
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"supervisor/{d}/s2",
                                                   *(f"agent/{d}/{a}" for a in running)})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
    assert (await orchestrator(tc)).agents == orch0


# -- operations ----------------------------------------------------------------------------------------


async def test_domain_denying_kill_refuses_stop_and_the_agent_keeps_running(tc: TetrarchClient,
                                                                          client: Client) -> None:
    d = await new_domain(tc, "nokill", {"s1": res(4)})
    await spawn(tc, d, "s1", "a1", res(1))
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(denied_operations=frozenset({OperationType.KILL}))))
    before = await books(tc, d, ["s1"])

    with pytest.raises(PolicyDenied) as e:
        await tc.stop_agent(StopAgentRequest(domain=d, name="a1"))
    assert e.value.level == "manager" and e.value.entity == f"manager/{d}"
    assert e.value.data["rule"] == "denied_operations" and "kill" in e.value.message

    assert await books(tc, d, ["s1"]) == before
    a1 = await tc.agent_status(d, "a1")
    assert a1.status is AgentStatus.RUNNING
    assert [(c.name, c.status) for c in await tc.list_agents(d, "s1")] == [("a1", ChildStatus.ACTIVE)]
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"agent/{d}/a1"})

    # Spawning is not denied; lifting the rule lets the stop through.
    await spawn(tc, d, "s1", "a2", res(1))
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy()))
    await tc.stop_agent(StopAgentRequest(domain=d, name="a1"))
    assert (await tc.domain_status(d)).agents == 1
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


# -- setting policies ----------------------------------------------------------------------------------


async def test_a_loosening_supervisor_policy_is_refused_with_every_conflict(tc: TetrarchClient) -> None:
    d = await new_domain(tc, "loose", {"s1": res(10)})
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(
        max_agents=5, agent=cpu_cap(2, "2Gi"), denied_operations=frozenset({OperationType.EVOLVE}))))
    mine = Policy(max_children=3, agent=cpu_cap(1, "1Gi"))
    await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=mine))
    sup_before = await tc.supervisor_status(d, "s1")
    dom_before = shape(await tc.domain_status(d))
    assert sup_before.policy.version == 2

    # Three loosenings: more agents, more CPU per agent, an operation the domain denies.
    loose = Policy(max_agents=10, agent=cpu_cap(4, "2Gi"),
                   allowed_operations=frozenset({OperationType.SPAWN, OperationType.KILL, OperationType.EVOLVE}))
    with pytest.raises(PolicyConflict) as e:
        await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=loose))
    problems = e.value.problems
    assert e.value.level == "supervisor" and e.value.entity == f"supervisor/{d}/s1"
    assert len(problems) == 3, problems
    assert any(p.startswith("max_agents:") and "10" in p and "5" in p for p in problems), problems
    assert any(p.startswith("agent:") and "cpu" in p for p in problems), problems
    assert any(p.startswith("allowed_operations:") and "evolve" in p for p in problems), problems
    after = await tc.supervisor_status(d, "s1")
    assert after.policy == sup_before.policy and after.policy.version == 2
    assert shape(await tc.domain_status(d)) == dom_before

    # The dry run reports the same conflicts, and changes nothing either.
    dry = await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=loose, dry_run=True))
    assert dry.dry_run and not dry.applied and sorted(dry.conflicts) == sorted(problems)
    assert (await tc.supervisor_status(d, "s1")).policy == sup_before.policy

    # One loosening alone (a higher per-agent cap) is refused too.
    with pytest.raises(PolicyConflict) as e2:
        await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=Policy(agent=cpu_cap(4, "2Gi"))))
    assert len(e2.value.problems) == 1 and "cpu" in e2.value.problems[0]
    assert (await tc.supervisor_status(d, "s1")).policy == sup_before.policy

    # Setting the same rules again changes nothing, not even the version.
    same = await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=mine))
    assert not same.applied and same.policy.version == 2
    assert (await tc.supervisor_status(d, "s1")).policy.version == 2
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_tightening_a_domain_reports_conflicting_supervisors_and_applies_at_once(tc: TetrarchClient) -> None:
    d = await new_domain(tc, "tight", {"s1": res(6), "s2": res(6)})
    await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=Policy(agent=cpu_cap(2, "2Gi"))))
    await spawn(tc, d, "s1", "ok", res(2))  # s1's own cap allows 2 CPU

    r = await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(agent=cpu_cap(1, "2Gi"))))
    assert r.applied and r.conflicts == []
    assert r.children_in_conflict == ["s1"], "s2 has no rules of its own, so it inherits and cannot conflict"
    assert r.agents_refused and r.agents_refused[0].startswith(f"{d}/ok:")
    with pytest.raises(PolicyDenied) as e:
        await spawn(tc, d, "s1", "two", res(2))
    assert e.value.level == "manager" and e.value.data["rule"] == "agent.max_resources"
    assert (await tc.agent_status(d, "ok")).status is AgentStatus.RUNNING, "running agents are not evicted"
    await spawn(tc, d, "s1", "one", res(1))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_dry_run_reports_conflicts_and_refused_agents_and_changes_nothing(tc: TetrarchClient,
                                                                               client: Client) -> None:
    d = await new_domain(tc, "dry", {"s1": res(6)})
    await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", policy=Policy(agent=cpu_cap(2, "2Gi"))))
    await spawn(tc, d, "s1", "a1", res(1))
    await spawn(tc, d, "s1", "a2", res(1))
    before = await books(tc, d, ["s1"])

    r = await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(max_agents=1, agent=cpu_cap(0.5)),
                                             dry_run=True))
    assert r.dry_run and not r.applied and r.previous_version == 1 and r.conflicts == []
    assert r.children_in_conflict == ["s1"]
    # Both hold more than 0.5 CPU; and the second is beyond max_agents 1.
    assert len(r.agents_refused) == 3, r.agents_refused
    assert sum(x.startswith(f"{d}/a1:") for x in r.agents_refused) == 1
    assert sum(x.startswith(f"{d}/a2:") for x in r.agents_refused) == 2
    assert any("max_agents 1" in x for x in r.agents_refused)

    assert await books(tc, d, ["s1"]) == before
    assert (await tc.domain_status(d)).policy == Policy()
    for a in ("a1", "a2"):
        assert (await tc.agent_status(d, a)).status is AgentStatus.RUNNING
    await spawn(tc, d, "s1", "a3", res(1))  # the dry-run policy is not in force
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1",
                                                   *(f"agent/{d}/a{i}" for i in (1, 2, 3))})
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_policy_for_an_unknown_domain_or_supervisor_is_not_found(tc: TetrarchClient) -> None:
    d = await new_domain(tc, "pnf", {"s1": res(2)})
    ghost = domain_name("ghost")
    with pytest.raises(NotFound) as e:
        await tc.set_policy(SetPolicyRequest(domain=ghost, policy=Policy(max_agents=1)))
    assert ghost in str(e.value)
    with pytest.raises(NotFound) as e2:
        await tc.set_policy(SetPolicyRequest(domain=d, supervisor="nope", policy=Policy(max_agents=1)))
    assert f"{d}/nope" in str(e2.value)
    with pytest.raises(NotFound):
        await tc.set_policy(SetPolicyRequest(domain=ghost, supervisor="s1", template="standard", dry_run=True))
    with pytest.raises(NotFound):
        await tc.check(PolicyCheck(operation=OperationType.SPAWN, domain=d, supervisor="nope"))
    assert (await tc.domain_status(d)).policy == Policy()
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


# -- the race ------------------------------------------------------------------------------------------

TIGHT = Policy(agent=cpu_cap(0.5))


async def _assert_books_balance(tc: TetrarchClient, client: Client, d: str, sups: list[str], admitted: set[str],
                                orch0: int) -> None:
    """The manager counts exactly the agents that run, and every level agrees (after a race round)."""
    dom = await tc.domain_status(d)
    assert dom.policy.version == 2 and dom.policy.rules() == TIGHT.rules()
    assert dom.agents == len(admitted)
    assert dom.pool == PoolView(capacity=res(30), granted=res(24), free=res(6)), "agents never take from the domain"
    assert (await orchestrator(tc)).agents == orch0 + len(admitted)
    held: set[str] = set()
    for s in sups:
        v = await tc.supervisor_status(d, s)
        held |= {c.name for c in v.children}
        assert v.pool.granted == total([c.resources for c in v.children])
        assert v.pool.free == res(6).minus(v.pool.granted)
        assert v.agents == len(v.children)
    assert held == admitted
    for name in admitted:
        assert (await tc.agent_status(d, name)).spec.resources == res(1)
    await assert_only_entities_running(client, d, {f"manager/{d}", *(f"supervisor/{d}/{s}" for s in sups),
                                                   *(f"agent/{d}/{a}" for a in admitted)})


async def _race_round(tc: TetrarchClient, client: Client, r: int) -> tuple[str, int, int, int]:
    """Up to 22 concurrent 1-CPU spawns around a tightening to 0.5 CPU per agent, checked against the moment the
    change was acknowledged. Returns (domain, admitted, started after the ack, refused though started before)."""
    sups = [f"s{i}" for i in range(4)]
    d = await new_domain(tc, f"race{r}", {s: res(6) for s in sups}, resources=res(30))
    orch0 = (await orchestrator(tc)).agents
    outcomes: dict[str, tuple[float, AgentResult | BaseException]] = {}
    acked: list[float] = []

    async def one(i: int) -> None:
        name = f"a{i}"
        started = time.monotonic()
        try:
            outcomes[name] = (started, await spawn(tc, d, sups[i % len(sups)], name, res(1)))
        except Exception as e:
            outcomes[name] = (started, e)

    async def tighten() -> None:
        result = await tc.set_policy(SetPolicyRequest(domain=d, policy=TIGHT))
        acked.append(time.monotonic())  # the change is acknowledged: SetPolicy returned
        assert result.applied and result.policy.version == 2

    tasks = [asyncio.create_task(one(i)) for i in range(4)]  # ahead of the change
    change = asyncio.create_task(tighten())
    i = 4
    while not change.done() and i < 18:  # spread over the time the change takes to apply
        await asyncio.sleep(0.08)
        tasks.append(asyncio.create_task(one(i)))
        i += 1
    await change
    tasks += [asyncio.create_task(one(j)) for j in range(i, i + 4)]  # after the acknowledgement
    await asyncio.gather(*tasks)
    ack = acked[0]

    admitted = {n for n, (_, o) in outcomes.items() if isinstance(o, AgentResult)}
    for name, (started, o) in outcomes.items():
        assert isinstance(o, AgentResult | PolicyDenied), f"{name}: unexpected {o!r}"
        if isinstance(o, PolicyDenied):
            assert o.level == "manager" and o.data["rule"] == "agent.max_resources", f"{name}: {o}"
        if started > ack:
            assert isinstance(o, PolicyDenied), f"{name} started {started - ack:.3f}s after the change and ran"
        if isinstance(o, AgentResult):
            assert started < ack, f"{name} was admitted although started after the change"
            assert o.agent.resources == res(1)

    await _assert_books_balance(tc, client, d, sups, admitted, orch0)
    after = sum(1 for started, _ in outcomes.values() if started > ack)
    lost = sum(1 for started, o in outcomes.values() if started < ack and isinstance(o, PolicyDenied))
    return d, len(admitted), after, lost


async def test_no_spawn_started_after_a_tightening_is_acknowledged_is_admitted(tc: TetrarchClient,
                                                                             client: Client) -> None:
    rounds = [await _race_round(tc, client, r) for r in range(3)]
    summary = [(admitted, after, lost) for _, admitted, after, lost in rounds]
    assert all(after >= 4 for _, after, _ in summary), summary
    assert sum(admitted for admitted, _, _ in summary) > 0, f"no spawn won the race in any round: {summary}"
    orch0 = (await orchestrator(tc)).agents
    await asyncio.gather(*(tc.remove_domain(RemoveDomainRequest(domain=d, drain=True)) for d, *_ in rounds))
    assert (await orchestrator(tc)).agents == orch0 - sum(admitted for admitted, _, _ in summary)


# -- the decision cache --------------------------------------------------------------------------------


async def test_decision_cache_hits_and_a_policy_change_is_never_served_stale(tc: TetrarchClient, client: Client,
                                                                           prefix: str) -> None:
    """A manager started with a long TTL: equal spawns hit; after a change the next decision is fresh."""
    d = domain_name("cache")
    now = datetime.now(UTC)
    # Start the domain's manager ourselves with a one-hour TTL; CreateDomain then finds it running.
    await client.start_workflow(
        ManagerWorkflow.run, LevelInput(
            level_state=LevelState(level=Level.MANAGER, name=d, domain=d, capacity=res(20), created_at=now,
                                   updated_at=now),
            settings=EntitySettings(policy_cache_ttl_seconds=3600)),
        id=f"manager/{d}", task_queue=TaskQueues(prefix).manager)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(20)))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s1", resources=res(10)))

    async def stats() -> tuple[int, int]:
        cache = (await tc.domain_status(d)).policy_cache
        assert cache is not None and cache.ttl_seconds == 3600
        return cache.hits, cache.misses

    assert await stats() == (0, 0)
    await spawn(tc, d, "s1", "a1", HALF)
    assert await stats() == (0, 1)
    await spawn(tc, d, "s1", "a2", HALF)
    await spawn(tc, d, "s1", "a3", HALF)
    assert await stats() == (2, 1), "equal spawns of other agents are judged by the cached decision"

    # A change bumps the version: the very next equal spawn, well within the TTL, is judged afresh.
    await tc.set_policy(SetPolicyRequest(domain=d, policy=TIGHT))
    await spawn(tc, d, "s1", "a4", HALF)
    assert await stats() == (2, 2), "after the change the decision was made afresh"
    await spawn(tc, d, "s1", "a5", HALF)
    assert await stats() == (3, 2)
    with pytest.raises(PolicyDenied) as e:
        await spawn(tc, d, "s1", "a6", res(1))
    assert e.value.level == "manager" and "v2" in e.value.message

    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy()))
    await spawn(tc, d, "s1", "a6", res(1))
    await spawn(tc, d, "s1", "a7", HALF)  # v3: not served by the v2 (or v1) decision
    assert await stats() == (3, 4)
    cache = (await tc.domain_status(d)).policy_cache
    assert cache is not None and cache.hit_rate == pytest.approx(3 / 7)
    assert (await tc.domain_status(d)).agents == 7
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_shared_ttl_cache_counts_lookups_and_follows_a_change(tc: TetrarchClient) -> None:
    """With the default TTL: every admission is a lookup, and a changed policy decides the next spawn."""
    d = await new_domain(tc, "cachedef", {"s1": res(6)})
    first = (await tc.domain_status(d)).policy_cache
    assert first is not None and first.ttl_seconds == pytest.approx(0.1)
    await asyncio.gather(*(spawn(tc, d, "s1", f"a{i}", HALF) for i in range(3)))
    second = (await tc.domain_status(d)).policy_cache
    assert second is not None and second.hits + second.misses == first.hits + first.misses + 3
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(agent=cpu_cap(0.25))))
    with pytest.raises(PolicyDenied) as e:
        await spawn(tc, d, "s1", "a9", HALF)
    assert e.value.level == "manager"
    await spawn(tc, d, "s1", "a8", QUARTER)
    third = (await tc.domain_status(d)).policy_cache
    assert third is not None and third.misses == second.misses + 1, "a new policy version is a new key"
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


# -- what-if -------------------------------------------------------------------------------------------


async def test_what_if_check_gives_every_levels_verdict_and_changes_nothing(tc: TetrarchClient) -> None:
    d = await new_domain(tc, "whatif", {"s1": res(10)})
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(max_agents=2, agent=cpu_cap(0.5))))
    await tc.set_policy(SetPolicyRequest(domain=d, supervisor="s1", template="standard"))  # 5% of 10 = 0.5
    await spawn(tc, d, "s1", "a1", QUARTER)
    before = await books(tc, d, ["s1"])

    denied = await tc.check(PolicyCheck(operation=OperationType.SPAWN, domain=d, supervisor="s1", resources=res(1)))
    assert not denied.allowed
    assert (denied.level, denied.entity, denied.rule) == ("manager", f"manager/{d}", "agent.max_resources")
    assert [(v.level, v.entity, v.allowed, v.rule) for v in denied.verdicts] == [
        ("orchestrator", "orchestrator", True, ""),
        ("manager", f"manager/{d}", False, "agent.max_resources"),
        ("supervisor", f"supervisor/{d}/s1", False, "agent.max_share"),
    ]
    assert all(v.reason for v in denied.verdicts if not v.allowed)

    allowed = await tc.check(PolicyCheck(operation=OperationType.SPAWN, domain=d, supervisor="s1",
                                         resources=QUARTER))
    assert allowed.allowed and allowed.level == "" and len(allowed.verdicts) == 3
    assert all(v.allowed for v in allowed.verdicts)

    # Live counts are judged too: one more agent fits, two do not.
    assert (await tc.check(PolicyCheck(operation=OperationType.BATCH_SPAWN, domain=d, supervisor="s1",
                                       resources=QUARTER, count=1))).allowed
    crowded = await tc.check(PolicyCheck(operation=OperationType.BATCH_SPAWN, domain=d, supervisor="s1",
                                         resources=QUARTER, count=2))
    assert not crowded.allowed and (crowded.level, crowded.rule) == ("manager", "max_agents")

    # A domain-only check stops at the manager.
    dom_only = await tc.check(PolicyCheck(operation=OperationType.SPAWN, domain=d, resources=res(1)))
    assert [v.level for v in dom_only.verdicts] == ["orchestrator", "manager"] and dom_only.level == "manager"

    assert await books(tc, d, ["s1"]) == before
    assert not await agent_workflow_exists(tc.client, d, "a2")
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
