"""Resource pools: the pure arithmetic of ``tetrarch.pools`` and the allocation transitions of LevelState.

Every level has a nominal capacity carved from its parent. An agent's resources are allocations: the
supervisor pays what it can (``own``) and leaves the rest (``borrowed``) to its domain, which pays what it
may lend and leaves the rest to the orchestrator, which pays all or refuses. Each level records its share
under the allocation's key, and a release returns every share to the level it came from. The tests here
drive whole hierarchies of plain :class:`LevelState` objects (no Temporal) the way the workflows will:
a reservation saga upwards, compensated on refusal, and check conservation with :func:`audit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.unit.test_level import T0, make_level, reg, res
from tetrarch.errors import CapacityExceeded, Conflict, InvalidRequest, NotFound, TetrarchError
from tetrarch.level import (
    ChildRef,
    ConfigureLevel,
    LevelState,
    Reclaiming,
    ReconfigureChild,
    RegisterChild,
    ReleaseGrants,
    Reserve,
    ReserveResult,
)
from tetrarch.names import Level
from tetrarch.policy import Policy, ResourceCap, ResourcePolicy
from tetrarch.pools import (
    Grant,
    LedgerSnapshot,
    allocation_key,
    audit,
    component_min,
    key_agent,
    lendable,
    priority_order,
    split,
    totals,
)
from tetrarch.resources import KINDS, Resources, total

BIG = 1 << 62

# -- strategies -------------------------------------------------------------------------------------

VECTORS = st.builds(Resources, cpu_millis=st.integers(0, 10**6), memory_mib=st.integers(0, 10**6),
                    gpu=st.integers(0, 16))
TINY = st.builds(Resources, cpu_millis=st.integers(0, 3000), memory_mib=st.integers(0, 3072), gpu=st.integers(0, 1))
POOLS = st.builds(Resources, cpu_millis=st.integers(0, 5000), memory_mib=st.integers(0, 5120), gpu=st.integers(0, 2))
ASKS = st.builds(Resources, cpu_millis=st.integers(0, 2000), memory_mib=st.integers(0, 2048),
                 gpu=st.sampled_from([0, 0, 0, 1])).filter(lambda r: not r.is_zero())
SPAWNS = st.one_of(st.just(Resources()),
                   st.builds(Resources, cpu_millis=st.integers(0, 1000), memory_mib=st.integers(0, 1024)))
CAPS = st.builds(ResourceCap, cpu_millis=st.none() | st.integers(0, 10**6),
                 memory_mib=st.none() | st.integers(0, 10**6), gpu=st.none() | st.integers(0, 16))
SMALL_CAPS = st.builds(ResourceCap, cpu_millis=st.none() | st.integers(0, 3000),
                       memory_mib=st.none() | st.integers(0, 3072), gpu=st.none() | st.integers(0, 1))
BORROWING = st.sampled_from([None, True, False])
DELTAS = st.tuples(st.integers(-2500, 2500), st.integers(-2500, 2500), st.integers(-1, 1))


def vec(values: dict[str, int]) -> Resources:
    return Resources(**values)


def get(r: Resources, kind: str) -> int:
    return int(getattr(r, kind))


# -- 1. pure functions ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(a=VECTORS, b=VECTORS)
def test_component_min(a, b):
    m = component_min(a, b)
    assert m.fits_in(a)
    assert m.fits_in(b)
    assert m == component_min(b, a)
    for k in KINDS:
        assert get(m, k) in (get(a, k), get(b, k))
    assert component_min(a, a) == a
    assert component_min(a, Resources()) == Resources()
    assert (m == a) == a.fits_in(b)


@settings(max_examples=200, deadline=None)
@given(request=VECTORS, available=VECTORS, may_borrow=st.booleans())
def test_split_pays_what_fits_and_leaves_the_rest(request, available, may_borrow):
    own, rest = split(request, available, may_borrow)
    assert own + rest == request
    assert own.fits_in(available)
    assert own.fits_in(request)
    assert own == component_min(request, available)
    assert rest.is_zero() == request.fits_in(available)
    for k in KINDS:  # a component is either paid in full or drains what is available
        assert get(rest, k) == 0 or get(own, k) == get(available, k)
    # borrowing only tells the caller whether the rest may go up; the arithmetic is the same
    assert split(request, available, not may_borrow) == (own, rest)


@settings(max_examples=200, deadline=None)
@given(free=VECTORS, lent=VECTORS)
def test_lendable_without_a_limit_is_the_free_pool(free, lent):
    assert lendable(free, lent, None) == free


@settings(max_examples=300, deadline=None)
@given(free=VECTORS, lent=VECTORS, limit=CAPS)
def test_lendable_stays_within_the_lending_limit(free, lent, limit):
    room = lendable(free, lent, limit)
    assert room.fits_in(free)
    for k in KINDS:
        cap = getattr(limit, k)
        if cap is None:
            assert get(room, k) == get(free, k)
        else:
            assert get(room, k) == max(0, min(get(free, k), cap - get(lent, k)))
            if get(lent, k) <= cap:
                assert get(lent, k) + get(room, k) <= cap
            else:  # already lent beyond the limit (it was lowered): nothing more
                assert get(room, k) == 0
    # a whole Resources vector caps every component
    assert lendable(free, Resources(), ResourceCap.model_validate(free)) == free


def test_lendable_examples():
    free = res(10, "10Gi", 2)
    assert lendable(free, res(3), ResourceCap(cpu_millis=4000)) == res(1, "10Gi", 2)
    assert lendable(free, res(5), ResourceCap(cpu_millis=4000)) == res(0, "10Gi", 2)
    assert lendable(free, Resources(), ResourceCap(gpu=0)) == res(10, "10Gi", 0)
    assert lendable(res(1), Resources(), ResourceCap(cpu_millis=4000)) == res(1)


@st.composite
def pools(draw: st.DrawFn) -> tuple[Resources, Resources, list[Grant]]:
    carved = draw(TINY)
    grants = [Grant(key=f"d/a#{i}", agent="d/a", child="a", own=own, borrowed=borrowed, created_at=T0)
              for i, (own, borrowed) in enumerate(draw(st.lists(st.tuples(TINY, TINY), max_size=5)))]
    capacity = carved + total([g.own for g in grants]) + draw(TINY)
    return capacity, carved, grants


@settings(max_examples=200, deadline=None)
@given(pool=pools(), lends=st.booleans())
def test_totals(pool, lends):
    capacity, carved, grants = pool
    t = totals(capacity, carved, grants, lends)
    own = total([g.own for g in grants])
    assert t.capacity == capacity
    assert t.granted == carved + own
    assert t.granted + t.free == capacity
    assert t.granted.fits_in(capacity)
    assert t.borrowed == total([g.borrowed for g in grants])
    assert t.allocated == own + t.borrowed == total([g.size for g in grants])
    assert t.lent == (own if lends else Resources())


def test_totals_refuses_an_oversubscribed_pool():
    g = Grant(key="d/a#1", agent="d/a", child="a", own=res(2), created_at=T0)
    with pytest.raises(ValueError, match="cannot subtract"):
        totals(res(1), Resources(), [g], lends=False)


def test_keys_and_priority_order():
    key = allocation_key("research", "a", "alloc-1")
    assert key == "research/a#alloc-1"
    assert key_agent(key) == "research/a"
    g = [Grant(key=f"k{i}", agent="d/a", child="a", own=res(1), priority=p, created_at=T0 + timedelta(seconds=s))
         for i, (p, s) in enumerate([(1, 0), (0, 0), (0, 5), (2, 9)])]
    assert [x.key for x in priority_order(g)] == ["k2", "k1", "k0", "k3"]  # lowest priority, newest first
    assert g[0].size == res(1)


# -- a hierarchy of plain LevelStates and the allocation saga the workflows run -----------------------


@dataclass
class Hierarchy:
    """One orchestrator, its managers (by domain) and their supervisors (by (domain, name))."""

    orch: LevelState
    managers: dict[str, LevelState] = field(default_factory=dict)
    supervisors: dict[tuple[str, str], LevelState] = field(default_factory=dict)

    def levels(self) -> list[LevelState]:
        return [self.orch, *self.managers.values(), *self.supervisors.values()]

    def chain(self, domain: str, sup: str) -> list[LevelState]:
        """The supervisor, its manager and the orchestrator: the order a request escalates in."""
        return [self.supervisors[domain, sup], self.managers[domain], self.orch]

    def audit(self) -> Any:
        return audit([lv.snapshot() for lv in self.levels()])

    def dumps(self) -> dict[str, dict[str, Any]]:
        return {lv.entity_id: lv.model_dump() for lv in self.levels()}


def build(orch_cap: Resources, managers: dict[str, tuple[Resources, Policy]],
          supervisors: dict[tuple[str, str], tuple[Resources, Policy]]) -> Hierarchy:
    """Carve every manager from the orchestrator and every supervisor from its manager."""
    h = Hierarchy(orch=make_level(Level.ORCHESTRATOR, capacity=orch_cap))
    for domain, (cap, policy) in managers.items():
        h.orch.register_child(reg(domain, cap), T0)
        h.managers[domain] = make_level(Level.MANAGER, capacity=cap, policy=policy, domain=domain)
    for (domain, sup), (cap, policy) in supervisors.items():
        h.managers[domain].register_child(reg(sup, cap), T0)
        h.supervisors[domain, sup] = make_level(Level.SUPERVISOR, capacity=cap, policy=policy, name=sup,
                                                domain=domain)
    return h


class Refused(Exception):
    """A saga step refused; every share taken before it was given back."""

    def __init__(self, error: TetrarchError, at: str, compensated: list[str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.at = at
        self.compensated = compensated


def escalate(h: Hierarchy, domain: str, sup: str, key: str, remainder: Resources, request_id: str,
             now: datetime, spawn: bool = False) -> list[ReserveResult]:
    """Reserve what the supervisor left at its manager, and what that left at the orchestrator.

    On a refusal the shares this call created are released again (newest first) and Refused is raised.
    """
    _, mgr, orch = h.chain(domain, sup)
    results: list[ReserveResult] = []
    created: list[LevelState] = []
    steps = [(mgr, sup), (orch, domain)]
    try:
        for level, child in steps:
            if remainder.is_zero():
                break
            r = level.reserve(Reserve(request_id=request_id, key=key, child=child, resources=remainder,
                                      spawn=spawn), now)
            results.append(r)
            if r.created:
                created.append(level)
            remainder = r.remainder
    except TetrarchError as e:
        for level in reversed(created):
            level.release(ReleaseGrants(request_id=request_id, keys=[key], owner=request_id), now)
        raise Refused(e, e.level, [lv.entity_id for lv in created]) from e
    assert remainder.is_zero(), "the orchestrator pays all or refuses"
    return results


def allocate(h: Hierarchy, domain: str, sup: str, agent: str, key: str, resources: Resources, request_id: str,
             now: datetime, escalate_: bool = True) -> list[ReserveResult]:
    """The AllocateResources saga: supervisor, then domain, then global; compensated on a refusal."""
    s = h.supervisors[domain, sup]
    try:
        first = s.reserve(Reserve(request_id=request_id, key=key, child=agent, resources=resources,
                                  escalate=escalate_), now)
    except TetrarchError as e:
        raise Refused(e, e.level, []) from e
    try:
        return [first, *escalate(h, domain, sup, key, first.remainder, request_id, now)]
    except Refused as e:
        if first.created:
            s.release(ReleaseGrants(request_id=request_id, keys=[key], owner=request_id), now)
            e.compensated.append(s.entity_id)
        raise


def spawn(h: Hierarchy, domain: str, sup: str, agent: str, resources: Resources, request_id: str,
          now: datetime) -> list[Grant]:
    """Register an agent with its spawn allocation (escalated like any other); compensated on a refusal."""
    s = h.supervisors[domain, sup]
    try:
        result = s.register_child(RegisterChild(request_id=request_id, name=agent, resources=resources,
                                                escalate=True), now)
    except TetrarchError as e:
        raise Refused(e, e.level, []) from e
    if result.grant is None:
        return []
    try:
        above = escalate(h, domain, sup, result.grant.key, result.grant.borrowed, request_id, now, spawn=True)
    except Refused as e:
        if result.created:
            s.unregister_child(ChildRef(request_id=request_id, name=agent, owner=request_id), now)
            e.compensated.append(s.entity_id)
        raise
    return [result.grant, *(r.grant for r in above)]


def release_above(h: Hierarchy, domain: str, sup: str, keys: list[str], now: datetime) -> tuple[list[Grant], ...]:
    """Release keys the supervisor already gave back at its manager, then at the orchestrator."""
    _, mgr, orch = h.chain(domain, sup)
    return (mgr.release(ReleaseGrants(keys=keys), now).released,
            orch.release(ReleaseGrants(keys=keys), now).released)


def without_clock(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if k != "updated_at"}


# -- 2. a random hierarchy under random allocations ------------------------------------------------

DOMAINS = ("research", "support")
SUPERVISORS = ("s1", "s2")
SUPS = [(d, s) for d in DOMAINS for s in SUPERVISORS]


@dataclass
class Allocation:
    domain: str
    sup: str
    agent: str
    size: Resources
    request_id: str
    grants: list[Grant]
    spawn: bool = False


class PoolMachine(RuleBasedStateMachine):
    """Allocate, retry, release and resize over a 3-level hierarchy; conservation must always hold."""

    h: Hierarchy
    agents: dict[str, tuple[str, str]]  # agent name -> (domain, supervisor)
    allocs: dict[str, Allocation]
    spawned: dict[str, tuple[Resources, str]]  # agent name -> (spawn resources, request id)

    def now(self) -> datetime:
        self.tick += 1
        return T0 + timedelta(seconds=self.tick)

    def fresh(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"

    # -- set-up ---------------------------------------------------------------------------------

    @initialize(sup_caps=st.lists(POOLS, min_size=4, max_size=4), mgr_extra=st.lists(POOLS, min_size=2, max_size=2),
                orch_extra=POOLS, limits=st.lists(st.none() | SMALL_CAPS, min_size=2, max_size=2),
                mgr_borrowing=st.lists(BORROWING, min_size=2, max_size=2),
                sup_borrowing=st.lists(BORROWING, min_size=4, max_size=4),
                spawns=st.lists(SPAWNS, min_size=8, max_size=8))
    def start(self, sup_caps, mgr_extra, orch_extra, limits, mgr_borrowing, sup_borrowing, spawns):
        self.tick, self.seq = 0, 0
        sups = {ds: (cap, Policy(resources=ResourcePolicy(borrowing=b)))
                for ds, cap, b in zip(SUPS, sup_caps, sup_borrowing, strict=True)}
        mgrs = {}
        for d, extra, limit, b in zip(DOMAINS, mgr_extra, limits, mgr_borrowing, strict=True):
            cap = total([c for (dd, _), (c, _) in sups.items() if dd == d]) + extra
            mgrs[d] = (cap, Policy(resources=ResourcePolicy(borrowing=b, lending_limit=limit)))
        self.h = build(total([c for c, _ in mgrs.values()]) + orch_extra, mgrs, sups)
        self.agents, self.allocs, self.spawned = {}, {}, {}
        for i, resources in enumerate(spawns):
            domain, sup = SUPS[i // 2]
            self.do_spawn(domain, sup, f"{sup}-a{i}", resources)
        self.check_conservation()

    # -- helpers --------------------------------------------------------------------------------

    def predict(self, domain: str, sup: str, size: Resources, escalate_: bool) -> tuple[list[Resources], str]:
        """The share each level should pay, or the level that should refuse (read before the saga)."""
        s, m, o = self.h.chain(domain, sup)
        own_s, rest = split(size, s.free, True)
        if rest.is_zero():
            return [own_s], ""
        if not escalate_ or s.policy.resources.borrowing is False:
            return [], "supervisor"
        if m.reclaiming is not None:
            return [], "manager"
        pool = m.pool()
        own_m, rest = split(rest, lendable(pool.free, pool.lent, m.policy.resources.lending_limit), True)
        if rest.is_zero():
            return [own_s, own_m], ""
        if m.policy.resources.borrowing is False:
            return [], "manager"
        if o.reclaiming is not None or not rest.fits_in(o.free):
            return [], "orchestrator"
        return [own_s, own_m, rest], ""

    def expect_refusal_changed_nothing(self, before: dict[str, dict[str, Any]], refused: Refused) -> None:
        after = self.h.dumps()
        for entity, dump in before.items():
            if entity in refused.compensated:  # took a share and gave it back: only its clock moved
                assert without_clock(after[entity]) == without_clock(dump), entity
            else:
                assert after[entity] == dump, entity

    def check_grants(self, grants: list[Grant], shares: list[Resources], size: Resources) -> None:
        assert [g.own for g in grants] == shares
        passing = size
        for g in grants:  # each level passes down what it paid plus what it borrowed
            assert g.size == passing
            passing = g.borrowed
        assert grants[-1].borrowed.is_zero()

    def do_spawn(self, domain: str, sup: str, agent: str, resources: Resources) -> None:
        request_id = self.fresh("spawn-")
        before = self.h.dumps()
        shares, refuser = self.predict(domain, sup, resources, True) if not resources.is_zero() else ([], "")
        try:
            grants = spawn(self.h, domain, sup, agent, resources, request_id, self.now())
        except Refused as e:
            assert isinstance(e.error, CapacityExceeded), e.error
            assert e.at == refuser
            event(f"spawn: refused by the {e.at}")
            self.expect_refusal_changed_nothing(before, e)
            return
        assert not refuser
        self.agents[agent] = (domain, sup)
        self.spawned[agent] = (resources, request_id)
        if grants:
            self.check_grants(grants, shares, resources)
            self.allocs[grants[0].key] = Allocation(domain, sup, agent, resources, request_id, grants, spawn=True)

    def pick_agent(self, data: st.DataObject) -> tuple[str, str, str]:
        agent = data.draw(st.sampled_from(sorted(self.agents)), label="agent")
        return agent, *self.agents[agent]

    def pick_alloc(self, data: st.DataObject, spawns: bool = True) -> str:
        keys = sorted(k for k, a in self.allocs.items() if spawns or not a.spawn)
        return data.draw(st.sampled_from(keys), label="key")

    # -- rules ----------------------------------------------------------------------------------

    @precondition(lambda self: self.agents)
    @rule(data=st.data(), size=ASKS, escalate_=st.booleans() | st.just(True))
    def allocate(self, data, size, escalate_):
        agent, domain, sup = self.pick_agent(data)
        request_id = self.fresh("alloc-")
        key = allocation_key(domain, agent, request_id)
        s = self.h.supervisors[domain, sup]
        before, agent_before = self.h.dumps(), s.children[agent].resources
        shares, refuser = self.predict(domain, sup, size, escalate_)
        try:
            results = allocate(self.h, domain, sup, agent, key, size, request_id, self.now(), escalate_)
        except Refused as e:
            assert isinstance(e.error, CapacityExceeded), e.error
            assert e.at == refuser, (e.at, refuser, e.error)
            event(f"allocate: refused by the {e.at}")
            assert e.error.problems or e.at == "manager"  # a manager that reclaims names no component
            self.expect_refusal_changed_nothing(before, e)
            return
        assert not refuser, f"{refuser} should have refused {size}"
        assert all(r.created for r in results)
        assert results[0].agent_total == agent_before + size == s.children[agent].resources
        grants = [r.grant for r in results]
        event(f"allocate: served by {len(grants)} level(s)")
        self.check_grants(grants, shares, size)
        for lv, g in zip(self.h.chain(domain, sup), grants, strict=False):
            assert lv.grants[key] == g
            assert g.request_id == request_id
            assert g.agent == f"{domain}/{agent}"
        self.allocs[key] = Allocation(domain, sup, agent, size, request_id, grants)

    @precondition(lambda self: self.allocs)
    @rule(data=st.data())
    def retry(self, data):
        """A retried saga step gets the grants it already made and takes nothing more."""
        key = self.pick_alloc(data)
        a = self.allocs[key]
        before = self.h.dumps()
        results = allocate(self.h, a.domain, a.sup, a.agent, key, a.size, a.request_id, self.now())
        assert [r.grant for r in results] == a.grants
        assert not any(r.created for r in results)
        assert self.h.dumps() == before
        # the same key with another size (or for another child) is a conflict, and changes nothing
        s, m, _ = self.h.chain(a.domain, a.sup)
        other = a.size + Resources(cpu_millis=1)
        with pytest.raises(Conflict):
            s.reserve(Reserve(request_id="other", key=key, child=a.agent, resources=other), self.now())
        if len(a.grants) > 1:
            with pytest.raises(Conflict):
                m.reserve(Reserve(request_id="other", key=key, child=a.sup, resources=a.grants[1].size + other),
                          self.now())
        assert self.h.dumps() == before

    @precondition(lambda self: any(not a.spawn for a in self.allocs.values()))
    @rule(data=st.data())
    def release(self, data):
        key = self.pick_alloc(data, spawns=False)
        a = self.allocs.pop(key)
        s, m, o = self.h.chain(a.domain, a.sup)
        agent_before = s.children[a.agent].resources
        now = self.now()
        for level, grant in zip((s, m, o), [*a.grants, None, None], strict=False):
            released = level.release(ReleaseGrants(keys=[key]), now).released
            assert released == ([grant] if grant is not None else [])
        assert s.children[a.agent].resources == agent_before.minus(a.size)
        # exactly once: a retried release returns nothing
        before = self.h.dumps()
        for level in (s, m, o):
            assert level.release(ReleaseGrants(keys=[key]), self.now()).released == []
        assert self.h.dumps() == before

    @precondition(lambda self: self.agents)
    @rule(data=st.data())
    def release_agent(self, data):
        """Stop an agent: the supervisor returns all its grants, which are then released above."""
        agent, domain, sup = self.pick_agent(data)
        mine = {k: a for k, a in self.allocs.items() if a.agent == agent}
        now = self.now()
        s = self.h.supervisors[domain, sup]
        held = s.children[agent].resources
        result = s.unregister_child(ChildRef(name=agent), now)
        assert result.released == held == total([a.size for a in mine.values()])
        assert sorted(g.key for g in result.grants) == sorted(mine)
        keys = [g.key for g in result.grants]
        _, mgr, orch = self.h.chain(domain, sup)
        by_key = mgr.release(ReleaseGrants(keys=keys), now).released
        by_agent = orch.release(ReleaseGrants(agent=f"{domain}/{agent}"), now).released
        assert sorted(g.key for g in by_key) == sorted(k for k, a in mine.items() if len(a.grants) > 1)
        assert sorted(g.key for g in by_agent) == sorted(k for k, a in mine.items() if len(a.grants) > 2)
        for k in mine:
            del self.allocs[k]
        del self.agents[agent]
        self.spawned.pop(agent, None)
        assert s.unregister_child(ChildRef(name=agent), self.now()).released is None

    @rule(ds=st.sampled_from(SUPS), resources=SPAWNS)
    def spawn_agent(self, ds, resources):
        domain, sup = ds
        self.do_spawn(domain, sup, self.fresh("n"), resources)

    @precondition(lambda self: self.spawned)
    @rule(data=st.data())
    def retry_spawn(self, data):
        """A retried spawn finds the agent and its spawn grants, whatever it allocated since."""
        agent = data.draw(st.sampled_from(sorted(self.spawned)), label="agent")
        domain, sup = self.agents[agent]
        resources, request_id = self.spawned[agent]
        before = self.h.dumps()
        grants = spawn(self.h, domain, sup, agent, resources, request_id, self.now())
        if resources.is_zero():
            assert grants == []
        else:
            assert grants == self.allocs[grants[0].key].grants
        assert self.h.dumps() == before

    @precondition(lambda self: self.agents)
    @rule(data=st.data())
    def release_agent_allocations(self, data):
        """Give back everything an agent allocated (ReleaseResources without include_spawn).

        The supervisor releases by agent keeping the spawn allocation; what those grants borrowed is then
        released by key above (only the supervisor flags a spawn grant, so the levels above are never
        asked by agent).
        """
        agent, domain, sup = self.pick_agent(data)
        mine = {k: a for k, a in self.allocs.items() if a.agent == agent and not a.spawn}
        now = self.now()
        s, m, o = self.h.chain(domain, sup)
        released = s.release(ReleaseGrants(agent=f"{domain}/{agent}", keep_spawn=True), now).released
        assert sorted(g.key for g in released) == sorted(mine)
        keys = [g.key for g in released if not g.borrowed.is_zero()]
        for i, level in ((1, m), (2, o)):
            above = level.release(ReleaseGrants(keys=keys), now).released
            assert sorted(g.key for g in above) == sorted(k for k, a in mine.items() if len(a.grants) > i)
            assert all(g == mine[g.key].grants[i] for g in above)
        for k in mine:
            del self.allocs[k]
        s = self.h.supervisors[domain, sup]
        assert s.children[agent].resources == self.spawned.get(agent, (Resources(), ""))[0]

    @rule(data=st.data(), delta=DELTAS)
    def configure(self, data, delta):
        """Resize a level: its parent's record of its slice and its own capacity change together."""
        lv = data.draw(st.sampled_from(self.h.levels()), label="level")
        old = lv.capacity
        new = Resources(cpu_millis=max(0, old.cpu_millis + delta[0]), memory_mib=max(0, old.memory_mib + delta[1]),
                        gpu=max(0, old.gpu + delta[2]))
        parent = None if lv.level is Level.ORCHESTRATOR else (
            self.h.orch if lv.level is Level.MANAGER else self.h.managers[lv.domain or ""])
        before = self.h.dumps()
        fits_parent = parent is None or new.fits_in(parent.free + old)
        fits_self = lv.granted.fits_in(new)
        now = self.now()
        try:
            if parent is not None:
                parent.reconfigure_child(ReconfigureChild(request_id="cfg", name=lv.name, resources=new), now)
        except CapacityExceeded:
            assert not fits_parent
            event("configure: refused by the parent")
            assert self.h.dumps() == before
            return
        try:
            lv.configure(ConfigureLevel(resources=new), now)
        except Conflict:
            assert fits_parent
            assert not fits_self
            event("configure: refused by the level")
            if parent is not None:  # compensation
                parent.reconfigure_child(ReconfigureChild(request_id="cfg", name=lv.name, resources=old), now)
            after = self.h.dumps()
            assert {k: without_clock(v) for k, v in after.items()} == {k: without_clock(v) for k, v in before.items()}
            return
        assert fits_parent
        assert fits_self
        assert lv.capacity == new
        event(f"configure: {lv.level.value} resized")

    @rule(domain=st.sampled_from(DOMAINS), resources=st.none() | ASKS)
    def set_reclaiming(self, domain, resources):
        m = self.h.managers[domain]
        m.set_reclaiming(Reclaiming(resources=resources), self.now())
        if resources is None or resources.fits_in(m.free):
            assert m.reclaiming is None
        else:
            assert m.reclaiming == resources

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def conservation(self):
        self.check_conservation()

    def check_conservation(self) -> None:
        report = self.h.audit()
        assert report.ok, report.problems
        assert report.problems == []
        assert report.levels == 7
        assert report.allocations == len(self.allocs)
        for lv in self.h.levels():
            pool = lv.pool()
            assert lv.granted + lv.free == lv.capacity
            assert lv.granted.fits_in(lv.capacity)
            assert (pool.granted, pool.free) == (lv.granted, lv.free)
            limit = lv.policy.resources.lending_limit
            if lv.level is Level.MANAGER and limit is not None:
                assert pool.lent.fits_in(limit.bounded(BIG))
            if lv.level is Level.ORCHESTRATOR:
                assert pool.borrowed.is_zero()
        # every allocated unit is paid by exactly one level
        agents = total([c.resources for s in self.h.supervisors.values() for c in s.children.values()])
        paid = total([g.own for lv in self.h.levels() for g in lv.grants.values()])
        assert agents == paid == total([a.size for a in self.allocs.values()])
        # the ledgers hold exactly the modelled grants
        for lv in self.h.levels():
            mine = {k: a.grants[i] for k, a in self.allocs.items()
                    for i, owner in enumerate(self.h.chain(a.domain, a.sup)) if owner is lv and i < len(a.grants)}
            assert lv.grants == mine, lv.entity_id
        for (domain, sup), s in self.h.supervisors.items():
            assert sorted(s.children) == sorted(a for a, ds in self.agents.items() if ds == (domain, sup))

    def teardown(self):
        if not hasattr(self, "h"):
            return
        for agent, (domain, sup) in sorted(self.agents.items()):
            keys = [g.key for g in self.h.supervisors[domain, sup].unregister_child(ChildRef(name=agent),
                                                                                  self.now()).grants]
            release_above(self.h, domain, sup, keys, self.now())
        self.agents, self.allocs = {}, {}
        for lv in self.h.levels():
            assert lv.grants == {}, lv.entity_id
            assert lv.free == lv.capacity.minus(lv.carved)
            assert lv.pool().lent.is_zero()
            assert lv.pool().borrowed.is_zero()
        assert self.h.audit().ok


PoolMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
test_pool_conservation = PoolMachine.TestCase


# -- 3. the seed's example 3, at each depth ---------------------------------------------------------

AGENT = "a"
SEED_ORCH = res(100, "100Gi", 4)
SEED_DOMAIN = res(20, "20Gi", 2)
SEED_SUP = res(10, "10Gi", 1)


def seed_chain(mgr_policy: Policy | None = None, sup_policy: Policy | None = None) -> Hierarchy:
    """Global 100 CPU; domain research 20 CPU (10 of it carved for sup-1); sup-1 10 CPU; agent a holds nothing."""
    h = build(SEED_ORCH, {"research": (SEED_DOMAIN, mgr_policy or Policy())},
              {("research", "sup-1"): (SEED_SUP, sup_policy or Policy())})
    assert spawn(h, "research", "sup-1", AGENT, Resources(), "spawn-a", T0) == []
    return h


def alloc(h: Hierarchy, resources: Resources, allocation_id: str = "x", escalate_: bool = True) -> list[Grant]:
    return alloc_for(h, AGENT, resources, allocation_id, escalate_)


def alloc_for(h: Hierarchy, agent: str, resources: Resources, allocation_id: str,
              escalate_: bool = True) -> list[Grant]:
    key = allocation_key("research", agent, allocation_id)
    results = allocate(h, "research", "sup-1", agent, key, resources, allocation_id, T0, escalate_)
    assert h.audit().ok, h.audit().problems
    return [r.grant for r in results]


