"""The other resource operations against a real server: spawn with escalation, placement, balancing,
reclaiming and quota enforcement.

Each test works in a domain of its own and ends like the allocation tests: the conservation audit over
its domain and the orchestrator, no operation workflow left running, the domain removed and the
global pool back where it was.
"""

from __future__ import annotations

import pytest
from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import eventually, res
from tests.workflow.test_allocation import ZERO, cores, cpu, finish, moved, new_domain, orchestrator_pool, pools
from tetrarch.agent import AgentState
from tetrarch.errors import CapacityExceeded, InvalidRequest, NotFound
from tetrarch.models import AgentStatus, ChildView
from tetrarch.operations import CreateDomainRequest, SpawnAgentRequest, StopAgentRequest
from tetrarch.policy import PlacementStrategy, Policy, QuotaAction, ReclaimMode, ResourcePolicy
from tetrarch.resource_ops import (
    AllocateRequest,
    BalanceRequest,
    CapacityMove,
    QuotaOutcome,
    ReclaimRequest,
    ReleaseRequest,
)
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient


async def spawn(tc: TetrarchClient, d: str, name: str, resources: Resources, supervisor: str | None = "s1",
                priority: int = 0, placement: PlacementStrategy | None = None) -> str:
    """Spawn ``name`` and return the supervisor it runs under."""
    got = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor=supervisor, name=name, resources=resources,
                                                 priority=priority, placement=placement))
    assert got.created and got.supervisor is not None
    return got.supervisor


async def child(tc: TetrarchClient, d: str, agent: str, supervisor: str = "s1") -> ChildView | None:
    """The supervisor's view of one agent (None once it is gone)."""
    return next((c for c in await tc.list_agents(d, supervisor) if c.name == agent), None)


async def seen_use(tc: TetrarchClient, d: str, agent: str, used: Resources) -> None:
    """Report what ``agent`` uses and wait until its supervisor has heard it."""
    await tc.report_usage(d, agent, used)
    view = await eventually(lambda: child(tc, d, agent), lambda c: c is not None and c.used == used)
    assert view is not None and view.used == used


async def final_state(client: Client, d: str, agent: str) -> AgentState:
    state: AgentState = await client.get_workflow_handle(f"agent/{d}/{agent}", result_type=AgentState).result()
    return state


# -- spawn with escalation ------------------------------------------------------------------------------


async def test_spawn_borrows_what_its_supervisor_cannot_pay(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "spawnb", res(10), {"s1": res(2)})
    p0 = await pools(tc, d)

    small = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(1)))
    assert small.borrowed == ZERO, "paid by the supervisor alone"
    big = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(3)))
    assert big.borrowed == res(2) and big.agent.resources == res(3) and big.supervisor == "s1"
    p1 = await pools(tc, d)
    moved(p0["s1"], p1["s1"], granted=res(2), borrowed=res(2))
    moved(p0["domain"], p1["domain"], granted=res(2), lent=res(2))
    assert p1["orchestrator"] == p0["orchestrator"]

    # The domain has 6 free: a 9-CPU agent takes them and borrows 3 from global.
    huge = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a3", resources=res(9)))
    assert huge.borrowed == res(9)
    p2 = await pools(tc, d)
    moved(p1["domain"], p2["domain"], granted=res(6), borrowed=res(3), lent=res(6))
    moved(p1["orchestrator"], p2["orchestrator"], granted=res(3), lent=res(3))
    grants = (await tc.allocations(d, "a3")).grants
    assert [(g.spawn, g.own, g.borrowed) for g in grants] == [(True, ZERO, res(9))]
    report = await tc.audit([d])
    assert report.ok, report.problems

    await tc.stop_agent(StopAgentRequest(domain=d, name="a3"))
    assert await pools(tc, d) == p1
    await tc.stop_agent(StopAgentRequest(domain=d, name="a2"))
    p3 = await pools(tc, d)
    moved(p0["s1"], p3["s1"], granted=res(1))
    assert p3["domain"] == p0["domain"], "the borrowed part went back to the domain"
    await finish(tc, client, d, g0)


# -- placement ------------------------------------------------------------------------------------------


