"""Activity inputs: a target entity plus the request it is to receive.

Operation workflows reach a level through activities (DESIGN.md decision 3); each activity takes
one of these models, naming the entity by :class:`LevelRef` and carrying the entity-level request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tetrarch.agent import AgentImage, AgentState, StopAgent, SwitchImage, TakeCheckpoint, TaskInput
from tetrarch.decisions import PolicyCheck
from tetrarch.errors import ErrorInfo
from tetrarch.level import (
    AdmitAgents,
    BeginRemoval,
    ChildRef,
    ConfigureLevel,
    QuotaMark,
    Reclaiming,
    ReconfigureChild,
    RegisterChild,
    RegisterChildren,
    ReleaseAgents,
    ReleaseGrants,
    Reserve,
    SetPolicy,
    TransferCapacity,
)
from tetrarch.models import LevelRef
from tetrarch.operations import AgentInput
from tetrarch.policy import OperationType
from tetrarch.resource_ops import QuotaWatch
from tetrarch.resources import Resources


class RegisterChildCall(BaseModel):
    """Admit a child at ``target``."""

    target: LevelRef
    request: RegisterChild


class ReconfigureChildCall(BaseModel):
    """Resize or re-police a child at ``target``."""

    target: LevelRef
    request: ReconfigureChild


class ChildCall(BaseModel):
    """Act on one child of ``target`` (begin/cancel removal, unregister)."""

    target: LevelRef
    request: ChildRef


class ConfigureCall(BaseModel):
    """Change ``target``'s own capacity or policy."""

    target: LevelRef
    request: ConfigureLevel


class RemovalCall(BaseModel):
    """Begin, cancel or finish the removal of ``target`` itself."""

    target: LevelRef
    request: BeginRemoval


class StopAgentCall(BaseModel):
    """Stop the agent ``target``."""

    target: LevelRef
    request: StopAgent


class ReadHierarchy(BaseModel):
    """Read the orchestrator and the managers of these domains."""

    domains: list[str]


class AdmitCall(BaseModel):
    """Count agents in at ``target``, judged by its policy."""

    target: LevelRef
    request: AdmitAgents


class ReleaseCall(BaseModel):
    """Count agents out at ``target``."""

    target: LevelRef
    request: ReleaseAgents


class SetPolicyCall(BaseModel):
    """Replace ``target``'s policy."""

    target: LevelRef
    request: SetPolicy


class JudgeCall(BaseModel):
    """Ask ``target`` for its verdict on an operation."""

    target: LevelRef
    check: PolicyCheck


class DiscardAgentCall(BaseModel):
    """Compensation of an agent start: stop the agent ``target`` only if request ``owner`` started it."""

    target: LevelRef
    owner: str


class ReserveCall(BaseModel):
    """Take ``target``'s share of an allocation."""

    target: LevelRef
    request: Reserve


class ReleaseGrantsCall(BaseModel):
    """Return allocations to ``target``'s pool."""

    target: LevelRef
    request: ReleaseGrants


class ReclaimingCall(BaseModel):
    """Begin or end a reclaim at ``target``."""

    target: LevelRef
    request: Reclaiming


class TransferCall(BaseModel):
    """Move nominal capacity between two children of ``target``."""

    target: LevelRef
    request: TransferCapacity


class QuotaMarkCall(BaseModel):
    """Record a quota action on an agent of the supervisor ``target``."""

    target: LevelRef
    request: QuotaMark


class ChildQuery(BaseModel):
    """Read one child of ``target``."""

    target: LevelRef
    name: str


class CheckAllocation(BaseModel):
    """Judge an allocation at the agent's three levels before anything is reserved."""

    domain: str
    agent: str
    resources: Resources
    supervisor: str | None = None


class PlacementQuery(BaseModel):
    """Read the pools of a domain's supervisors to place a new agent."""

    domain: str


class StartQuotaWatch(BaseModel):
    """Start the EnforceAgentQuotas run that watches one overuse (once per overuse)."""

    watch: QuotaWatch


class ThrottleCall(BaseModel):
    """Tell the agent ``target`` it is throttled (or no longer, with ``throttled`` false)."""

    target: LevelRef
    throttled: bool = True
    reason: str = ""


class RegisterChildrenCall(BaseModel):
    """Admit a batch of agents at the supervisor ``target``."""

    target: LevelRef
    request: RegisterChildren


class StartAgents(BaseModel):
    """Start (or find) several agent entities at once."""

    inputs: list[AgentInput]


class StartedAgent(BaseModel):
    """One agent of :class:`StartAgents`: its state, or why it could not be started."""

    name: str
    state: AgentState | None = None
    error: ErrorInfo | None = None


class StartedAgents(BaseModel):
    """One outcome per agent, in order."""

    agents: list[StartedAgent]


class LoadImage(BaseModel):
    """Load and verify the image an agent is to run, against the policies of its three levels."""

    domain: str
    supervisor: str
    agent: str
    image: str = Field(description="A reference (name@version, name) or a path in the image store.")
    operation: OperationType = OperationType.SPAWN


class RunTask(BaseModel):
    """Run one attempt of a task of the agent ``target`` on its image, under its allocation's limits."""

    target: LevelRef
    supervisor: str
    image: AgentImage
    task: TaskInput
    params: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, Any] = Field(default_factory=dict, description="The agent's working state.")
    probe: bool = Field(default=False, description="Only start the image's code (load its entrypoint), run nothing.")


class CheckpointCall(BaseModel):
    """Ask the agent ``target`` for a checkpoint."""

    target: LevelRef
    request: TakeCheckpoint


class SwitchImageCall(BaseModel):
    """Switch the agent ``target`` to another verified image."""

    target: LevelRef
    request: SwitchImage


class LivenessQuery(BaseModel):
    """Which of these agents of a supervisor have a workflow that ended without a clean stop, and which of
    the ``silent`` ones (not heard from for too long) still run: those are hung."""

    domain: str
    supervisor: str
    agents: list[str]
    silent: list[str] = Field(default_factory=list)


class CrashedAgent(BaseModel):
    """An agent whose workflow is no longer running, though its supervisor still holds it."""

    name: str
    status: str = Field(description="How its last run ended: TERMINATED, FAILED, TIMED_OUT, ...")


class Liveness(BaseModel):
    """The agents found crashed."""

    crashed: list[CrashedAgent] = Field(default_factory=list)


class StartOperation(BaseModel):
    """Start an operation workflow (by type) with a JSON input, once per workflow id."""

    workflow: str
    input: dict[str, Any]
    workflow_id: str
    level: str = Field(default="supervisor", description="The level whose task queue runs it.")


class RestartAgentCall(BaseModel):
    """Restart an agent from its last checkpoint; a silent one (running but hung) is terminated first."""

    target: LevelRef
    silent: bool = False
    report_seq: int = Field(default=0, description="The last report its supervisor has: the new run reports after it.")


class StateHook(BaseModel):
    """Run an image's merge or split hook (``module:function``) on agents' working states."""

    image: AgentImage
    hook: str
    kind: str = Field(description="'merge' (input: states) or 'split' (input: state and parts).")
    input: dict[str, Any]