def frees(h: Hierarchy) -> list[Resources]:
    sup, mgr, orch = h.chain("research", "sup-1")
    return [sup.free, mgr.free, orch.free]


def test_served_by_the_supervisor_alone():
    h = seed_chain()
    grants = alloc(h, res(4, "4Gi"))
    assert [(g.own, g.borrowed) for g in grants] == [(res(4, "4Gi"), Resources())]
    assert frees(h) == [res(6, "6Gi", 1), res(10, "10Gi", 1), res(80, "80Gi", 2)]
    assert h.supervisors["research", "sup-1"].children[AGENT].resources == res(4, "4Gi")


def test_partly_served_by_the_domain():
    h = seed_chain()
    grants = alloc(h, res(14, "4Gi", 1))
    assert [(g.own, g.borrowed) for g in grants] == [(res(10, "4Gi", 1), res(4)), (res(4), Resources())]
    assert grants[1].child == "sup-1"
    assert frees(h) == [res(0, "6Gi"), res(6, "10Gi", 1), res(80, "80Gi", 2)]
    assert h.managers["research"].pool().lent == res(4)
    assert h.supervisors["research", "sup-1"].pool().borrowed == res(4)


def test_partly_served_by_the_global_pool():
    h = seed_chain()
    grants = alloc(h, res(25, "12Gi", 3))
    assert [(g.own, g.borrowed) for g in grants] == [
        (res(10, "10Gi", 1), res(15, "2Gi", 2)),
        (res(10, "2Gi", 1), res(5, "0", 1)),
        (res(5, "0", 1), Resources()),
    ]
    assert [g.child for g in grants] == [AGENT, "sup-1", "research"]
    assert frees(h) == [Resources(), res(0, "8Gi"), res(75, "80Gi", 1)]
    # the release gives every part back to the level it came from
    key = grants[0].key
    sup, mgr, orch = h.chain("research", "sup-1")
    for level, grant in zip((sup, mgr, orch), grants, strict=True):
        assert level.release(ReleaseGrants(keys=[key]), T0).released == [grant]
    assert frees(h) == [SEED_SUP, SEED_DOMAIN.minus(SEED_SUP), SEED_ORCH.minus(SEED_DOMAIN)]
    assert h.audit().ok


