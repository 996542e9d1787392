"""AllocateResources and ReleaseResources against a real server: the seed's example 3.

Each test works in a domain of its own, reads every level's pool and ledger after each step, and
ends with the conservation audit (restricted to its domain plus the orchestrator), a check that no
operation workflow is left running in the domain, and the domain's removal, after which the global
pool must be back where it was before the test. The global pool is shared by the whole session, so
it is only ever compared before/after, never against absolute amounts.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pydantic
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res
from tetrarch.errors import CapacityExceeded, InvalidRequest, NotFound, PolicyDenied, TetrarchError
from tetrarch.models import LevelRef, PoolView
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemoveDomainRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.policy import AgentLimits, OperationType, Policy, ResourceCap, ResourcePolicy
from tetrarch.pools import audit
from tetrarch.resource_ops import AllocateRequest, AllocationResult, ReleaseRequest
from tetrarch.resources import Resources, total
from tetrarch_cli.client import TetrarchClient, error_from_failure
from workflows.resources import AllocateResourcesWorkflow

ZERO = Resources()
GLOBAL = "orchestrator"


def cpu(cores: float) -> Resources:
    """CPU only (no memory)."""
    return Resources.of(cpu=cores)


def cores(n: float) -> Resources:
    """``n`` cores and ``n`` GiB, fractions allowed (``res`` takes whole numbers)."""
    return Resources.of(cpu=n, memory=f"{round(n * 1024)}Mi")


# -- helpers ------------------------------------------------------------------------------------------


async def pools(tc: TetrarchClient, d: str) -> dict[str, PoolView]:
    """Every pool of domain ``d`` keyed 'orchestrator', 'domain' or the supervisor's name; each one is
    checked to be balanced (capacity = granted + free, granted within capacity)."""
    view = await tc.pools([d])
    out: dict[str, PoolView] = {}
    for eid, p in view.pools.items():
        assert p.granted + p.free == p.capacity, f"{eid}: granted {p.granted} + free {p.free} != {p.capacity}"
        assert p.granted.fits_in(p.capacity), f"{eid} is oversubscribed"
        key = GLOBAL if eid == GLOBAL else "domain" if eid == f"manager/{d}" else eid.rsplit("/", 1)[1]
        out[key] = p
    return out


async def orchestrator_pool(tc: TetrarchClient) -> PoolView:
    return (await tc.describe(LevelRef.orchestrator())).pool


def moved(before: PoolView, after: PoolView, granted: Resources = ZERO, borrowed: Resources = ZERO,
          lent: Resources = ZERO) -> None:
    """``after`` is ``before`` with this much more granted, borrowed and lent (same capacity)."""
    assert after.capacity == before.capacity
    assert after.granted == before.granted + granted, (after.granted, before.granted, granted)
    assert after.free + granted == before.free, (after.free, before.free, granted)
    assert after.borrowed == before.borrowed + borrowed, (after.borrowed, before.borrowed, borrowed)
    assert after.lent == before.lent + lent, (after.lent, before.lent, lent)


async def live_entities(tc: TetrarchClient, d: str) -> set[str]:
    """The entity workflows domain ``d``'s ledgers say are alive: its manager, supervisors and agents."""
    out = {f"manager/{d}"}
    for sup in (await tc.domain_status(d)).children:
        out.add(f"supervisor/{d}/{sup.name}")
        out |= {f"agent/{d}/{a.name}" for a in (await tc.supervisor_status(d, sup.name)).children}
    return out


async def finish(tc: TetrarchClient, client: Client, d: str, global_before: PoolView) -> None:
    """Conservation audit, no operation left running, then the domain removed and the global pool back."""
    report = await tc.audit([d])
    assert report.ok, report.problems
    assert report.levels >= 2
    await pools(tc, d)
    await assert_only_entities_running(client, d, await live_entities(tc, d))
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
    assert await orchestrator_pool(tc) == global_before, "the domain's removal did not give everything back"


async def new_domain(tc: TetrarchClient, tag: str, capacity: Resources, supervisors: dict[str, Resources],
                     policy: Policy | None = None, sup_policy: Policy | None = None) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=capacity, policy=policy or Policy()))
    for name, r in supervisors.items():
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name=name, resources=r,
                                                           policy=sup_policy or Policy()))
    return d


