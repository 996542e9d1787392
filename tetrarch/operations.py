"""Inputs and outputs of the public operation workflows and entity workflows.

These models are the project's public API: every workflow, Update and Query takes one of them and
returns one, they are exported as JSON Schema (``tetrarch schema``), and the ``temporal`` CLI can
start any operation with plain JSON. New fields always get defaults so old histories still decode.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tetrarch.agent import AgentState
from tetrarch.errors import ErrorInfo
from tetrarch.level import LevelState
from tetrarch.models import ChildView, LevelView
from tetrarch.policy import OperationType, PlacementStrategy, Policy
from tetrarch.resources import Resources


class _Request(BaseModel):
    """Base of user-facing requests: unknown fields are refused, a request id makes retries safe."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        default="", description="Idempotency key; defaults to the operation's workflow id.")


class CreateDomainRequest(_Request):
    """Create a domain: a manager entity with a pool carved from the global pool."""

    domain: str
    resources: Resources = Field(default_factory=lambda: Resources.of(cpu=100, memory="100Gi"))
    policy: Policy = Field(default_factory=Policy)


class ConfigureDomainRequest(_Request):
    """Resize a domain's pool and/or replace its policy."""

    domain: str
    resources: Resources | None = None
    policy: Policy | None = None


class RemoveDomainRequest(_Request):
    """Remove a domain; refused while it has supervisors unless ``drain`` is set."""

    domain: str
    drain: bool = False


class CreateSupervisorRequest(_Request):
    """Create a supervisor in a domain with a pool carved from the domain pool."""

    domain: str
    name: str
    resources: Resources = Field(default_factory=lambda: Resources.of(cpu=10, memory="10Gi"))
    policy: Policy = Field(default_factory=Policy)
    settings: EntitySettings | None = Field(default=None, description="Tuning of its entity (default: defaults).")


class ConfigureSupervisorRequest(_Request):
    """Resize a supervisor's pool and/or replace its policy."""

    domain: str
    name: str
    resources: Resources | None = None
    policy: Policy | None = None


class RemoveSupervisorRequest(_Request):
    """Remove a supervisor; refused while it has agents unless ``drain`` is set."""

    domain: str
    name: str
    drain: bool = False


class ScaleSupervisorsRequest(_Request):
    """Add (``delta`` > 0) or remove (``delta`` < 0) supervisors in a domain."""

    domain: str
    delta: int = Field(description="How many supervisors to add (positive) or remove (negative).")
    resources: Resources = Field(default_factory=lambda: Resources.of(cpu=10, memory="10Gi"),
                                 description="Pool of each added supervisor.")
    policy: Policy = Field(default_factory=Policy)
    name_prefix: str = Field(default="sup", description="Added supervisors are named <prefix>-<n>.")
    drain: bool = Field(default=False, description="Allow removing supervisors that still have agents.")


class SpawnAgentRequest(_Request):
    """Start an agent under a supervisor, allocating its resources (escalating to the domain and global pools
    for what the supervisor cannot pay)."""

    domain: str
    supervisor: str | None = Field(
        default=None, description="Left out: the domain places the agent (its policy's placement strategy).")
    name: str
    resources: Resources | None = Field(
        default=None, description="Defaults to the supervisor policy's default (1 CPU / 1Gi).")
    priority: int = Field(default=0, description="Preemption takes lower priorities first.")
    placement: PlacementStrategy | None = Field(
        default=None, description="Overrides the domain's placement strategy when no supervisor is named.")
    params: dict[str, Any] = Field(default_factory=dict, description="Image parameters (the image's defaults apply).")
    memory: dict[str, Any] = Field(default_factory=dict, description="Initial working state (restore, clone, split).")
    image_digest: str | None = Field(
        default=None, description="The image must have exactly this digest (restore, clone: the very same code).")
    operation: OperationType = Field(
        default=OperationType.SPAWN, description="What the policies judge: spawn, or the lifecycle operation "
                                                 "this spawn is part of (clone, restore, split, merge).")
    depends_on: list[str] = Field(
        default_factory=list, description="Agents of the domain it needs; the spawn waits until they run.")
    settings: EntitySettings | None = Field(default=None, description="Tuning of its entity (heartbeat, ...).")
    task_retries: int = Field(default=0, ge=0, le=10, description="Its task failure policy: retries with backoff.")
    dependency_timeout_seconds: float = Field(default=60.0, ge=0, le=3600,
                                              description="How long to wait for them before refusing.")
    image: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class BatchAgent(BaseModel):
    """One agent of a batch spawn."""

    model_config = ConfigDict(extra="forbid")

    name: str
    resources: Resources | None = Field(default=None, description="Defaults to the supervisor policy's default.")
    image: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    priority: int = 0