def test_refused_when_even_the_global_pool_is_short():
    h = seed_chain()
    before = h.dumps()
    with pytest.raises(Refused) as exc:
        alloc(h, res(101))  # 10 (supervisor) + 10 (domain) + 80 (global) = 100
    assert isinstance(exc.value.error, CapacityExceeded)
    assert exc.value.at == "orchestrator"
    assert exc.value.error.problems == ["cpu: needs 81, has 80"]
    assert sorted(exc.value.compensated) == ["manager/research", "supervisor/research/sup-1"]
    assert {k: without_clock(v) for k, v in h.dumps().items()} == {k: without_clock(v) for k, v in before.items()}
    assert all(lv.grants == {} for lv in h.levels())
    assert h.supervisors["research", "sup-1"].children[AGENT].resources == Resources()
    # exactly the whole hierarchy is still available
    assert alloc(h, res(100))[2].own == res(80)


def test_a_lending_limit_sends_more_up_to_the_global_pool():
    h = seed_chain(mgr_policy=Policy(resources=ResourcePolicy(lending_limit=ResourceCap(cpu_millis=2000))))
    grants = alloc(h, res(15, "11Gi"))
    assert [g.own for g in grants] == [res(10, "10Gi"), res(2, "1Gi"), res(3)]
    # the limit is used up: the next loan's CPU all comes from the global pool, memory still from the domain
    grants = alloc(h, res(1, "1Gi"), "y")
    assert [g.own for g in grants] == [Resources(), res(0, "1Gi"), res(1)]
    assert h.managers["research"].pool().lent == res(2, "2Gi")


