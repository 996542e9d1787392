"""LevelState: the pure transitions shared by the orchestrator, managers and supervisors."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tetrarch.agent import AgentSpec, AgentState
from tetrarch.errors import (
    CapacityExceeded,
    Conflict,
    HasChildren,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    TetrarchError,
)
from tetrarch.level import (
    BeginRemoval,
    ChildRef,
    ConfigureLevel,
    LevelState,
    ReconfigureChild,
    RegisterChild,
)
from tetrarch.models import AgentStatus, ChildStatus, Health, LevelSummary, ResourceTotals
from tetrarch.names import Level, is_valid_name
from tetrarch.policy import DEFAULT_AGENT_RESOURCES, Policy
from tetrarch.resources import Resources, total

T0 = datetime(2025, 1, 1, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)

MANAGEMENT_LEVELS = [Level.ORCHESTRATOR, Level.MANAGER, Level.SUPERVISOR]


def res(cpu: float | str = 0, memory: float | str = 0, gpu: int = 0) -> Resources:
    return Resources.of(cpu=cpu, memory=memory, gpu=gpu)


def make_level(level: Level, capacity: Resources | None = None, policy: Policy | None = None,
               name: str | None = None, domain: str = "research") -> LevelState:
    """A fresh level of kind ``level`` (10 CPU / 10Gi / 1 GPU unless told)."""
    if name is None:
        name = {Level.ORCHESTRATOR: "orchestrator", Level.MANAGER: domain, Level.SUPERVISOR: "sup-1"}[level]
    return LevelState(
        level=level, name=name, domain=None if level is Level.ORCHESTRATOR else domain,
        capacity=capacity if capacity is not None else res(10, "10Gi", 1),
        policy=policy or Policy(), created_at=T0, updated_at=T0)


def reg(name: str, resources: Resources | None = None, request_id: str = "req-1",
        policy: Policy | None = None) -> RegisterChild:
    return RegisterChild(request_id=request_id, name=name, resources=resources, policy=policy or Policy())


@pytest.fixture(params=MANAGEMENT_LEVELS, ids=lambda lv: lv.value)
def level(request):
    return request.param


# -- identity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lv", "entity_id", "scope", "child_level", "child_id"),
    [
        (Level.ORCHESTRATOR, "orchestrator", "system", Level.MANAGER, "manager/x"),
        (Level.MANAGER, "manager/research", "domain:research", Level.SUPERVISOR, "supervisor/research/x"),
        (Level.SUPERVISOR, "supervisor/research/sup-1", "supervisor:research/sup-1", Level.AGENT,
         "agent/research/x"),
    ],
)
def test_identity(lv, entity_id, scope, child_level, child_id):
    s = make_level(lv)
    assert s.entity_id == entity_id
    assert s.scope == scope
    assert s.child_level is child_level
    assert s.child_entity_id("x") == child_id
    assert s.register_child(reg("x", res(1)), T0).child.entity_id == child_id


# -- admission --------------------------------------------------------------------------------------


def test_admission_carves_capacity(level):
    s = make_level(level)
    result = s.register_child(reg("a", res(3, "2Gi", 1)), LATER)
    assert result.created is True
    assert result.child.name == "a"
    assert result.child.status is ChildStatus.ACTIVE
    assert result.child.resources == res(3, "2Gi", 1)
    assert s.granted == res(3, "2Gi", 1)
    assert s.free == res(7, "8Gi", 0)
    assert s.capacity == res(10, "10Gi", 1)
    assert s.updated_at == LATER
    assert s.children["a"].request_id == "req-1"

    s.register_child(reg("b", res("500m", "512Mi"), request_id="req-2"), LATER)
    assert s.granted == res("3500m", "2560Mi", 1)
    assert s.free == res("6500m", "7680Mi", 0)
    pool = s.view(LATER).pool
    assert (pool.capacity, pool.granted, pool.free) == (s.capacity, s.granted, s.free)


def test_admission_can_fill_the_pool_exactly(level):
    s = make_level(level)
    s.register_child(reg("a", res(6, "4Gi")), T0)
    s.register_child(reg("b", res(4, "6Gi", 1)), T0)
    assert s.free == Resources()
    assert s.granted == s.capacity


def test_default_resources_are_the_agent_default(level):
    s = make_level(level)
    assert s.register_child(reg("a"), T0).child.resources == DEFAULT_AGENT_RESOURCES
    p = make_level(level, policy=Policy(default_agent_resources=res("250m", "256Mi")))
    assert p.register_child(reg("a"), T0).child.resources == res("250m", "256Mi")
    assert p.granted == res("250m", "256Mi")


def test_identical_reregistration_is_idempotent(level):
    s = make_level(level)
    first = s.register_child(reg("a", res(2, "2Gi"), request_id="req-1"), T0)
    before = s.model_dump()
    again = s.register_child(reg("a", res(2, "2Gi"), request_id="req-1"), LATER)
    assert again.created is True  # the same request retried: it created the child
    other = s.register_child(reg("a", res(2, "2Gi"), request_id="req-2"), LATER)
    assert other.created is False  # another request found it already there
    assert again.child == first.child == other.child
    assert s.model_dump() == before  # nothing carved twice, nothing touched
    assert s.granted == res(2, "2Gi")


def test_identical_reregistration_succeeds_even_when_full_or_at_limit(level):
    s = make_level(level, policy=Policy(max_children=1))
    s.register_child(reg("a", s.capacity), T0)
    assert s.register_child(reg("a", res(10, "10Gi", 1), request_id="retry"), LATER).created is False
    assert list(s.children) == ["a"]


@pytest.mark.parametrize(
    "changed",
    [
        {"resources": res(3, "2Gi")},
        {"resources": res(2, "2Gi", 1)},
        {"policy": Policy(max_children=5)},
        {"policy": Policy(version=2)},
    ],
)
def test_different_definition_is_a_conflict(level, changed):
    s = make_level(level)
    s.register_child(reg("a", res(2, "2Gi")), T0)
    before = s.model_dump()
    args: dict[str, Any] = {"resources": res(2, "2Gi"), "policy": Policy()} | changed
    with pytest.raises(Conflict) as exc:
        s.register_child(RegisterChild(request_id="req-1", name="a", **args), LATER)
    assert "already exists" in exc.value.message
    assert exc.value.level == level.value
    assert exc.value.entity == s.entity_id
    assert exc.value.data["existing"] == res(2, "2Gi").model_dump()
    assert s.model_dump() == before


@pytest.mark.parametrize("name", ["", "A", "Bad", "a_b", "a.b", "-a", "a-", "a b", "é", "a" * 64, "agent/x"])
def test_invalid_names_are_refused(level, name):
    s = make_level(level)
    before = s.model_dump()
    with pytest.raises(InvalidRequest) as exc:
        s.register_child(reg(name, res(1)), LATER)
    assert "DNS label" in exc.value.message
    assert exc.value.code == "InvalidRequest"
    assert s.model_dump() == before


@pytest.mark.parametrize("name", ["a", "0", "a-b", "sup-1", "x" * 63, "a1b2-c3"])
def test_valid_names_are_admitted(level, name):
    s = make_level(level)
    assert s.register_child(reg(name, res(1)), T0).created
    assert name in s.children


def test_over_capacity_is_refused_with_problems(level):
    s = make_level(level)
    s.register_child(reg("a", res(8, "2Gi")), T0)
    before = s.model_dump()
    with pytest.raises(CapacityExceeded) as exc:
        s.register_child(reg("b", res(3, "9Gi", 2)), LATER)
    assert exc.value.problems == ["cpu: needs 3, has 2", "memory: needs 9Gi, has 8Gi", "gpu: needs 2, has 1"]
    assert exc.value.level == level.value
    assert "'b'" in exc.value.message
    assert s.model_dump() == before
    # one component short is enough to refuse, and only that component is named
    with pytest.raises(CapacityExceeded) as exc:
        s.register_child(reg("b", res("2001m")), LATER)
    assert exc.value.problems == ["cpu: needs 2001m, has 2"]
    assert s.model_dump() == before


def test_policy_max_children(level):
    s = make_level(level, policy=Policy(max_children=2))
    s.register_child(reg("a", res(1)), T0)
    s.register_child(reg("b", res(1)), T0)
    before = s.model_dump()
    with pytest.raises(LimitExceeded) as exc:
        s.register_child(reg("c", res(1)), LATER)
    assert "at most 2" in exc.value.message
    assert s.model_dump() == before
    # a child being removed still counts until it is gone
    s.begin_child_removal(ChildRef(name="a"), LATER)
    with pytest.raises(LimitExceeded):
        s.register_child(reg("c", res(1)), LATER)
    s.unregister_child(ChildRef(name="a"), LATER)
    assert s.register_child(reg("c", res(1)), LATER).created


def test_max_children_zero_admits_nothing(level):
    s = make_level(level, policy=Policy(max_children=0))
    with pytest.raises(LimitExceeded):
        s.register_child(reg("a", res(1)), T0)
    assert s.children == {}


def test_removing_level_refuses_admissions(level):
    s = make_level(level)
    s.register_child(reg("a", res(1)), T0)
    s.begin_removal(BeginRemoval(drain=True), T0)
    before = s.model_dump()
    with pytest.raises(Conflict) as exc:
        s.register_child(reg("b", res(1)), LATER)
    assert "being removed" in exc.value.message
    assert s.model_dump() == before
    # a retry of an admission that already happened still answers
    assert s.register_child(reg("a", res(1)), LATER).created is True
    # once the removal is cancelled, admissions resume
    s.cancel_removal(LATER)
    assert s.status is ChildStatus.ACTIVE
    assert s.register_child(reg("b", res(1)), LATER).created


# -- reconfiguration --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [Level.ORCHESTRATOR, Level.MANAGER], ids=lambda lv: lv.value)
def test_reconfigure_bounds(level):
    s = make_level(level)
    s.register_child(reg("a", res(4, "4Gi")), T0)
    s.register_child(reg("b", res(3, "3Gi")), T0)
    # a may grow into the free pool plus its own old slice: 3 + 4 CPU, 3Gi + 4Gi
    result = s.reconfigure_child(ReconfigureChild(request_id="r", name="a", resources=res(7, "7Gi", 1)), LATER)
    assert result.previous_resources == res(4, "4Gi")
    assert result.previous_policy == Policy()
    assert result.child.resources == res(7, "7Gi", 1)
    assert s.free == Resources()
    assert s.updated_at == LATER
    before = s.model_dump()
    with pytest.raises(CapacityExceeded) as exc:
        s.reconfigure_child(ReconfigureChild(request_id="r", name="a", resources=res("7001m", "7Gi", 1)),
                            LATER + timedelta(1))
    assert exc.value.problems == ["cpu: needs 7001m, has 7"]
    assert s.model_dump() == before
    # shrinking always fits and returns the difference to the pool
    s.reconfigure_child(ReconfigureChild(request_id="r", name="a", resources=res(1, "1Gi")), LATER)
    assert s.free == res(6, "6Gi", 1)
    assert s.granted + s.free == s.capacity


def test_reconfigure_policy_only_and_unknown_child(level):
    s = make_level(level)
    s.register_child(reg("a", res(2)), T0)
    p = Policy(version=2, max_children=3)
    result = s.reconfigure_child(ReconfigureChild(request_id="r", name="a", policy=p), LATER)
    assert s.children["a"].policy == p
    assert s.children["a"].resources == res(2)
    assert result.previous_policy == Policy()
    before = s.model_dump()
    with pytest.raises(NotFound) as exc:
        s.reconfigure_child(ReconfigureChild(request_id="r", name="zz", resources=res(1)), LATER)
    assert exc.value.data == {"name": "zz"}
    assert s.model_dump() == before


def test_configure_capacity_and_policy(level):
    s = make_level(level)
    s.register_child(reg("a", res(4, "4Gi")), T0)
    s.register_child(reg("b", res(2, "2Gi")), T0)
    view = s.configure(ConfigureLevel(resources=res(6, "6Gi")), LATER)  # exactly what the children hold
    assert s.capacity == res(6, "6Gi")
    assert view.pool.free == Resources()
    s.configure(ConfigureLevel(policy=Policy(version=2, max_children=2)), LATER)
    assert s.policy.max_children == 2


def test_configure_refuses_capacity_below_granted_and_limit_below_count(level):
    s = make_level(level)
    s.register_child(reg("a", res(4, "4Gi")), T0)
    s.register_child(reg("b", res(2, "2Gi")), T0)
    before = s.model_dump()
    with pytest.raises(Conflict) as exc:
        s.configure(ConfigureLevel(resources=res(5, "10Gi")), LATER)
    assert exc.value.problems == ["capacity cpu: children hold more (needs 6, has 5)"]
    with pytest.raises(Conflict) as exc:
        s.configure(ConfigureLevel(policy=Policy(max_children=1)), LATER)
    assert len(exc.value.problems) == 1
    assert "max_children 1" in exc.value.problems[0]
    # both problems at once, and neither half applied
    with pytest.raises(Conflict) as exc:
        s.configure(ConfigureLevel(resources=res(10, "1Gi"), policy=Policy(max_children=1)), LATER)
    assert len(exc.value.problems) == 2
    assert exc.value.problems[0].startswith("capacity memory")
    assert s.model_dump() == before


# -- removal of children ----------------------------------------------------------------------------


def test_child_removal_lifecycle(level):
    s = make_level(level)
    s.register_child(reg("a", res(2, "1Gi")), T0)
    view = s.begin_child_removal(ChildRef(request_id="r", name="a"), LATER)
    assert view.status is ChildStatus.REMOVING
    assert s.children["a"].status is ChildStatus.REMOVING
    # an identical re-registration of a child being removed is refused
    with pytest.raises(Conflict, match="being removed"):
        s.register_child(reg("a", res(2, "1Gi")), LATER)
    lookup = s.cancel_child_removal(ChildRef(name="a"), LATER)
    assert lookup.child is not None
    assert lookup.child.status is ChildStatus.ACTIVE
    s.begin_child_removal(ChildRef(name="a"), LATER)
    assert s.unregister_child(ChildRef(name="a"), LATER).released == res(2, "1Gi")
    assert s.children == {}
    assert s.free == s.capacity
    # idempotent: the second removal releases nothing
    assert s.unregister_child(ChildRef(name="a"), LATER).released is None
    assert s.cancel_child_removal(ChildRef(name="a"), LATER).child is None
    with pytest.raises(NotFound):
        s.begin_child_removal(ChildRef(name="a"), LATER)


# -- removal of the level itself --------------------------------------------------------------------


def test_begin_removal_with_children_without_drain(level):
    s = make_level(level)
    for n in ("b", "a", "c"):
        s.register_child(reg(n, res(1)), T0)
    before = s.model_dump()
    with pytest.raises(HasChildren) as exc:
        s.begin_removal(BeginRemoval(), LATER)
    assert exc.value.data == {"children": ["a", "b", "c"]}
    assert "a, b, c" in exc.value.message
    assert s.model_dump() == before
    assert s.status is ChildStatus.ACTIVE


def test_begin_removal_names_at_most_ten_in_the_message(level):
    s = make_level(level, capacity=res(100))
    names = [f"c{i:02d}" for i in range(12)]
    for n in names:
        s.register_child(reg(n, res(1)), T0)
    with pytest.raises(HasChildren) as exc:
        s.begin_removal(BeginRemoval(), LATER)
    assert exc.value.data["children"] == names
    assert "c09" in exc.value.message
    assert "c10" not in exc.value.message
    assert exc.value.message.count("...") == 1


def test_begin_removal_with_drain_lists_children(level):
    s = make_level(level)
    for n in ("b", "a"):
        s.register_child(reg(n, res(1)), T0)
    plan = s.begin_removal(BeginRemoval(drain=True), LATER)
    assert plan.children == ["a", "b"]
    assert s.status is ChildStatus.REMOVING
    assert s.health() is Health.DRAINING
    assert s.summary(LATER).status == "removing"
    # asking again is harmless
    assert s.begin_removal(BeginRemoval(drain=True), LATER).children == ["a", "b"]


def test_begin_removal_of_empty_level_needs_no_drain(level):
    s = make_level(level)
    assert s.begin_removal(BeginRemoval(), LATER).children == []
    assert s.status is ChildStatus.REMOVING


def test_close_only_when_removing_and_empty(level):
    s = make_level(level)
    with pytest.raises(Conflict, match="must begin removal"):
        s.check_can_close()
    s.register_child(reg("a", res(1)), T0)
    with pytest.raises(Conflict):
        s.check_can_close()
    s.begin_removal(BeginRemoval(drain=True), T0)
    with pytest.raises(HasChildren) as exc:
        s.check_can_close()
    assert exc.value.data == {"children": ["a"]}
    s.unregister_child(ChildRef(name="a"), T0)
    s.check_can_close()  # no error
    s.cancel_removal(LATER)
    with pytest.raises(Conflict):
        s.check_can_close()


# -- reports and summaries --------------------------------------------------------------------------


def report(name: str, seq: int, level: Level = Level.AGENT, **kw: Any) -> LevelSummary:
    return LevelSummary(entity_id=f"x/{name}", level=level, name=name, seq=seq, **kw)


def test_apply_report_ignores_stale_and_unknown(level):
    s = make_level(level)
    s.register_child(reg("a", res(1)), T0)
    assert s.apply_report(report("zz", 1)) is False
    assert "zz" not in s.children
    assert s.apply_report(report("a", 0, status="running")) is True
    assert s.children["a"].last_report is not None
    assert s.apply_report(report("a", 2, status="running")) is True
    before = s.model_dump()
    assert s.apply_report(report("a", 2, status="failed")) is False
    assert s.apply_report(report("a", 1, status="failed")) is False
    assert s.model_dump() == before
    assert s.children["a"].last_report.status == "running"
    assert s.apply_report(report("a", 3, status="stopped")) is True
    assert s.children["a"].last_report.status == "stopped"
    assert s.view_child("a").last_report == s.children["a"].last_report


def agent_report(name: str, status: AgentStatus, seq: int = 1) -> LevelSummary:
    a = AgentState(spec=AgentSpec(domain="research", supervisor="sup-1", name=name, resources=DEFAULT_AGENT_RESOURCES),
                   status=status, report_seq=seq, started_at=T0, updated_at=T0)
    return a.summary(LATER)


def build_chain(a2_status: AgentStatus = AgentStatus.RUNNING) -> tuple[LevelState, LevelState, LevelState]:
    """orchestrator(1000/1Ti) > research(100/100Gi) > sup-1(10/10Gi) > 3 agents; plus unreported siblings."""
    sup = make_level(Level.SUPERVISOR, capacity=res(10, "10Gi"), domain="research", name="sup-1")
    for n in ("a1", "a2", "a3"):
        sup.register_child(reg(n), T0)  # the default 1 CPU / 1Gi
    assert sup.apply_report(agent_report("a1", AgentStatus.RUNNING))
    assert sup.apply_report(agent_report("a2", a2_status))
    # a3 never reported: it counts as starting
    sup.report_seq = 5

    mgr = make_level(Level.MANAGER, capacity=res(100, "100Gi"), domain="research", name="research")
    mgr.register_child(reg("sup-1", res(10, "10Gi")), T0)
    mgr.register_child(reg("sup-2", res(20, "20Gi")), T0)  # never reported
    assert mgr.apply_report(sup.summary(LATER))
    mgr.report_seq = 7

    orch = make_level(Level.ORCHESTRATOR, capacity=res(1000, "1Ti"))
    orch.register_child(reg("research", res(100, "100Gi")), T0)
    orch.register_child(reg("support", res(50, "50Gi")), T0)  # never reported
    assert orch.apply_report(mgr.summary(LATER))
    return orch, mgr, sup


def test_summary_aggregates_a_three_level_chain():
    orch, mgr, sup = build_chain()

    s = sup.summary(LATER)
    assert s.entity_id == "supervisor/research/sup-1"
    assert s.level is Level.SUPERVISOR
    assert s.seq == 5
    assert s.resources == res(10, "10Gi")
    assert s.supervisors == 1
    assert s.agents_by_status == {"running": 2, "starting": 1}
    assert s.resources_by_level == {
        "supervisor": ResourceTotals(capacity=res(10, "10Gi"), granted=res(3, "3Gi")),
        "agent": ResourceTotals(capacity=res(3, "3Gi"), granted=res(3, "3Gi")),
    }
    assert s.health is Health.HEALTHY

    m = mgr.summary(LATER)
    assert m.entity_id == "manager/research"
    assert m.seq == 7
    assert m.supervisors == 2
    assert m.agents_by_status == {"running": 2, "starting": 1}
    assert m.resources_by_level == {
        "manager": ResourceTotals(capacity=res(100, "100Gi"), granted=res(30, "30Gi")),
        "supervisor": ResourceTotals(capacity=res(30, "30Gi"), granted=res(3, "3Gi")),
        "agent": ResourceTotals(capacity=res(3, "3Gi"), granted=res(3, "3Gi")),
    }

    o = orch.summary(LATER)
    assert o.entity_id == "orchestrator"
    assert o.level is Level.ORCHESTRATOR
    assert o.supervisors == 2
    assert o.agents_by_status == {"running": 2, "starting": 1}
    assert o.resources_by_level == {
        "orchestrator": ResourceTotals(capacity=res(1000, "1Ti"), granted=res(150, "150Gi")),
        "manager": ResourceTotals(capacity=res(150, "150Gi"), granted=res(30, "30Gi")),
        "supervisor": ResourceTotals(capacity=res(30, "30Gi"), granted=res(3, "3Gi")),
        "agent": ResourceTotals(capacity=res(3, "3Gi"), granted=res(3, "3Gi")),
    }
    assert o.health is Health.HEALTHY
    assert orch.view(LATER).metrics == o


def test_summary_of_empty_levels(level):
    s = make_level(level)
    out = s.summary(LATER)
    assert out.agents_by_status == {}
    assert out.supervisors == (1 if level is Level.SUPERVISOR else 0)
    assert out.resources_by_level == {level.value: ResourceTotals(capacity=s.capacity)}
    assert out.reported_at == LATER


def test_a_failed_agent_degrades_every_level_above():
    orch, mgr, sup = build_chain(a2_status=AgentStatus.FAILED)
    assert sup.health() is Health.DEGRADED
    s = sup.summary(LATER)
    assert s.health is Health.DEGRADED
    assert s.agents_by_status == {"running": 1, "failed": 1, "starting": 1}
    assert mgr.health() is Health.DEGRADED
    assert orch.health() is Health.DEGRADED
    assert orch.summary(LATER).agents_by_status == {"running": 1, "failed": 1, "starting": 1}
    # the agent recovers (a newer report): every level is healthy again once reports flow up
    assert sup.apply_report(agent_report("a2", AgentStatus.STOPPED, seq=2))
    assert sup.health() is Health.HEALTHY
    sup.report_seq += 1
    assert mgr.apply_report(sup.summary(LATER))
    assert mgr.health() is Health.HEALTHY
    mgr.report_seq += 1
    assert orch.apply_report(mgr.summary(LATER))
    assert orch.health() is Health.HEALTHY
    assert orch.summary(LATER).agents_by_status == {"running": 1, "stopped": 1, "starting": 1}


def test_a_degraded_report_without_failed_agents_degrades_the_parent():
    s = make_level(Level.MANAGER)
    s.register_child(reg("sup-1", res(1)), T0)
    s.apply_report(report("sup-1", 1, level=Level.SUPERVISOR, health=Health.DEGRADED))
    assert s.health() is Health.DEGRADED


def test_failed_agents_counted_in_a_report_degrade_the_parent():
    s = make_level(Level.ORCHESTRATOR)
    s.register_child(reg("research", res(1)), T0)
    s.apply_report(report("research", 1, level=Level.MANAGER, health=Health.HEALTHY,
                          agents_by_status={"running": 3, "failed": 1}))
    assert s.health() is Health.DEGRADED
    s.apply_report(report("research", 2, level=Level.MANAGER, agents_by_status={"running": 3, "failed": 0}))
    assert s.health() is Health.HEALTHY


def test_stale_report_does_not_change_the_summary():
    _, mgr, sup = build_chain()
    before = mgr.summary(LATER)
    stale = sup.summary(LATER).model_copy(update={"agents_by_status": {"failed": 99}})  # same seq
    assert mgr.apply_report(stale) is False
    assert mgr.summary(LATER) == before


def test_view(level):
    s = make_level(level)
    s.register_child(reg("b", res(2)), T0)
    s.register_child(reg("a", res(1)), T0)
    v = s.view(LATER, run_updates=4)
    assert v.id == s.entity_id
    assert v.level is level
    assert v.scope == s.scope
    assert [c.name for c in v.children] == ["a", "b"]
    assert v.pool.granted == res(3)
    assert v.pool.free == res(7, "10Gi", 1)
    assert v.run_updates == 4
    assert v.health is Health.HEALTHY


# -- refused transitions change nothing -------------------------------------------------------------


def populated(level: Level, policy: Policy | None = None) -> LevelState:
    s = make_level(level, policy=policy)
    s.register_child(reg("a", res(4, "4Gi")), T0)
    s.register_child(reg("b", res(2, "2Gi")), T0)
    s.begin_child_removal(ChildRef(name="b"), T0)
    s.apply_report(report("a", 3))
    return s


REFUSALS: dict[str, tuple[Callable[[LevelState], object], type[TetrarchError], Policy | None]] = {
    "invalid name": (lambda s: s.register_child(reg("Nope!", res(1)), LATER), InvalidRequest, None),
    "different definition": (lambda s: s.register_child(reg("a", res(5)), LATER), Conflict, None),
    "re-register a removing child": (lambda s: s.register_child(reg("b", res(2, "2Gi")), LATER), Conflict, None),
    "over capacity": (lambda s: s.register_child(reg("c", res(5)), LATER), CapacityExceeded, None),
    "over the limit": (lambda s: s.register_child(reg("c", res(1)), LATER), LimitExceeded,
                       Policy(max_children=2)),
    "resize beyond free + old": (
        lambda s: s.reconfigure_child(ReconfigureChild(request_id="r", name="a", resources=res(9), policy=Policy(
            version=3)), LATER), CapacityExceeded, None),
    "resize unknown": (lambda s: s.reconfigure_child(ReconfigureChild(request_id="r", name="zz"), LATER), NotFound,
                       None),
    "remove unknown": (lambda s: s.begin_child_removal(ChildRef(name="zz"), LATER), NotFound, None),
    "capacity below granted": (lambda s: s.configure(ConfigureLevel(resources=res(5, "1Ti", 9),
                                                                    policy=Policy(version=2)), LATER),
                               Conflict, None),
    "limit below count": (lambda s: s.configure(ConfigureLevel(resources=res(20, "20Gi"),
                                                               policy=Policy(max_children=1)), LATER),
                          Conflict, None),
    "removal without drain": (lambda s: s.begin_removal(BeginRemoval(), LATER), HasChildren, None),
    "close while active": (lambda s: s.check_can_close(), Conflict, None),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_transition_leaves_state_unchanged(level, case):
    op, error, policy = REFUSALS[case]
    if case == "resize beyond free + old" and level is Level.SUPERVISOR:
        error = InvalidRequest  # agents hold allocations, not slices; they are resized by allocating
    s = populated(level, policy)
    before = s.model_dump()
    with pytest.raises(error):
        op(s)
    assert s.model_dump() == before


def test_refused_admission_while_removing_leaves_state_unchanged(level):
    s = populated(level)
    s.begin_removal(BeginRemoval(drain=True), T0)
    before = s.model_dump()
    with pytest.raises(Conflict):
        s.register_child(reg("c", res(1)), LATER)
    with pytest.raises(HasChildren):
        s.check_can_close()
    assert s.model_dump() == before


def test_state_survives_a_round_trip(level):
    """The whole state is carried across continue-as-new as JSON."""
    s = populated(level)
    again = LevelState.model_validate_json(s.model_dump_json())
    assert again == s
    assert again.free == s.free


# -- a property over random sequences ---------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "Bad_Name"])
SLICES = st.builds(Resources, cpu_millis=st.integers(0, 6000), memory_mib=st.integers(0, 6144),
                   gpu=st.integers(0, 2))
CAPACITIES = st.builds(Resources, cpu_millis=st.integers(0, 12000), memory_mib=st.integers(0, 12288),
                       gpu=st.integers(0, 3))


class LevelMachine(RuleBasedStateMachine):
    """Drive one level with random admissions, resizes, removals and reconfigurations against a model."""

    state: LevelState
    model: dict[str, Resources]
    request_ids: dict[str, str]

    def now(self) -> datetime:
        self.tick += 1
        return T0 + timedelta(seconds=self.tick)

    def expect_unchanged(self, before: dict[str, Any]) -> None:
        assert self.state.model_dump() == before

    def model_free(self) -> Resources:
        return self.state.capacity.minus(total(list(self.model.values())))

    @initialize(level=st.sampled_from([Level.ORCHESTRATOR, Level.MANAGER]), capacity=CAPACITIES)
    def start(self, level, capacity):
        self.state = make_level(level, capacity=capacity)
        self.model = {}
        self.request_ids = {}
        self.tick = 0

    @rule(name=NAMES, resources=SLICES, request_id=st.sampled_from(["r1", "r2"]))
    def register(self, name, resources, request_id):
        before = self.state.model_dump()
        free = self.model_free()
        try:
            result = self.state.register_child(reg(name, resources, request_id=request_id), self.now())
        except InvalidRequest:
            assert not is_valid_name(name)
            self.expect_unchanged(before)
        except Conflict:
            assert name in self.model
            assert self.model[name] != resources
            self.expect_unchanged(before)
        except CapacityExceeded as e:
            assert name not in self.model
            assert not resources.fits_in(free)
            assert e.problems
            self.expect_unchanged(before)
        else:
            assert is_valid_name(name)
            if name in self.model:
                assert self.model[name] == resources
                assert result.created == (self.request_ids[name] == request_id)
                self.expect_unchanged(before)
            else:
                assert resources.fits_in(free)
                assert result.created
                self.model[name] = resources
                self.request_ids[name] = request_id

    @rule(name=NAMES, resources=SLICES)
    def reconfigure(self, name, resources):
        before = self.state.model_dump()
        free = self.model_free()
        try:
            result = self.state.reconfigure_child(ReconfigureChild(request_id="r", name=name, resources=resources),
                                                  self.now())
        except NotFound:
            assert name not in self.model
            self.expect_unchanged(before)
        except CapacityExceeded:
            assert name in self.model
            assert not resources.fits_in(free + self.model[name])
            self.expect_unchanged(before)
        else:
            assert resources.fits_in(free + self.model[name])
            assert result.previous_resources == self.model[name]
            self.model[name] = resources

    @rule(name=NAMES)
    def unregister(self, name):
        released = self.state.unregister_child(ChildRef(name=name), self.now()).released
        assert released == self.model.pop(name, None)
        self.request_ids.pop(name, None)

    @rule(capacity=CAPACITIES)
    def configure(self, capacity):
        before = self.state.model_dump()
        try:
            self.state.configure(ConfigureLevel(resources=capacity), self.now())
        except Conflict:
            assert not total(list(self.model.values())).fits_in(capacity)
            self.expect_unchanged(before)
        else:
            assert self.state.capacity == capacity

    @invariant()
    def pool_balances(self):
        s = self.state
        assert s.granted + s.free == s.capacity
        assert s.granted.fits_in(s.capacity)
        assert s.granted == total(list(self.model.values()))
        assert {n: c.resources for n, c in s.children.items()} == self.model

    def teardown(self):
        if not hasattr(self, "state"):
            return
        for name in list(self.state.children):
            self.state.unregister_child(ChildRef(name=name), self.now())
        assert self.state.children == {}
        assert self.state.free == self.state.capacity
        assert self.state.granted.is_zero()


LevelMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_level_pool_invariants = LevelMachine.TestCase


# -- trials: admissions are tried on a shallow copy by the entities' Update validators ----------------


def _supervisor_with_agents() -> LevelState:
    from tetrarch.decisions import PolicyCheck
    from tetrarch.policy import OperationType

    sup = make_level(Level.SUPERVISOR, capacity=res(2, "2Gi"))
    for i in range(3):
        sup.register_child(RegisterChild(request_id=f"r{i}", name=f"a{i}", resources=res(0.25, "256Mi"),
                                         check=PolicyCheck(operation=OperationType.SPAWN, domain="research",
                                                           supervisor="sup-1", agent=f"a{i}"), escalate=True), T0)
    return sup


def _trial_changes() -> list[tuple[str, Callable[[LevelState], Any]]]:
    from tetrarch.decisions import PolicyCheck
    from tetrarch.level import AdmitAgents, RegisterChildren, Reserve
    from tetrarch.policy import OperationType

    check = PolicyCheck(operation=OperationType.SPAWN, domain="research", supervisor="sup-1")
    many = RegisterChildren(request_id="b", all_or_nothing=False, children=[
        RegisterChild(request_id="b", name=f"b{i}", resources=res(0.5, "512Mi"), escalate=True) for i in range(4)])
    return [
        ("register a new agent", lambda s: s.register_child(reg("new", res(0.5, "512Mi")), LATER)),
        ("register one that borrows", lambda s: s.register_child(
            RegisterChild(request_id="x", name="big", resources=res(4, "4Gi"), escalate=True), LATER)),
        ("register a batch", lambda s: s.register_children(many, LATER)),
        ("register a batch all or nothing", lambda s: s.register_children(
            many.model_copy(update={"all_or_nothing": True}), LATER)),
        ("reserve more for an agent", lambda s: s.reserve(Reserve(
            request_id="q", key="research/a0#q", child="a0", resources=res(1, "1Gi"),
            check=check.model_copy(update={"agent": "a0"})), LATER)),
        ("count agents in", lambda s: s.admit_agents(AdmitAgents(
            request_id="c", agents=["research/z1", "research/z2"], check=check.model_copy(update={"count": 2}),
            depends_on={"research/z2": ["research/z1"]}), LATER)),
    ]


@pytest.mark.parametrize("what", [name for name, _ in _trial_changes()])
def test_an_admission_tried_on_a_trial_copy_leaves_the_state_untouched(what: str) -> None:
    change = dict(_trial_changes())[what]
    sup = _supervisor_with_agents()
    before = sup.model_dump()
    trial = sup.trial()
    change(trial)
    assert trial.model_dump() != before, "the change did nothing, so the test shows nothing"
    assert sup.model_dump() == before, f"trying '{what}' changed the real state"