async def test_placement_follows_the_domain_strategy(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "place", res(20), {"s1": res(4), "s2": res(4), "s3": res(4)},
                         policy=Policy(resources=ResourcePolicy(placement=PlacementStrategy.BIN_PACK)))
    await spawn(tc, d, "x1", res(2), "s1")
    await spawn(tc, d, "x2", res(1), "s2")
    # free: s1 2, s2 3, s3 4
    assert await spawn(tc, d, "p1", res(1), None) == "s1", "bin-pack: the fullest that fits"
    assert await spawn(tc, d, "p2", res(1), None, placement=PlacementStrategy.SPREAD) == "s3", "spread: the emptiest"
    # free: s1 1, s2 3, s3 3: 1.5 CPU no longer fits s1; s2 and s3 tie, the first name wins.
    assert await spawn(tc, d, "p3", cores(1.5), None) == "s2"
    # free: s1 1, s2 1.5, s3 3: nothing fits 5 CPU; the most headroom is taken and the rest borrowed.
    placed = await tc.spawn_agent(SpawnAgentRequest(domain=d, name="p4", resources=res(5)))
    assert placed.supervisor == "s3" and placed.borrowed == res(2)
    for sup, agents in {"s1": ["p1", "x1"], "s2": ["p3", "x2"], "s3": ["p2", "p4"]}.items():
        assert sorted(c.name for c in await tc.list_agents(d, sup)) == agents
        for a in agents:
            assert (await tc.agent_status(d, a)).spec.supervisor == sup

    # A domain without supervisors has nowhere to place an agent.
    g1 = await orchestrator_pool(tc)
    empty = domain_name("place-none")
    await tc.create_domain(CreateDomainRequest(domain=empty, resources=res(4)))
    before = await pools(tc, empty)
    with pytest.raises(NotFound) as e:
        await tc.spawn_agent(SpawnAgentRequest(domain=empty, name="lost", resources=res(1)))
    assert e.value.level == "manager" and e.value.entity == f"manager/{empty}"
    assert "no active supervisor" in e.value.message
    assert await pools(tc, empty) == before
    assert (await tc.domain_status(empty)).agents == 0
    await finish(tc, client, empty, g1)
    await finish(tc, client, d, g0)


# -- balance --------------------------------------------------------------------------------------------


async def test_balance_moves_free_capacity_to_the_borrower(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "bal", res(20), {"s1": res(2), "s2": res(6)})
    await spawn(tc, d, "a1", res(1), "s1")
    await spawn(tc, d, "a2", res(1), "s2")
    await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(3)))  # s1 pays 1, borrows 2
    p0 = await pools(tc, d)
    assert p0["s1"].borrowed == res(2) and p0["s1"].free == ZERO and p0["s2"].free == res(5)
    slices0 = {c.name: c.resources for c in (await tc.domain_status(d)).children}

    dry = await tc.balance(BalanceRequest(domain=d, dry_run=True))
    assert dry.planned == [CapacityMove(source="s2", target="s1", resources=res(2))]
    assert dry.done == [] and dry.skipped == []
    assert await pools(tc, d) == p0

    done = await tc.balance(BalanceRequest(domain=d))
    assert done.done == done.planned == dry.planned and done.skipped == []
    p1 = await pools(tc, d)
    assert p1["s1"].capacity == res(4) and p1["s2"].capacity == res(4)
    assert p1["s2"].granted.fits_in(p1["s2"].capacity)
    assert p1["domain"] == p0["domain"], "the domain's carved total and loans are unchanged"
    slices1 = {c.name: c.resources for c in (await tc.domain_status(d)).children}
    assert slices1 == {"s1": res(4), "s2": res(4)}
    assert slices1["s1"] + slices1["s2"] == slices0["s1"] + slices0["s2"]
    report = await tc.audit([d])
    assert report.ok, report.problems

    # The donor never goes below what it has granted: s1 now borrows 5, s2 has only 3 to give.
    await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(5)))  # s1 pays 2, borrows 3
    assert (await pools(tc, d))["s1"].borrowed == res(5)
    more = await tc.balance(BalanceRequest(domain=d))
    assert more.done == [CapacityMove(source="s2", target="s1", resources=res(3))]
    p2 = await pools(tc, d)
    assert p2["s2"].capacity == p2["s2"].granted == res(1) and p2["s2"].free == ZERO
    assert p2["s1"].capacity == res(7)
    assert (await tc.balance(BalanceRequest(domain=d))).planned == [], "no donor left"
    await finish(tc, client, d, g0)


async def test_a_second_balance_right_after_the_first_moves_nothing(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "bal2", res(20), {"s1": res(2), "s2": res(6)})
    await spawn(tc, d, "a1", res(1), "s1")
    await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(3)))  # s1 borrows 2
    first = await tc.balance(BalanceRequest(domain=d))
    assert first.done == [CapacityMove(source="s2", target="s1", resources=res(2))]
    second = await tc.balance(BalanceRequest(domain=d))  # nothing changed in between
    p = await pools(tc, d)
    await finish(tc, client, d, g0)
    # s1 now has 2 free and still borrows 2: it is handed another 2 (s2 drops to 2 CPU).
    assert second.planned == [], (second.planned, p["s1"], p["s2"])