def test_a_manager_that_does_not_borrow_refuses_what_it_cannot_lend():
    h = seed_chain(mgr_policy=Policy(resources=ResourcePolicy(borrowing=False)))
    before = h.dumps()
    with pytest.raises(Refused) as exc:
        alloc(h, res(21))
    assert exc.value.at == "manager"
    assert "borrowing from above is off" in exc.value.error.message
    assert {k: without_clock(v) for k, v in h.dumps().items()} == {k: without_clock(v) for k, v in before.items()}
    assert [g.own for g in alloc(h, res(20))] == [res(10), res(10)]


@pytest.mark.parametrize("how", ["policy", "request"])
def test_a_supervisor_that_may_not_borrow_pays_all_or_refuses(how):
    h = seed_chain(sup_policy=Policy(resources=ResourcePolicy(borrowing=False)) if how == "policy" else None)
    escalate_ = how != "request"
    before = h.dumps()
    with pytest.raises(Refused) as exc:
        alloc(h, res(11), escalate_=escalate_)
    assert exc.value.at == "supervisor"
    assert exc.value.error.problems == ["cpu: needs 11, has 10"]
    assert h.dumps() == before  # refused at the first step: nothing at all changed
    assert [(g.own, g.borrowed) for g in alloc(h, res(10), escalate_=escalate_)] == [(res(10), Resources())]