async def small_domain(tc: TetrarchClient, tag: str, policy: Policy | None = None) -> str:
    """A 6-CPU domain with one 2-CPU supervisor s1 holding agent a1 (1 CPU)."""
    d = await new_domain(tc, tag, res(6), {"s1": res(2)}, policy)
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(1)))
    return d


async def agent_total(tc: TetrarchClient, d: str, agent: str) -> Resources:
    view = await tc.allocations(d, agent)
    assert view.agent.resources == total([g.size for g in view.grants])
    return view.agent.resources


async def check_filtered_audit(tc: TetrarchClient, d: str, key: str, from_global: Resources) -> None:
    """The audit restricted to ``d`` reads the orchestrator, its manager and its supervisors; the
    orchestrator's grants to other domains are skipped, and its grant for ``key`` is checked."""
    ledgers = await tc.ledgers([d])
    assert {led.entity_id for led in ledgers} == {GLOBAL, f"manager/{d}", f"supervisor/{d}/s1"}
    report = audit(ledgers)
    assert report.ok, report.problems
    assert report.levels == 3
    top = next(led for led in ledgers if led.entity_id == GLOBAL)
    assert [g.size for g in top.grants if g.key == key and g.child == d] == [from_global]
    top.grants = [g for g in top.grants if g.key != key]
    broken = audit(ledgers)
    assert broken.problems == [f"manager/{d} borrowed {from_global.human()} for {key}, "
                               "but orchestrator has no grant for it"]


# -- escalation depths ----------------------------------------------------------------------------------


async def test_each_escalation_depth(tc: TetrarchClient, client: Client) -> None:
    """Served by the supervisor alone, partly by the domain, partly by global, then refused by global."""
    g0 = await orchestrator_pool(tc)
    d = await small_domain(tc, "esc")
    p0 = await pools(tc, d)
    assert p0["s1"] == PoolView(capacity=res(2), granted=res(1), free=res(1))
    assert p0["domain"] == PoolView(capacity=res(6), granted=res(2), free=res(4))

    # 1. The supervisor pays alone.
    by_sup = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(1)))
    assert by_sup.created and by_sup.served_by == "supervisor" and by_sup.parts == {"supervisor": res(1)}
    assert by_sup.supervisor == "s1" and by_sup.agent_total == res(2)
    assert by_sup.key == f"{d}/a1#{by_sup.allocation_id}"
    p1 = await pools(tc, d)
    moved(p0["s1"], p1["s1"], granted=res(1))
    assert p1["domain"] == p0["domain"] and p1[GLOBAL] == p0[GLOBAL]

    # 2. The supervisor is full: the domain lends all 3 CPU.
    by_dom = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(3)))
    assert by_dom.served_by == "manager" and by_dom.parts == {"supervisor": ZERO, "manager": res(3)}
    assert by_dom.agent_total == res(5)
    p2 = await pools(tc, d)
    moved(p1["s1"], p2["s1"], borrowed=res(3))
    moved(p1["domain"], p2["domain"], granted=res(3), lent=res(3))
    assert p2["domain"].free == res(1) and p2[GLOBAL] == p1[GLOBAL]

    # 3. The domain has 1 CPU left: it lends that and borrows the other from global.
    by_glob = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(2)))
    assert by_glob.served_by == "orchestrator"
    assert by_glob.parts == {"supervisor": ZERO, "manager": res(1), "orchestrator": res(1)}
    assert by_glob.agent_total == res(7) == await agent_total(tc, d, "a1")
    p3 = await pools(tc, d)
    moved(p2["s1"], p3["s1"], borrowed=res(2))
    moved(p2["domain"], p3["domain"], granted=res(1), borrowed=res(1), lent=res(1))
    moved(p2[GLOBAL], p3[GLOBAL], granted=res(1), lent=res(1))
    assert p3["s1"].borrowed == res(5) and p3["domain"].free == ZERO and p3["domain"].borrowed == res(1)
    await check_filtered_audit(tc, d, by_glob.key, res(1))

    # 4. More than global has free (but less than the whole system): every level reserves its
    # (empty) share, global refuses, and the compensation leaves every pool as it was.
    ask = Resources(cpu_millis=p3[GLOBAL].free.cpu_millis + 1000, memory_mib=1024)
    assert ask.fits_in(p3[GLOBAL].capacity), "the session's global pool is expected to be partly carved"
    with pytest.raises(CapacityExceeded) as e:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=ask))
    assert e.value.level == "orchestrator" and e.value.entity == "orchestrator"
    assert "cpu" in e.value.message
    assert await pools(tc, d) == p3
    assert await agent_total(tc, d, "a1") == res(7)

    # Releasing gives each part back to the level that paid it.
    released = await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id=by_glob.allocation_id))
    assert released.released == [by_glob.key]
    assert released.returned == {"supervisor": ZERO, "manager": res(1), "orchestrator": res(1)}
    assert await pools(tc, d) == p2
    await finish(tc, client, d, g0)


