"""AgentState: the agent entity's lifecycle and its upward report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tetrarch.agent import AgentSpec, AgentState, StopAgent
from tetrarch.errors import Conflict
from tetrarch.models import AgentStatus, Health
from tetrarch.names import Level
from tetrarch.resources import Resources

T0 = datetime(2025, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)


def make_agent(status: AgentStatus = AgentStatus.STARTING) -> AgentState:
    spec = AgentSpec(domain="research", supervisor="sup-1", name="sup-1-agent-1",
                     resources=Resources.of(cpu=1, memory="1Gi"), labels={"team": "a"})
    return AgentState(spec=spec, status=status, started_at=T0, updated_at=T0)


def test_identity_and_defaults():
    a = make_agent()
    assert a.entity_id == "agent/research/sup-1-agent-1"
    assert a.status is AgentStatus.STARTING
    assert not a.is_terminal
    assert a.spec.image is None


def test_start_then_running():
    a = make_agent()
    a.mark_running(T1)
    assert a.status is AgentStatus.RUNNING
    assert a.updated_at == T1
    # marking again changes nothing
    a.mark_running(T2)
    assert a.status is AgentStatus.RUNNING
    assert a.updated_at == T1


@pytest.mark.parametrize("status", [AgentStatus.STOPPING, AgentStatus.STOPPED, AgentStatus.FAILED])
def test_mark_running_only_from_starting(status):
    a = make_agent(status)
    before = a.model_dump()
    a.mark_running(T1)
    assert a.model_dump() == before


def test_stop_lifecycle():
    a = make_agent()
    a.mark_running(T1)
    a.request_stop(StopAgent(request_id="r1", reason="scale down"), T2)
    assert a.status.value == "stopping"
    assert a.status_reason == "scale down"
    assert a.updated_at == T2
    assert not a.is_terminal
    a.finish_stop(T2 + timedelta(seconds=1))
    assert a.status is AgentStatus.STOPPED
    assert a.is_terminal


@pytest.mark.parametrize("status", [AgentStatus.STOPPING, AgentStatus.STOPPED])
def test_stop_is_idempotent(status):
    a = make_agent(status)
    a.status_reason = "first"
    before = a.model_dump()
    a.request_stop(StopAgent(reason="second"), T2)
    assert a.model_dump() == before


def test_stop_of_a_starting_agent():
    a = make_agent()
    a.request_stop(StopAgent(), T1)
    assert a.status is AgentStatus.STOPPING
    assert a.status_reason == "requested"


def test_failed_agent_cannot_stop_cleanly():
    a = make_agent(AgentStatus.FAILED)
    assert a.is_terminal
    before = a.model_dump()
    with pytest.raises(Conflict) as exc:
        a.request_stop(StopAgent(request_id="r"), T1)
    assert exc.value.level == "agent"
    assert exc.value.entity == "agent/research/sup-1-agent-1"
    assert "failed" in exc.value.message
    assert a.model_dump() == before


@pytest.mark.parametrize(("status", "health"), [
    (AgentStatus.STARTING, Health.HEALTHY),
    (AgentStatus.RUNNING, Health.HEALTHY),
    (AgentStatus.STOPPING, Health.HEALTHY),
    (AgentStatus.STOPPED, Health.HEALTHY),
    (AgentStatus.FAILED, Health.DEGRADED),
])
def test_summary(status, health):
    a = make_agent(status)
    a.report_seq = 4
    s = a.summary(T2)
    assert s.entity_id == a.entity_id
    assert s.level is Level.AGENT
    assert s.name == "sup-1-agent-1"
    assert s.seq == 4
    assert s.health is health
    assert s.status == status.value
    assert s.resources == Resources.of(cpu=1, memory="1Gi")
    assert s.agents_by_status == {status.value: 1}
    assert s.supervisors == 0
    assert s.reported_at == T2


def test_state_round_trip():
    a = make_agent()
    a.mark_running(T1)
    assert AgentState.model_validate_json(a.model_dump_json()) == a