def test_same_key_same_size_is_idempotent_and_another_size_is_a_conflict():
    h = seed_chain()
    grants = alloc(h, res(12))
    before = h.dumps()
    assert alloc(h, res(12)) == grants  # the retried saga finds every share it made
    assert h.dumps() == before
    sup, mgr, _ = h.chain("research", "sup-1")
    key = grants[0].key
    with pytest.raises(Conflict, match="already holds"):
        sup.reserve(Reserve(request_id="x", key=key, child=AGENT, resources=res(13)), T0)
    with pytest.raises(Conflict):
        mgr.reserve(Reserve(request_id="x", key=key, child="sup-1", resources=res(1)), T0)
    with pytest.raises(Conflict):  # the same size through another child
        mgr.reserve(Reserve(request_id="x", key=key, child="sup-2", resources=res(2)), T0)
    assert h.dumps() == before


def test_a_zero_request_is_invalid():
    h = seed_chain()
    before = h.dumps()
    for lv, child in zip(h.chain("research", "sup-1"), [AGENT, "sup-1", "research"], strict=True):
        with pytest.raises(InvalidRequest, match="must ask for some"):
            lv.reserve(Reserve(request_id="z", key="research/a#z", child=child, resources=Resources()), T0)
    assert h.dumps() == before


def test_an_unknown_child_is_not_found():
    h = seed_chain()
    before = h.dumps()
    for lv, child in zip(h.chain("research", "sup-1"), ["ghost", "sup-9", "nowhere"], strict=True):
        with pytest.raises(NotFound) as exc:
            lv.reserve(Reserve(request_id="z", key="research/ghost#z", child=child, resources=res(1)), T0)
        assert exc.value.data == {"name": child}
    assert h.dumps() == before