# -- reclaim --------------------------------------------------------------------------------------------


async def lending_domain(tc: TetrarchClient, tag: str, policy: Policy | None = None) -> tuple[str, str]:
    """A 10-CPU domain, s1 2 CPU, a1 1 CPU with an extra 4-CPU allocation of which the domain lends 3.

    Returns the domain and the allocation's key.
    """
    d = await new_domain(tc, tag, res(10), {"s1": res(2)}, policy=policy)
    await spawn(tc, d, "a1", res(1))
    x = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(4)))
    assert x.parts == {"supervisor": res(1), "manager": res(3)}
    dom = (await pools(tc, d))["domain"]
    assert dom.lent == res(3) and dom.free == res(5)
    return d, x.key


async def test_reclaim_takes_back_an_idle_loan(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d, key = await lending_domain(tc, "recl")
    with pytest.raises(InvalidRequest):
        await tc.reclaim(ReclaimRequest(domain=d, resources=ZERO))
    enough = await tc.reclaim(ReclaimRequest(domain=d, resources=res(5)))
    assert enough.satisfied and enough.released == [] and enough.free == res(5)

    await seen_use(tc, d, "a1", Resources.of(cpu=0.5, memory="512Mi"))  # its spawn allocation covers it
    got = await tc.reclaim(ReclaimRequest(domain=d, resources=res(7)))
    assert got.target == f"manager/{d}" and got.released == [key] and got.preempted == []
    assert got.satisfied and not got.refusing_new_loans and got.free == res(8)
    p = await pools(tc, d)
    assert p["domain"].lent == ZERO and p["domain"].reclaiming is None and p["domain"].free == res(8)
    assert p["s1"].borrowed == ZERO and p["s1"].granted == res(1)
    assert (await tc.allocations(d, "a1")).agent.resources == res(1)
    await finish(tc, client, d, g0)


async def test_reclaim_leaves_a_borrower_what_it_uses(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d, _ = await lending_domain(tc, "recl-busy")
    used = Resources.of(cpu=1.5, memory="1536Mi")  # more than the 1-CPU spawn allocation alone
    await seen_use(tc, d, "a1", used)
    got = await tc.reclaim(ReclaimRequest(domain=d, resources=res(7)))
    holds = (await tc.allocations(d, "a1")).agent.resources
    await seen_use(tc, d, "a1", Resources.of(cpu=0.5, memory="512Mi"))  # within what it holds now
    await finish(tc, client, d, g0)
    # The 4-CPU allocation was taken back: a1 holds 1 CPU and uses 1.5.
    assert used.fits_in(holds), (got.released, holds)


async def test_reclaim_refuses_new_loans_until_enough_is_back(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d, key = await lending_domain(tc, "refuse")
    await seen_use(tc, d, "a1", res(5))  # everything it holds: not idle
    got = await tc.reclaim(ReclaimRequest(domain=d, resources=res(7)))
    assert not got.satisfied and got.refusing_new_loans
    assert got.released == [] and got.preempted == [] and got.free == res(5)
    p = await pools(tc, d)
    assert p["domain"].reclaiming == res(7)

    with pytest.raises(CapacityExceeded) as e:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(1)))  # s1 is full: needs a loan
    assert e.value.level == "manager" and "reclaim" in e.value.message
    assert await pools(tc, d) == p
    with pytest.raises(CapacityExceeded):
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a2", resources=res(1)))
    assert await pools(tc, d) == p

    await seen_use(tc, d, "a1", Resources.of(cpu=0.5, memory="512Mi"))
    out = await tc.release(ReleaseRequest(domain=d, agent="a1"))
    assert out.released == [key]
    p = await pools(tc, d)
    assert p["domain"].reclaiming is None and p["domain"].free == res(8)
    x = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(2)))
    assert x.parts == {"supervisor": res(1), "manager": res(1)}, "lending again"
    await finish(tc, client, d, g0)


async def test_reclaim_preempts_the_lowest_priority_borrower(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "preempt", res(10), {"s1": res(2)}, policy=Policy(resources=ResourcePolicy(
        reclaim=ReclaimMode.PREEMPT, preempt_grace_seconds=0.5)))
    await spawn(tc, d, "low", res(5), priority=0)  # s1 pays 2, the domain lends 3
    await spawn(tc, d, "high", res(2), priority=5)  # the domain lends 2
    p0 = await pools(tc, d)
    assert p0["domain"].lent == res(5) and p0["domain"].free == res(3)

    got = await tc.reclaim(ReclaimRequest(domain=d, resources=res(6)))
    assert got.preempted == ["low"] and got.released == [] and got.problems == []
    assert got.satisfied and not got.refusing_new_loans and got.free == res(6)
    assert (await final_state(client, d, "low")).status is AgentStatus.STOPPED
    assert [c.name for c in await tc.list_agents(d, "s1")] == ["high"]
    assert (await tc.agent_status(d, "high")).status is AgentStatus.RUNNING
    p1 = await pools(tc, d)
    assert p1["domain"].lent == res(2) and p1["domain"].reclaiming is None
    assert p1["s1"].borrowed == res(2) and p1["s1"].granted == ZERO
    await finish(tc, client, d, g0)