# -- bad input ---------------------------------------------------------------------------------------------


async def run_raw(client: Client, prefix: str, payload: dict[str, Any]) -> TetrarchError:
    """Start AllocateResources with untyped JSON (as the ``temporal`` CLI would) and return its error."""
    handle = await client.start_workflow("AllocateResources", payload, id=f"raw-allocate/{uuid.uuid4().hex[:8]}",
                                         task_queue=f"{prefix}supervisor")
    with pytest.raises(WorkflowFailureError) as e:
        await asyncio.wait_for(handle.result(), timeout=20)
    cause = e.value.cause
    assert isinstance(cause, ApplicationError) and cause.non_retryable
    return error_from_failure(e.value)


async def test_bad_input_is_refused_with_a_typed_error_and_reserves_nothing(tc: TetrarchClient, client: Client,
                                                                          prefix: str) -> None:
    g0 = await orchestrator_pool(tc)
    d = await small_domain(tc, "badin")
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s2", resources=res(1)))
    before = await pools(tc, d)

    # Zero: refused by the workflow, naming the supervisor level.
    with pytest.raises(InvalidRequest) as zero:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=ZERO))
    assert zero.value.level == "supervisor" and "must ask for some" in zero.value.message

    # Negative and non-numeric: refused by the model at the client...
    with pytest.raises(ValueError, match="negative"):
        Resources.of(cpu=-1)
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 0"):
        AllocateRequest(domain=d, agent="a1", resources=Resources(cpu_millis=-1000))
    with pytest.raises(pydantic.ValidationError, match="cpu"):
        AllocateRequest.model_validate({"domain": d, "agent": "a1", "resources": {"cpu": "lots"}})
    # ...and by the workflow at once when an untyped client sends them.
    for bad, field in (({"cpu": "lots"}, "cpu"), ({"cpu_millis": -5}, "cpu_millis"), ({"memory": "-1Gi"}, "memory")):
        err = await run_raw(client, prefix, {"domain": d, "agent": "a1", "resources": bad})
        assert isinstance(err, InvalidRequest) and field in err.message, err.message

    # Absurd: more than the whole system has, refused by the orchestrator before anything is reserved.
    with pytest.raises(CapacityExceeded) as absurd:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(100_000)))
    assert absurd.value.level == "orchestrator" and "more than the whole system" in absurd.value.message

    # Unknown agent, supervisor, domain; an agent looked up under a supervisor it does not belong to.
    with pytest.raises(NotFound) as agent:
        await tc.allocate(AllocateRequest(domain=d, agent="ghost", resources=res(1)))
    assert agent.value.level == "agent" and "ghost" in agent.value.message
    with pytest.raises(NotFound) as sup:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", supervisor="nope", resources=res(1)))
    assert sup.value.level == "supervisor" and "nope" in sup.value.message
    with pytest.raises(NotFound) as wrong:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", supervisor="s2", resources=res(1)))
    assert wrong.value.level == "supervisor" and "a1" in wrong.value.message
    missing = domain_name("nowhere")
    with pytest.raises(NotFound) as dom:
        await tc.allocate(AllocateRequest(domain=missing, agent="a1", resources=res(1)))
    assert missing in dom.value.message
    with pytest.raises(NotFound) as dom_sup:
        await tc.allocate(AllocateRequest(domain=missing, agent="a1", supervisor="s1", resources=res(1)))
    assert dom_sup.value.level in ("manager", "supervisor") and missing in dom_sup.value.message

    assert await pools(tc, d) == before
    assert await agent_total(tc, d, "a1") == res(1)
    await finish(tc, client, d, g0)


# -- policy -------------------------------------------------------------------------------------------------