class BatchSpawnRequest(_Request):
    """Spawn N agents under one supervisor in one validation pass (the seed's ``batchSpawnAgents``).

    ``all_or_nothing`` (the default) spawns all of them or none; otherwise each is spawned or refused on
    its own (up to what the levels' agent limits still admit), with one outcome per agent.
    """

    domain: str
    supervisor: str | None = Field(default=None, description="Left out: the domain places the whole batch.")
    agents: list[BatchAgent] = Field(min_length=1, max_length=1000)
    all_or_nothing: bool = True
    placement: PlacementStrategy | None = None
    settings: EntitySettings | None = Field(
        default=None, description="Tuning of every agent's entity (heartbeat, ...; default: defaults).")


class BatchAgentOutcome(BaseModel):
    """One agent of a batch: spawned (and whether this request created it), or why not."""

    name: str
    spawned: bool
    created: bool = False
    agent: ChildView | None = None
    error: ErrorInfo | None = None


class BatchSpawnResult(BaseModel):
    """What a batch spawn did, agent by agent."""

    domain: str
    supervisor: str
    spawned: int
    refused: int
    agents: list[BatchAgentOutcome]


class StopAgentRequest(_Request):
    """Stop an agent cleanly and return its resources to its supervisor.

    Refused while other agents depend on it, unless ``cascade``: then they are stopped first.
    """

    domain: str
    name: str
    reason: str = "requested"
    cascade: bool = False


class DomainResult(BaseModel):
    """A created or changed domain as the orchestrator records it."""

    domain: ChildView
    created: bool = False


class SupervisorResult(BaseModel):
    """A created or changed supervisor as its manager records it."""

    supervisor: ChildView
    created: bool = False


class AgentResult(BaseModel):
    """A spawned agent as its supervisor records it."""

    agent: ChildView
    created: bool = False
    supervisor: str | None = Field(default=None, description="The supervisor it runs under (placed or named).")
    borrowed: Resources | None = Field(
        default=None, description="What its supervisor borrowed from above for it (zero: paid alone).")


class RemovalResult(BaseModel):
    """What a removal took away and gave back."""

    entity_id: str
    released: Resources | None = None
    drained: list[str] = Field(default_factory=list, description="Children removed first (drain).")


class ScaleResult(BaseModel):
    """Supervisors added and removed by a scale operation."""

    domain: str
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)


class EntitySettings(BaseModel):
    """Tuning of an entity workflow, carried across continue-as-new."""

    report_interval_seconds: float = Field(
        default=0.5, ge=0, description="Least time between two upward reports (debounce).")
    continue_as_new_after: int = Field(
        default=1000, ge=1, le=1500,
        description="Updates and signals per run before continuing as new (server caps: 2,000 / 10,000).")
    policy_cache_ttl_seconds: float = Field(
        default=0.1, ge=0, description="How long a policy decision is reused (the seed's 100 ms).")
    failure_check_seconds: float = Field(
        default=10.0, ge=0, description="Supervisors: how often they look for crashed or silent agents (0: never).")
    heartbeat_seconds: float = Field(
        default=30.0, ge=0, description="Agents: the longest they stay silent (a report even if nothing changed).")
    silence_seconds: float = Field(
        default=120.0, ge=0, description="Supervisors: an agent not heard from for this long is restarted (0: never).")


class LevelInput(BaseModel):
    """Start input of a management entity: its definition, or its whole state when continued."""

    level_state: LevelState
    settings: EntitySettings = Field(default_factory=EntitySettings)


class AgentInput(BaseModel):
    """Start input of an agent entity: its state (new or continued)."""

    agent_state: AgentState
    settings: EntitySettings = Field(default_factory=EntitySettings)


class SystemStatus(BaseModel):
    """System-wide statistics as the orchestrator has them from its domains' reports."""

    orchestrator: LevelView
    domains: int
    supervisors: int
    agents_by_status: dict[str, int]
    agents_total: int


class ApplyResult(BaseModel):
    """What applying a hierarchy file did: entities created, and those already there unchanged."""

    created: list[str] = Field(default_factory=list)
    unchanged: list[str] = Field(default_factory=list)


class SetPolicyRequest(_Request):
    """Set the policy of the global level (no domain), a domain, or a supervisor (domain and supervisor).

    Give either ``policy`` or ``template`` (permissive-dev, standard, locked-down). With ``dry_run``
    nothing changes: the result shows the conflicts, the children that would conflict and the running
    agents the new policy would refuse.
    """

    domain: str | None = None
    supervisor: str | None = None
    policy: Policy | None = None
    template: str | None = None
    dry_run: bool = False


class PolicyChangeResult(BaseModel):
    """What a policy change did, or would do (dry run)."""

    target: str
    applied: bool
    dry_run: bool = False
    policy: Policy
    previous_version: int
    conflicts: list[str] = Field(default_factory=list, description="Ways it would loosen the levels above.")
    children_in_conflict: list[str] = Field(
        default_factory=list, description="Children whose own policy now loosens it (the stricter one applies).")
    agents_refused: list[str] = Field(
        default_factory=list, description="Running agents the new policy would not admit now.")