def test_a_reclaiming_manager_lends_nothing_new_until_enough_is_back():
    h = seed_chain()
    sup, mgr, orch = h.chain("research", "sup-1")
    first = alloc(h, res(18), "first")  # the supervisor pays 10, the domain lends 8 of its 10 free CPU
    assert mgr.free == res(2, "10Gi", 1)
    # wanting back what is already free is no reclaim
    mgr.set_reclaiming(Reclaiming(resources=res(2)), T0)
    assert mgr.reclaiming is None
    pool = mgr.set_reclaiming(Reclaiming(resources=res(5)), T0)
    assert mgr.reclaiming == res(5)
    assert pool.lent == res(8)
    assert mgr.pool_view().reclaiming == res(5)
    # nothing new is lent, not even from the 2 CPU the domain still has free
    before = h.dumps()
    with pytest.raises(Refused) as exc:
        alloc(h, res(1), "second")  # the supervisor is full, so this needs a loan
    assert exc.value.at == "manager"
    assert "lends nothing new while it reclaims" in exc.value.error.message
    assert exc.value.compensated == ["supervisor/research/sup-1"]
    assert {k: without_clock(v) for k, v in h.dumps().items()} == {k: without_clock(v) for k, v in before.items()}
    assert mgr.reclaiming == res(5)
    # a compensation of another request releases nothing, so the reclaim goes on
    assert mgr.release(ReleaseGrants(keys=[first[0].key], owner="someone-else"), T0).released == []
    assert mgr.reclaiming == res(5)
    # the release that brings the domain's free to 10 CPU ends the reclaim, and loans resume
    for lv in (sup, mgr, orch):
        lv.release(ReleaseGrants(keys=[first[0].key]), T0)
    assert mgr.reclaiming is None
    assert [g.own for g in alloc(h, res(11), "third")] == [res(10), res(1)]


def test_reclaim_is_ended_by_the_release_that_frees_enough_not_before():
    h = seed_chain()
    sup, mgr, _ = h.chain("research", "sup-1")
    a = alloc(h, res(13), "a")  # domain lends 3
    b = alloc(h, res(4), "b")  # domain lends 4: 3 CPU left free
    mgr.set_reclaiming(Reclaiming(resources=res(6)), T0)
    for lv in (sup, mgr):
        lv.release(ReleaseGrants(keys=[b[0].key]), T0)
    assert mgr.free == res(7, "10Gi", 1)
    assert mgr.reclaiming is None  # 7 >= 6
    mgr.set_reclaiming(Reclaiming(resources=res(9)), T0)
    assert mgr.reclaiming == res(9)
    sup.release(ReleaseGrants(keys=[a[0].key]), T0)  # the supervisor's part alone does not help the domain
    assert mgr.reclaiming == res(9)
    mgr.release(ReleaseGrants(keys=[a[0].key]), T0)
    assert mgr.reclaiming is None
    # a stop request (None) ends a reclaim whatever is free
    mgr.set_reclaiming(Reclaiming(resources=res(50)), T0)
    assert mgr.set_reclaiming(Reclaiming(), T0).free == mgr.free
    assert mgr.reclaiming is None


def test_register_escalates_the_spawn_allocation_and_unregister_returns_it():
    h = seed_chain()
    sup = h.supervisors["research", "sup-1"]
    grants = spawn(h, "research", "sup-1", "b", res(12, "1Gi"), "spawn-b", T0)
    assert [g.own for g in grants] == [res(10, "1Gi"), res(2)]
    assert grants[0].spawn
    assert key_agent(grants[0].key) == "research/b"
    assert "spawn-b" in grants[0].key
    assert h.audit().ok
    # an identical retry is idempotent (created: the same request made it) and takes nothing
    before = h.dumps()
    again = sup.register_child(RegisterChild(request_id="spawn-b", name="b", resources=res(12, "1Gi"),
                                             escalate=True), T0)
    assert (again.created, again.grant) == (True, grants[0])
    assert h.dumps() == before
    # without escalation the supervisor refuses what it cannot pay
    with pytest.raises(CapacityExceeded):
        sup.register_child(RegisterChild(request_id="spawn-c", name="c", resources=res(1)), T0)
    assert h.dumps() == before
    # stopping the agent returns its grants, to be released above as well
    result = sup.unregister_child(ChildRef(name="b"), T0)
    assert result.released == res(12, "1Gi")
    assert result.grants == [grants[0]]
    mgr_released, orch_released = release_above(h, "research", "sup-1", [g.key for g in result.grants], T0)
    assert (mgr_released, orch_released) == ([grants[1]], [])
    assert all(lv.grants == {} for lv in h.levels())
    assert h.audit().ok


def test_an_allocation_named_like_the_spawn_request_is_not_the_spawn_allocation():
    h = seed_chain()
    spawned = spawn(h, "research", "sup-1", "b", res(2), "x", T0)
    got = alloc_for(h, "b", res(2), "x")  # allocation id == the spawn's request id, same size
    assert got[0].key != spawned[0].key
    assert not got[0].spawn
    assert h.supervisors["research", "sup-1"].children["b"].resources == res(4)