async def test_policy_refuses_before_anything_is_reserved(tc: TetrarchClient, client: Client) -> None:
    """A per-agent cap at the domain counts what the agent already holds; a denial at global wins."""
    g0 = await orchestrator_pool(tc)
    d = await small_domain(tc, "pol", Policy(agent=AgentLimits(max_resources=ResourceCap(cpu_millis=3000))))
    await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(1)))  # 2 CPU: within the cap
    before = await pools(tc, d)
    with pytest.raises(PolicyDenied) as e:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(2)))  # 4 CPU: above it
    assert e.value.level == "manager" and e.value.entity == f"manager/{d}"
    assert e.value.data["rule"] == "agent.max_resources" and "3 CPU" in e.value.message
    assert await pools(tc, d) == before
    assert await agent_total(tc, d, "a1") == res(2)
    ok = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=Resources.of(cpu=1, memory="4Gi")))
    assert ok.agent_total == Resources.of(cpu=3, memory="6Gi"), "memory is not capped"

    orch = await tc.describe(LevelRef.orchestrator())
    deny = orch.policy.model_copy(update={"denied_operations": frozenset({OperationType.ALLOCATE})})
    before = await pools(tc, d)
    await tc.set_policy(SetPolicyRequest(policy=deny))
    try:
        for ask in (cores(0.5), res(5)):  # within the domain's cap, and above it: global decides both
            with pytest.raises(PolicyDenied) as g:
                await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=ask))
            assert g.value.level == "orchestrator" and g.value.data["rule"] == "denied_operations"
    finally:
        await tc.set_policy(SetPolicyRequest(policy=orch.policy))
    assert (await tc.describe(LevelRef.orchestrator())).policy.rules() == orch.policy.rules()
    after = await pools(tc, d)
    assert after == before
    await finish(tc, client, d, g0)


# -- idempotency ----------------------------------------------------------------------------------------------


async def test_same_request_id_allocates_once(tc: TetrarchClient, client: Client, prefix: str) -> None:
    g0 = await orchestrator_pool(tc)
    d = await small_domain(tc, "idem")
    before = await pools(tc, d)

    req = AllocateRequest(request_id="r-once", domain=d, agent="a1", resources=res(2))
    first = await tc.allocate(req)
    again = await tc.allocate(req)
    assert again == first and first.created and first.allocation_id == "r-once"
    assert first.parts == {"supervisor": res(1), "manager": res(1)}
    after_one = await pools(tc, d)
    moved(before["s1"], after_one["s1"], granted=res(1), borrowed=res(1))
    moved(before["domain"], after_one["domain"], granted=res(1), lent=res(1))

    # Another workflow with the same request id (the same Update ids, the same keys): the levels answer
    # with the allocation already made and take nothing more.
    other = await client.execute_workflow(AllocateResourcesWorkflow.run, req, id=f"other/{uuid.uuid4().hex[:8]}",
                                          task_queue=f"{prefix}supervisor")
    assert other.model_copy(update={"created": first.created}) == first
    assert other.agent_total == res(3)
    assert await pools(tc, d) == after_one

    # In flight: the same request twice at once through the client (one workflow id), and twice at once
    # as two workflows (the levels' idempotency on the key).
    dup = AllocateRequest(request_id="r-flight", domain=d, agent="a1", resources=res(2))
    a, b = await asyncio.gather(tc.allocate(dup), tc.allocate(dup))
    assert a == b and a.allocation_id == "r-flight"
    twin = AllocateRequest(request_id="r-twins", domain=d, agent="a1", resources=res(1))
    twins = await asyncio.gather(*(client.execute_workflow(
        AllocateResourcesWorkflow.run, twin, id=f"twin/{i}/{uuid.uuid4().hex[:8]}", task_queue=f"{prefix}supervisor")
        for i in range(2)))
    assert {t.key for t in twins} == {f"{d}/a1#r-twins"} and twins[0].parts == twins[1].parts
    final = await pools(tc, d)
    moved(after_one["s1"], final["s1"], borrowed=res(3))
    moved(after_one["domain"], final["domain"], granted=res(3), lent=res(3))
    assert await agent_total(tc, d, "a1") == res(6)
    view = await tc.allocations(d, "a1")
    assert sorted(g.key.split("#")[1] for g in view.grants if not g.spawn) == ["r-flight", "r-once", "r-twins"]
    await finish(tc, client, d, g0)


# -- release ----------------------------------------------------------------------------------------------------


