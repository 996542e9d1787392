"""Models shared by every level: the common ``ManagementLevel`` face and upward reports.

The three management levels look alike to a client (the seed's standardized interface): an id, a
scope, the policy in force, the resource pool (capacity, granted to children, free), health and a
metrics report. Upward reports (:class:`LevelSummary`) carry counts and resource totals from
agents to supervisors to managers to the orchestrator.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from tetrarch.decisions import CacheStats
from tetrarch.names import ORCHESTRATOR_ID, Level, agent_id, manager_id, supervisor_id
from tetrarch.policy import Policy
from tetrarch.resources import Resources


class Health(StrEnum):
    """Health of a level as seen by itself and its reports."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DRAINING = "draining"


class ChildStatus(StrEnum):
    """Lifecycle of a child as its parent records it."""

    ACTIVE = "active"
    REMOVING = "removing"


class AgentStatus(StrEnum):
    """Lifecycle of an agent."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class PoolView(BaseModel):
    """A level's pool: capacity = granted + free; what it borrowed from its parent and lent below beside."""

    capacity: Resources
    granted: Resources = Field(description="Carved for children plus this level's own share of allocations.")
    free: Resources
    borrowed: Resources = Field(default_factory=Resources, description="Held from the parent for allocations.")
    lent: Resources = Field(default_factory=Resources,
                            description="Own capacity lent to requests that escalated from below.")
    reclaiming: Resources | None = Field(
        default=None, description="Set while this level wants lent capacity back: it lends nothing new.")


class ResourceTotals(BaseModel):
    """Capacity and granted totals of all entities of one level below (and including) a reporter."""

    capacity: Resources = Field(default_factory=Resources)
    granted: Resources = Field(default_factory=Resources)

    def plus(self, other: ResourceTotals) -> ResourceTotals:
        """Sum of two totals."""
        return ResourceTotals(capacity=self.capacity + other.capacity, granted=self.granted + other.granted)


class LevelSummary(BaseModel):
    """An upward report: what a level and everything below it amount to right now."""

    entity_id: str
    level: Level
    name: str
    seq: int = Field(default=0, description="Monotonic per reporter; stale reports are ignored.")
    health: Health = Health.HEALTHY
    status: str = Field(default="active", description="Agent status for agents; lifecycle for levels.")
    resources: Resources = Field(default_factory=Resources, description="What this entity holds (its capacity).")
    used: Resources | None = Field(default=None, description="Agents: what the runtime measured it using.")
    supervisors: int = 0
    agents_by_status: dict[str, int] = Field(default_factory=dict)
    tasks_completed: int = Field(default=0, description="Tasks the agents below ran to a result (reportMetrics).")
    tasks_failed: int = Field(default=0, description="Tasks the agents below ran that failed.")
    resources_by_level: dict[str, ResourceTotals] = Field(default_factory=dict)
    reported_at: datetime | None = None


class ChildView(BaseModel):
    """One child as its parent sees it."""

    name: str
    entity_id: str
    status: ChildStatus
    resources: Resources
    policy: Policy = Field(default_factory=Policy)
    last_report: LevelSummary | None = None
    used: Resources | None = Field(default=None, description="Agents: their last reported use.")
    over_quota_since: datetime | None = Field(default=None, description="Agents: using more than allocated since.")
    quota_action: str | None = Field(default=None, description="Agents: the quota action taken (throttle, stop).")
    priority: int = 0
    failed: str | None = Field(default=None, description="Agents: why its supervisor gave up on it.")
    restarts: int = Field(default=0, description="Agents: restarts after a crash in the current period.")


class LevelView(BaseModel):
    """The common face of every management level (seed: ``ManagementLevel``)."""

    id: str
    level: Level
    scope: str = Field(description="'system', 'domain:<d>' or 'supervisor:<d>/<s>'.")
    domain: str | None = None
    name: str
    status: ChildStatus
    policy: Policy
    pool: PoolView
    health: Health
    children: list[ChildView]
    metrics: LevelSummary
    created_at: datetime
    updated_at: datetime
    run_updates: int = Field(default=0, description="Updates and signals handled by the current run.")
    agents: int = Field(default=0, description="Agents in this level's subtree as this level counts them.")
    policy_cache: CacheStats | None = Field(default=None, description="This run's policy decision cache.")
    continued_as_new: int = Field(default=0, description="How many times this entity continued as new.")
    agent_failures: dict[str, str] = Field(default_factory=dict,
                                           description="Managers: agents given up on by their supervisors.")


class LevelRef(BaseModel):
    """Names one entity of the hierarchy (the target of a call)."""

    level: Level
    domain: str | None = None
    name: str | None = None

    @property
    def entity_id(self) -> str:
        """The entity's workflow id."""
        if self.level is Level.ORCHESTRATOR:
            return ORCHESTRATOR_ID
        if self.level is Level.MANAGER:
            assert self.domain is not None
            return manager_id(self.domain)
        assert self.domain is not None and self.name is not None
        if self.level is Level.SUPERVISOR:
            return supervisor_id(self.domain, self.name)
        return agent_id(self.domain, self.name)

    def describe(self) -> str:
        """How people name it: ``domain 'x'``, ``supervisor x/y``, ``agent x/a``."""
        if self.level is Level.ORCHESTRATOR:
            return "the orchestrator"
        if self.level is Level.MANAGER:
            return f"domain {self.domain!r}"
        return f"{self.level.value} {self.domain}/{self.name}"

    @classmethod
    def orchestrator(cls) -> LevelRef:
        return cls(level=Level.ORCHESTRATOR)

    @classmethod
    def manager(cls, domain: str) -> LevelRef:
        return cls(level=Level.MANAGER, domain=domain)

    @classmethod
    def supervisor(cls, domain: str, name: str) -> LevelRef:
        return cls(level=Level.SUPERVISOR, domain=domain, name=name)

    @classmethod
    def agent(cls, domain: str, name: str) -> LevelRef:
        return cls(level=Level.AGENT, domain=domain, name=name)