def test_release_by_agent_and_by_owner():
    h = seed_chain()
    sup, mgr, _ = h.chain("research", "sup-1")
    x = alloc(h, res(6), "x")
    y = alloc(h, res(6), "y")
    # compensation of another request releases nothing
    assert sup.release(ReleaseGrants(keys=[x[0].key, y[0].key], owner="z"), T0).released == []
    assert [g.key for g in sup.release(ReleaseGrants(keys=[y[0].key], owner="y"), T0).released] == [y[0].key]
    assert mgr.release(ReleaseGrants(agent="research/a"), T0).keys == [y[0].key]
    assert sup.release(ReleaseGrants(agent="research/a"), T0).keys == [x[0].key]
    assert sup.children[AGENT].resources == Resources()
    assert all(lv.grants == {} for lv in h.levels())
    # an idle reclaim gives back what an agent allocated but keeps its spawn allocation
    b = spawn(h, "research", "sup-1", "b", res(3), "spawn-b", T0)
    z = alloc_for(h, "b", res(8), "z")
    assert [g.own for g in z] == [res(7), res(1)]
    assert sup.release(ReleaseGrants(agent="research/b", keep_spawn=True), T0).keys == [z[0].key]
    assert mgr.release(ReleaseGrants(keys=[z[0].key]), T0).keys == [z[0].key]
    assert sup.children["b"].resources == res(3)
    assert sup.grants == {b[0].key: b[0]}
    assert h.audit().ok


# -- 4. the audit can fail ---------------------------------------------------------------------------


def broken_base() -> tuple[list[LedgerSnapshot], str]:
    """A consistent hierarchy whose one allocation went through all three levels."""
    h = seed_chain()
    grants = alloc(h, res(25, "2Gi"))
    snaps = [lv.snapshot() for lv in h.levels()]
    report = audit(snaps)
    assert report.ok
    assert (report.levels, report.allocations) == (3, 1)
    return snaps, grants[0].key


def by_level(snaps: list[LedgerSnapshot], level: str) -> LedgerSnapshot:
    return next(s for s in snaps if s.level == level)


def assert_caught(snaps: list[LedgerSnapshot], *words: str) -> None:
    report = audit(snaps)
    assert not report.ok
    assert any(all(w in p for w in words) for p in report.problems), report.problems


def test_audit_catches_a_leaked_parent_grant():
    snaps, key = broken_base()
    sup = by_level(snaps, "supervisor")
    sup.grants = []  # the supervisor released, the domain never did
    sup.agents[AGENT] = Resources()
    assert_caught(snaps, "manager/research", key, "leaked")


def test_audit_catches_a_mismatched_borrowed_amount():
    snaps, key = broken_base()
    mgr = by_level(snaps, "manager")
    g = mgr.grants[0]
    mgr.grants[0] = g.model_copy(update={"own": g.own.minus(res(1))})
    assert_caught(snaps, "supervisor/research/sup-1", key, "borrowed")


def test_audit_catches_a_grant_to_the_wrong_child():
    snaps, key = broken_base()
    orch = by_level(snaps, "orchestrator")
    orch.grants[0] = orch.grants[0].model_copy(update={"child": "support"})
    assert_caught(snaps, "orchestrator", key, "not research")


def test_audit_catches_borrowing_at_the_top():
    snaps, key = broken_base()
    orch = by_level(snaps, "orchestrator")
    orch.grants[0] = orch.grants[0].model_copy(update={"borrowed": res(1)})
    assert_caught(snaps, "(the top) borrowed", key)


def test_audit_catches_an_oversubscribed_level():
    snaps, _ = broken_base()
    orch = by_level(snaps, "orchestrator")
    orch.capacity = res(24, "100Gi", 4)  # carved 20 + own 5 CPU
    assert_caught(snaps, "orchestrator is oversubscribed", "cpu_millis")


def test_audit_catches_an_agent_record_that_is_not_its_grants():
    snaps, _ = broken_base()
    sup = by_level(snaps, "supervisor")
    sup.agents[AGENT] = res(26, "2Gi")
    assert_caught(snaps, "records agent a", "grants sum to")
    sup.agents = {}
    assert_caught(snaps, "not one of its agents")


def test_audit_catches_slices_that_do_not_match():
    snaps, _ = broken_base()
    by_level(snaps, "supervisor").capacity = res(11, "10Gi", 1)
    assert_caught(snaps, "records sup-1 at", "supervisor/research/sup-1 has")
    snaps, _ = broken_base()
    by_level(snaps, "manager").carved = res(9, "10Gi", 1)
    assert_caught(snaps, "manager/research carved", "children's slices sum to")


def test_audit_catches_a_parent_grant_the_child_did_not_borrow():
    snaps, key = broken_base()
    sup = by_level(snaps, "supervisor")
    g = sup.grants[0]
    sup.grants[0] = g.model_copy(update={"borrowed": Resources()})  # paid all itself, yet the domain granted too
    sup.agents[AGENT] = g.own
    assert_caught(snaps, "manager/research granted", key, "which borrowed 0 CPU")


def test_retried_spawn_of_an_agent_without_spawn_resources_is_idempotent():
    h = seed_chain()  # spawned agent a with no resources (request spawn-a)
    alloc(h, res(1))
    before = h.dumps()
    sup = h.supervisors["research", "sup-1"]
    again = sup.register_child(RegisterChild(request_id="spawn-a", name=AGENT, resources=Resources(),
                                             escalate=True), T0)
    assert (again.created, again.grant) == (True, None)
    assert h.dumps() == before
    # its allocations do not define it: spawning it again with their size is a conflict
    with pytest.raises(Conflict, match="different definition"):
        sup.register_child(RegisterChild(request_id="spawn-a", name=AGENT, resources=res(1), escalate=True), T0)
    assert h.dumps() == before


def test_keep_spawn_keeps_the_spawn_share_at_every_level():
    """A spawn that borrowed marks its shares above as spawn shares too: releasing an agent's extra
    allocations with keep_spawn at the domain or global level leaves the spawn allocation whole."""
    h = seed_chain()
    spawn(h, "research", "sup-1", "b", Resources.of(cpu=12, memory="1Gi"), "spawn-b", T0)  # sup pays 10, domain 2
    extra = alloc_for(h, "b", Resources.of(cpu=1), "extra")
    assert any(not g.own.is_zero() for g in extra[1:]), "the extra allocation was lent from above"
    _, mgr, orch = h.chain("research", "sup-1")
    released = mgr.release(ReleaseGrants(agent="research/b", keep_spawn=True), T0).keys
    released += orch.release(ReleaseGrants(agent="research/b", keep_spawn=True), T0).keys
    h.supervisors["research", "sup-1"].release(ReleaseGrants(agent="research/b", keep_spawn=True), T0)
    assert released and all(k.endswith("#extra") for k in released)
    assert h.audit().ok, h.audit().problems