async def test_release_returns_each_part_once(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await small_domain(tc, "rel")
    before = await pools(tc, d)
    x1 = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(1)))
    x2 = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(6)))
    assert x2.parts == {"supervisor": ZERO, "manager": res(4), "orchestrator": res(2)}
    x3 = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=cpu(1)))
    assert x3.parts == {"supervisor": ZERO, "manager": ZERO, "orchestrator": cpu(1)}
    held = await pools(tc, d)

    one = await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id=x2.allocation_id))
    assert one.released == [x2.key] and one.agent == "a1"
    assert one.returned == {"supervisor": ZERO, "manager": res(4), "orchestrator": res(2)}
    p = await pools(tc, d)
    moved(p["s1"], held["s1"], borrowed=res(6))
    moved(p["domain"], held["domain"], granted=res(4), borrowed=res(2), lent=res(4))
    moved(p[GLOBAL], held[GLOBAL], granted=res(2), lent=res(2))
    twice = await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id=x2.allocation_id))
    assert twice.released == [] and all(r.is_zero() for r in twice.returned.values())
    unknown = await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id="never-made"))
    assert unknown.released == []
    assert await pools(tc, d) == p

    # Every extra allocation at once; the spawn allocation stays.
    rest = await tc.release(ReleaseRequest(domain=d, agent="a1"))
    assert sorted(rest.released) == sorted([x1.key, x3.key])
    assert rest.returned == {"supervisor": res(1), "manager": ZERO, "orchestrator": cpu(1)}
    assert await pools(tc, d) == before
    view = await tc.allocations(d, "a1")
    assert [g.spawn for g in view.grants] == [True] and view.agent.resources == res(1)
    assert (await tc.release(ReleaseRequest(domain=d, agent="a1"))).released == []

    # An unknown agent is NotFound.
    with pytest.raises(NotFound):
        await tc.release(ReleaseRequest(domain=d, agent="ghost"))
    await finish(tc, client, d, g0)


async def test_stopping_an_agent_releases_everything_it_holds_once(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "kill", res(6), {"s1": res(2)})
    before = await pools(tc, d)
    spawned = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(3)))
    assert spawned.borrowed == res(1)
    await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(5)))  # 3 from the domain, 2 global
    x = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=cpu(1)))
    assert x.parts == {"supervisor": ZERO, "manager": ZERO, "orchestrator": cpu(1)}
    p = await pools(tc, d)
    assert p["s1"].borrowed == res(1) + res(5) + cpu(1)
    assert p["domain"].lent == res(1) + res(3) and p["domain"].borrowed == res(2) + cpu(1)

    stopped = await tc.stop_agent(StopAgentRequest(domain=d, name="a1"))
    assert stopped.released == res(3) + res(5) + cpu(1)
    assert await pools(tc, d) == before
    with pytest.raises(NotFound):
        await tc.stop_agent(StopAgentRequest(domain=d, name="a1", request_id="stop-again"))
    assert await pools(tc, d) == before
    await finish(tc, client, d, g0)


# -- lending limit and borrowing --------------------------------------------------------------------------------


async def test_lending_limit_sends_the_rest_to_global(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await small_domain(tc, "lend", Policy(resources=ResourcePolicy(lending_limit=ResourceCap(cpu_millis=1000))))
    p0 = await pools(tc, d)
    x = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(3)))
    # The supervisor pays 1; the domain lends at most 1 CPU (memory is not limited); global pays the rest.
    assert x.parts == {"supervisor": res(1), "manager": Resources.of(cpu=1, memory="2Gi"), "orchestrator": cpu(1)}
    p1 = await pools(tc, d)
    assert p1["domain"].lent == Resources.of(cpu=1, memory="2Gi") and p1["domain"].free.cpu_millis == 3000
    moved(p0[GLOBAL], p1[GLOBAL], granted=cpu(1), lent=cpu(1))
    y = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=cpu(2)))
    assert y.parts == {"supervisor": ZERO, "manager": ZERO, "orchestrator": cpu(2)}, "the limit is reached"
    assert (await pools(tc, d))["domain"].lent.cpu_millis == 1000
    await finish(tc, client, d, g0)


async def test_supervisor_without_borrowing_refuses_what_it_cannot_pay(tc: TetrarchClient, client: Client) -> None:
    g0 = await orchestrator_pool(tc)
    d = await new_domain(tc, "noborrow", res(6), {"s1": res(2)},
                         sup_policy=Policy(resources=ResourcePolicy(borrowing=False)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a1", resources=res(1)))
    before = await pools(tc, d)
    with pytest.raises(CapacityExceeded) as e:
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(2)))
    assert e.value.level == "supervisor" and e.value.entity == f"supervisor/{d}/s1"
    assert "borrowing from above is off" in e.value.message
    assert await pools(tc, d) == before
    ok = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=res(1)))
    assert ok.served_by == "supervisor"
    await finish(tc, client, d, g0)


