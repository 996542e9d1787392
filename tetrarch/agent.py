"""The state of an agent entity and its pure transitions.

An agent belongs to one supervisor of one domain, holds the resources its supervisor carved for
it, and reports every status change upward. Task execution, images and lifecycle operations
beyond start and stop grow from this state.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from tetrarch.errors import Conflict
from tetrarch.models import AgentStatus, Health, LevelSummary
from tetrarch.names import Level, agent_id
from tetrarch.resources import Resources

_TERMINAL = (AgentStatus.STOPPED, AgentStatus.FAILED)


class AgentSpec(BaseModel):
    """What an agent is: where it lives and what it holds."""

    domain: str
    supervisor: str
    name: str
    resources: Resources = Field(description="Its spawn allocation; its supervisor's ledger holds every allocation.")
    image: str | None = Field(default=None, description="Agent image reference, once images exist.")
    labels: dict[str, str] = Field(default_factory=dict)
    request_id: str = Field(default="", description="The spawn that made it (its counts are released by it).")


class StopAgent(BaseModel):
    """Ask an agent to stop cleanly."""

    request_id: str = ""
    reason: str = "requested"


class UsageReport(BaseModel):
    """What the agent runtime measured an agent using (the seed's ``reportResourceUsage``)."""

    used: Resources


class Throttle(BaseModel):
    """The supervisor throttles an agent over its quota (or lifts it with ``throttled`` false)."""

    throttled: bool = True
    reason: str = ""


class AgentState(BaseModel):
    """Everything an agent entity knows; carried whole across continue-as-new."""

    spec: AgentSpec
    status: AgentStatus = AgentStatus.STARTING
    status_reason: str = ""
    report_seq: int = 0
    tasks_completed: int = 0
    used: Resources | None = Field(default=None, description="Its last measured use.")
    throttled: bool = Field(default=False, description="Held back by its supervisor for using more than allocated.")
    started_at: datetime
    updated_at: datetime
    continued_as_new: int = 0

    @property
    def entity_id(self) -> str:
        """This agent's workflow id."""
        return agent_id(self.spec.domain, self.spec.name)

    @property
    def is_terminal(self) -> bool:
        """True once the agent stopped or failed."""
        return self.status in _TERMINAL

    def mark_running(self, now: datetime) -> None:
        """The agent finished starting."""
        if self.status is AgentStatus.STARTING:
            self.status = AgentStatus.RUNNING
            self.updated_at = now

    def request_stop(self, req: StopAgent, now: datetime) -> None:
        """Begin a clean stop; stopping a stopped agent is a no-op, a failed one is refused."""
        if self.status is AgentStatus.FAILED:
            raise Conflict(f"{self.entity_id} has failed; it cannot be stopped cleanly",
                           level=Level.AGENT.value, entity=self.entity_id)
        if self.status in (AgentStatus.STOPPING, AgentStatus.STOPPED):
            return
        self.status = AgentStatus.STOPPING
        self.status_reason = req.reason
        self.updated_at = now

    def finish_stop(self, now: datetime) -> None:
        """The agent has released what it ran and is stopped."""
        self.status = AgentStatus.STOPPED
        self.updated_at = now

    def summary(self, now: datetime) -> LevelSummary:
        """The agent's upward report to its supervisor."""
        health = Health.DEGRADED if self.status is AgentStatus.FAILED else Health.HEALTHY
        return LevelSummary(entity_id=self.entity_id, level=Level.AGENT, name=self.spec.name,
                            seq=self.report_seq, health=health, status=self.status.value,
                            resources=self.spec.resources, agents_by_status={self.status.value: 1},
                            used=self.used, reported_at=now)


class AgentLookup(BaseModel):
    """An agent's last known state, and whether its workflow still runs."""

    state: AgentState
    running: bool