# -- quotas ---------------------------------------------------------------------------------------------


def quota_policy(action: QuotaAction | None) -> Policy:
    return Policy(resources=ResourcePolicy(quota_action=action, quota_grace_seconds=0.5))


async def outcomes(client: Client, d: str) -> list[QuotaOutcome]:
    """The EnforceAgentQuotas runs of domain ``d``, each finished, with what they did."""
    out = []
    async for wf in client.list_workflows(f"WorkflowType='EnforceAgentQuotas' AND Domain='{d}'"):
        assert wf.id.startswith(f"enforce-quotas/{d}/"), wf.id
        out.append(await client.get_workflow_handle(wf.id, result_type=QuotaOutcome).result())
    return out


async def test_quota_throttle(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "q-throttle", res(10), {"s1": res(4)}, policy=quota_policy(QuotaAction.THROTTLE))
    await spawn(tc, d, "a1", res(1))
    await tc.report_usage(d, "a1", res(2))
    state = await eventually(lambda: tc.agent_status(d, "a1"), lambda s: s.throttled, within=15)
    assert state.throttled and state.status is AgentStatus.RUNNING and "throttled" in state.status_reason
    view = await child(tc, d, "a1")
    assert view is not None and view.over_quota_since is not None and view.quota_action == "throttle"
    assert view.used == res(2) and view.resources == res(1)
    done = await eventually(lambda: outcomes(client, d), lambda o: len(o) == 1)
    assert [(o.agent, o.action, o.decided_by) for o in done] == [("a1", QuotaAction.THROTTLE, "manager")]

    await tc.report_usage(d, "a1", Resources.of(cpu=0.5, memory="512Mi"))
    back = await eventually(lambda: child(tc, d, "a1"), lambda c: c is not None and c.over_quota_since is None)
    assert back is not None and back.over_quota_since is None and back.quota_action is None
    # Back within its allocation, the agent is let go again by its supervisor.
    lifted = await eventually(lambda: tc.agent_status(d, "a1"), lambda s: not s.throttled, within=15)
    assert not lifted.throttled and "back within its allocation" in lifted.status_reason
    await finish(tc, client, d, g0)


async def test_quota_stop_releases_everything(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "q-stop", res(10), {"s1": res(2)}, policy=quota_policy(QuotaAction.STOP))
    await spawn(tc, d, "keep", cores(0.5))
    before = await pools(tc, d)
    await spawn(tc, d, "a1", res(3))  # borrows 1.5 from the domain
    await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=cpu(1)))
    await tc.report_usage(d, "a1", res(8))
    gone = await eventually(lambda: child(tc, d, "a1"), lambda c: c is None, within=15)
    assert gone is None
    assert (await final_state(client, d, "a1")).status is AgentStatus.STOPPED
    assert await pools(tc, d) == before
    done = await eventually(lambda: outcomes(client, d), lambda o: len(o) == 1)
    assert [(o.agent, o.action) for o in done] == [("a1", QuotaAction.STOP)]
    assert (await tc.agent_status(d, "keep")).status is AgentStatus.RUNNING
    await finish(tc, client, d, g0)


async def test_quota_flag_only_flags(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "q-flag", res(10), {"s1": res(4)}, policy=quota_policy(None))
    await spawn(tc, d, "a1", res(1))
    before = await pools(tc, d)
    await tc.report_usage(d, "a1", res(3))
    view = await eventually(lambda: child(tc, d, "a1"), lambda c: c is not None and c.quota_action == "flag",
                            within=15)
    assert view is not None and view.quota_action == "flag" and view.over_quota_since is not None
    done = await eventually(lambda: outcomes(client, d), lambda o: len(o) == 1)
    assert [(o.agent, o.action) for o in done] == [("a1", QuotaAction.FLAG)]
    state = await tc.agent_status(d, "a1")
    assert state.status is AgentStatus.RUNNING and not state.throttled
    assert await pools(tc, d) == before

    await tc.report_usage(d, "a1", res(1))  # exactly its allocation: within it
    back = await eventually(lambda: child(tc, d, "a1"), lambda c: c is not None and c.over_quota_since is None)
    assert back is not None and back.over_quota_since is None and back.quota_action is None
    await finish(tc, client, d, g0)