# -- concurrency ----------------------------------------------------------------------------------------------


async def test_500_concurrent_allocations_never_oversubscribe(tc: TetrarchClient, client: Client) -> None:
    """500 requests of 100m against 19 CPU of room (two supervisors and a domain that may not borrow)."""
    g0 = await orchestrator_pool(tc)
    big_memory = Resources.of(cpu=5, memory="64Gi")
    d = await new_domain(tc, "conc", Resources.of(cpu=20, memory="256Gi"), {"s1": big_memory, "s2": big_memory},
                         policy=Policy(resources=ResourcePolicy(borrowing=False)))
    agents = [(f"s{1 + i % 2}", f"a{i}") for i in range(10)]
    spawn_size = Resources(cpu_millis=100, memory_mib=100)
    await asyncio.gather(*(tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor=s, name=a, resources=spawn_size))
                           for s, a in agents))
    before = await pools(tc, d)
    room = before["s1"].free.cpu_millis + before["s2"].free.cpu_millis + before["domain"].free.cpu_millis
    assert room == 19_000

    ask = Resources(cpu_millis=100, memory_mib=64)
    gate = asyncio.Semaphore(20)  # more in flight only queues up at the two supervisors

    async def one(i: int) -> AllocationResult | TetrarchError:
        async with gate:
            try:
                return await tc.allocate(AllocateRequest(domain=d, agent=agents[i % len(agents)][1], resources=ask))
            except TetrarchError as e:
                return e

    outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(500))), timeout=90)
    granted = [o for o in outcomes if isinstance(o, AllocationResult)]
    refused = [o for o in outcomes if not isinstance(o, AllocationResult)]
    assert all(isinstance(o, CapacityExceeded) for o in refused), {type(o).__name__: str(o) for o in refused}
    assert {o.level for o in refused} <= {"manager"}, {o.level for o in refused}
    assert all(o.resources == ask and sum(o.parts.values(), ZERO) == ask for o in granted)
    # Every 100m the pools had room for was granted, and nothing more.
    assert len(granted) == room // ask.cpu_millis == 190 and len(refused) == 310

    after = await pools(tc, d)
    for level in ("s1", "s2", "domain"):
        assert after[level].free.cpu_millis == 0, level
    own = {lv: total([o.parts.get(lv, ZERO) for o in granted]) for lv in ("supervisor", "manager", "orchestrator")}
    assert own["orchestrator"] == ZERO and after[GLOBAL] == before[GLOBAL]
    moved(before["domain"], after["domain"], granted=own["manager"], lent=own["manager"])
    sup_granted = (after["s1"].granted.minus(before["s1"].granted)) + after["s2"].granted.minus(before["s2"].granted)
    assert sup_granted == own["supervisor"]
    assert after["s1"].borrowed + after["s2"].borrowed == own["manager"]
    assert own["supervisor"] + own["manager"] == total([o.resources for o in granted])
    held = total([await agent_total(tc, d, a) for _, a in agents])
    assert held == total([o.resources for o in granted]) + total([spawn_size] * len(agents))
    await finish(tc, client, d, g0)


# -- found on the way ---------------------------------------------------------------------------------------


def test_a_transport_error_in_a_step_keeps_its_message() -> None:
    """Under load entity Queries fail with RESOURCE_EXHAUSTED ("consistent query buffer is full"); such a
    fault must reach the workflow with its message, not as "Failed building exception result" (an error
    raised as its own cause makes the failure converter recurse without end)."""
    from temporalio.api.failure.v1 import Failure
    from temporalio.service import RPCError, RPCStatusCode

    from activities.calls import raise_translated
    from worker.connect import DATA_CONVERTER

    busy = RPCError("consistent query buffer is full", RPCStatusCode.RESOURCE_EXHAUSTED, b"")
    raised: BaseException | None = None
    try:
        try:
            raise busy
        except RPCError as e:
            raise_translated(e, LevelRef.supervisor("d", "s1"))  # what activities.calls.query does
    except RPCError as e:
        raised = e
    assert raised is busy and raised.__cause__ is not raised
    failure = Failure()
    DATA_CONVERTER.failure_converter.to_failure(raised, DATA_CONVERTER.payload_converter, failure)
    assert "consistent query buffer is full" in failure.message
