"""The state of an agent entity and its pure transitions.

An agent belongs to one supervisor of one domain, holds the resources its supervisor carved for
it, and reports every status change upward. Task execution, images and lifecycle operations
beyond start and stop grow from this state.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tetrarch.errors import Conflict
from tetrarch.images import ImageManifest
from tetrarch.models import AgentStatus, Health, LevelSummary
from tetrarch.names import Level, agent_id
from tetrarch.resources import Resources

_TERMINAL = (AgentStatus.STOPPED, AgentStatus.FAILED)


class AgentImage(BaseModel):
    """The signed image an agent runs, as its supervisor verified it at spawn."""

    ref: str = Field(description="name@version")
    path: str = Field(description="Where the image was loaded from (re-verified against ``digest`` per task).")
    digest: str
    signer: str
    manifest: ImageManifest


class AgentSpec(BaseModel):
    """What an agent is: where it lives and what it holds."""

    domain: str
    supervisor: str
    name: str
    resources: Resources = Field(description="Its spawn allocation; its supervisor's ledger holds every allocation.")
    image: str | None = Field(default=None, description="Agent image reference, once images exist.")
    labels: dict[str, str] = Field(default_factory=dict)
    request_id: str = Field(default="", description="The spawn that made it (its counts are released by it).")
    image_info: AgentImage | None = Field(default=None, description="The verified image it runs (None: no code).")
    params: dict[str, Any] = Field(default_factory=dict, description="Its image parameters, defaults applied.")
    task_retries: int = Field(default=0, ge=0, le=10, description="Its task failure policy: attempts after a failed "
                                                                 "one, with backoff (0: report the failure).")


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


class TaskInput(BaseModel):
    """One task for an agent (the seed's ``executeTask``): an intent of its image and its input."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default="", description="Idempotency key: a repeated task returns its first result.")
    intent: str
    input: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description="Wall-clock limit of one attempt.")
    retries: int | None = Field(default=None, ge=0, le=10, description=(
        "Attempts after a failed one (error or crash), with exponential backoff; None: the agent's own "
        "policy (its spawn's task_retries). A task stopped by its memory or CPU limit is not retried: it "
        "would be again."))


class TaskResult(BaseModel):
    """How a task ended: its output, or why it failed, with what it used."""

    request_id: str
    intent: str
    ok: bool
    reason: str = Field(description="ok, error, memory_limit, cpu_limit, timeout, crashed or bad_output.")
    output: Any = None
    error: str | None = None
    memory: dict[str, Any] | None = Field(default=None, description="The agent's new working state, if any.")
    attempts: int = 1
    cpu_seconds: float = 0.0
    max_rss_mib: float = 0.0
    wall_seconds: float = 0.0
    limits: dict[str, float] = Field(default_factory=dict, description="The limits it ran under.")


class Checkpoint(BaseModel):
    """What an agent is at one moment: enough to restore it, anywhere, later (even once it was stopped)."""

    id: str
    label: str = ""
    taken_at: datetime
    image: AgentImage | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(description="Its spawn allocation (what a restored copy asks for).")
    tasks_completed: int = 0


class TakeCheckpoint(BaseModel):
    """Ask an agent for a checkpoint of itself."""

    request_id: str = ""
    label: str = ""


class SwitchImage(BaseModel):
    """Run another (verified) image from now on: an upgrade, or a specialization of the same one."""

    request_id: str = ""
    image: AgentImage
    params: dict[str, Any]


#: Checkpoints an agent keeps (the oldest go first); the final one is always kept.
MAX_CHECKPOINTS = 5


class AgentState(BaseModel):
    """Everything an agent entity knows; carried whole across continue-as-new."""

    spec: AgentSpec
    status: AgentStatus = AgentStatus.STARTING
    status_reason: str = ""
    report_seq: int = 0
    tasks_completed: int = 0
    used: Resources | None = Field(default=None, description="Its last measured use.")
    memory: dict[str, Any] = Field(default_factory=dict, description="Its working state, as its tasks left it.")
    tasks_failed: int = 0
    last_task: TaskResult | None = None
    checkpoints: list[Checkpoint] = Field(default_factory=list, description="Its latest checkpoints, oldest first.")
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
        """The agent has released what it ran and is stopped; its final checkpoint is kept."""
        self.take_checkpoint(TakeCheckpoint(request_id="final", label="final"), now)
        self.status = AgentStatus.STOPPED
        self.updated_at = now

    def take_checkpoint(self, req: TakeCheckpoint, now: datetime) -> Checkpoint:
        """A checkpoint of the agent as it is (idempotent on the request id)."""
        cid = req.request_id or f"cp-{len(self.checkpoints) + 1}"
        existing = next((c for c in self.checkpoints if c.id == cid), None)
        if existing is not None:
            return existing
        cp = Checkpoint(id=cid, label=req.label, taken_at=now, image=self.spec.image_info, params=self.spec.params,
                        memory=self.memory, resources=self.spec.resources, tasks_completed=self.tasks_completed)
        self.checkpoints = [*self.checkpoints, cp][-MAX_CHECKPOINTS:]
        self.updated_at = now
        return cp

    def switch_image(self, req: SwitchImage, now: datetime) -> None:
        """Run ``req.image`` from now on (the caller verified and tried it first)."""
        self.spec = self.spec.model_copy(update={"image_info": req.image, "image": req.image.ref,
                                                 "params": req.params})
        self.updated_at = now

    def summary(self, now: datetime) -> LevelSummary:
        """The agent's upward report to its supervisor."""
        health = Health.DEGRADED if self.status is AgentStatus.FAILED else Health.HEALTHY
        return LevelSummary(entity_id=self.entity_id, level=Level.AGENT, name=self.spec.name,
                            seq=self.report_seq, health=health, status=self.status.value,
                            resources=self.spec.resources, agents_by_status={self.status.value: 1},
                            used=self.used, tasks_completed=self.tasks_completed, tasks_failed=self.tasks_failed,
                            reported_at=now)


class AgentLookup(BaseModel):
    """An agent's last known state, and whether its workflow still runs."""

    state: AgentState
    running: bool
