"""Level policy: what a level allows below it, versioned, validated on input.

Every field is optional and ``None`` means "no rule at this level" (the parent's rule, if any,
still applies): the effective policy of a level is the most restrictive combination of its own and
its ancestors' (see :mod:`tetrarch.decisions`). A child policy may only tighten its parent's; the
conflicts of one that would loosen it are listed by :func:`tetrarch.decisions.conflicts`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, model_validator

from tetrarch.resources import Resources, accept_quantities


class OperationType(StrEnum):
    """Every operation the policy hierarchy judges. Reads (status, metrics) take the fast path."""

    SPAWN = "spawn"
    BATCH_SPAWN = "batch_spawn"
    KILL = "kill"
    CHECKPOINT = "checkpoint"
    RESTORE = "restore"
    CLONE = "clone"
    MERGE = "merge"
    SPLIT = "split"
    UPGRADE = "upgrade"
    SPECIALIZE = "specialize"
    MESSAGE = "message"
    ALLOCATE = "allocate"
    EVOLVE = "evolve"


#: Operations that add agents (judged against max_agents).
ADDS_AGENTS = frozenset({OperationType.SPAWN, OperationType.BATCH_SPAWN, OperationType.CLONE,
                         OperationType.SPLIT, OperationType.RESTORE})
#: Operations that give an agent resources (judged against the per-agent limits).
TAKES_RESOURCES = frozenset({OperationType.SPAWN, OperationType.BATCH_SPAWN, OperationType.CLONE,
                             OperationType.MERGE, OperationType.SPLIT, OperationType.RESTORE,
                             OperationType.ALLOCATE})
#: Operations that load an agent image (judged against the image rules).
LOADS_IMAGE = frozenset({OperationType.SPAWN, OperationType.BATCH_SPAWN, OperationType.UPGRADE,
                         OperationType.RESTORE, OperationType.EVOLVE})


#: A set that serialises sorted, so the same policy always has the same JSON (and the same digest).
NameSet = Annotated[frozenset[str], PlainSerializer(sorted, return_type=list[str])]
OperationSet = Annotated[frozenset[OperationType], PlainSerializer(sorted, return_type=list[OperationType])]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShareLimits(_Strict):
    """Most one agent may hold, as a percentage of the level's own pool (seed: "no agent > 10% of domain CPU")."""

    cpu_pct: float | None = Field(default=None, gt=0, le=100)
    memory_pct: float | None = Field(default=None, gt=0, le=100)
    gpu_pct: float | None = Field(default=None, gt=0, le=100)


class ResourceCap(_Strict):
    """An absolute per-agent cap; a component left out is not capped (``{cpu: 2}`` caps CPU only)."""

    cpu_millis: int | None = Field(default=None, ge=0)
    memory_mib: int | None = Field(default=None, ge=0)
    gpu: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _accept_quantities(cls, data: Any) -> Any:
        """Accept ``{"cpu": "500m", "memory": "2Gi"}`` like :class:`Resources` does; a whole
        :class:`Resources` caps every component."""
        if isinstance(data, Resources):
            return data.model_dump()
        return accept_quantities(cls, data)

    def bounded(self, unbounded: int) -> Resources:
        """As a resource vector, ``unbounded`` standing for the components left out."""
        return Resources(cpu_millis=unbounded if self.cpu_millis is None else self.cpu_millis,
                         memory_mib=unbounded if self.memory_mib is None else self.memory_mib,
                         gpu=unbounded if self.gpu is None else self.gpu)


class AgentLimits(_Strict):
    """Per-agent limits: absolute, and as a share of this level's pool."""

    max_resources: ResourceCap | None = Field(default=None, description="Most one agent may hold, absolute.")
    max_share: ShareLimits | None = Field(default=None, description="Most one agent may hold, share of the pool.")


class MessagingPolicy(_Strict):
    """Cross-domain messaging: which domains may be sent to and accepted from (None: any)."""

    send_to: NameSet | None = None
    accept_from: NameSet | None = None


class ImagePolicy(_Strict):
    """Which agent images may run: trusted signers (Ed25519 public keys, hex) and name patterns.

    ``allowed_images`` holds shell-style patterns over ``name@version`` (``summarizer@1.*``,
    ``calculator@*``); None allows any image, an empty set none.
    """

    trusted_signers: NameSet | None = None
    allowed_images: NameSet | None = None


class EvolutionPolicy(_Strict):
    """Whether SILOX may upgrade agents here, and how often (least seconds between two upgrades of one agent)."""

    allowed: bool | None = None
    min_interval_seconds: int | None = Field(default=None, ge=0)


class ReclaimMode(StrEnum):
    """What a level does when it needs capacity it lent out and idle borrowers did not give enough back."""

    REFUSE = "refuse"  # lend nothing new until enough is back; the request that needed it is refused
    PREEMPT = "preempt"  # after a grace period, stop the lowest-priority borrowers until enough is back


class QuotaAction(StrEnum):
    """What happens to an agent that reports using more than it was allocated, once the grace is over."""

    FLAG = "flag"
    THROTTLE = "throttle"
    STOP = "stop"


#: From the mildest to the strictest (the effective action is the strictest in the chain).
QUOTA_ACTIONS = (QuotaAction.FLAG, QuotaAction.THROTTLE, QuotaAction.STOP)


class PlacementStrategy(StrEnum):
    """How a domain picks the supervisor of a new agent (``optimizeAgentPlacement``)."""

    BIN_PACK = "bin-pack"  # the fullest supervisor that still fits: keeps whole supervisors free
    SPREAD = "spread"  # the emptiest supervisor: spreads load and failure


class ResourcePolicy(_Strict):
    """How this level's pool is lent, reclaimed and enforced. ``None``: the default (or the parent's rule).

    ``borrowing``, ``lending_limit``, ``reclaim`` and ``placement`` are this level's own settings; the
    quota rules combine down the chain (the strictest action, the shortest grace).
    """

    borrowing: bool | None = Field(
        default=None, description="May requests this level cannot pay escalate to its parent (default yes).")
    lending_limit: ResourceCap | None = Field(
        default=None, description="Most of this level's capacity lent to requests escalated from below "
                                  "(Kueue's lendingLimit); the rest stays for its own children.")
    reclaim: ReclaimMode | None = Field(
        default=None, description="When idle borrowers do not give back enough: refuse (default) or preempt.")
    preempt_grace_seconds: float | None = Field(
        default=None, ge=0, description="How long borrowers are warned before preemption (default 30).")
    quota_action: QuotaAction | None = Field(
        default=None, description="For an agent using more than allocated: flag (default), throttle or stop.")
    quota_grace_seconds: float | None = Field(
        default=None, ge=0, description="How long an agent may stay over its allocation first (default 60).")
    placement: PlacementStrategy | None = Field(
        default=None, description="Managers: how spawns without a supervisor pick one (default spread).")


class RestartPolicy(_Strict):
    """OTP-style restarts of crashed agents: at most ``intensity`` in ``period_seconds``, with backoff."""

    intensity: int = Field(default=3, ge=0, description="Restarts allowed within the period (0: never restart).")
    period_seconds: float = Field(default=60.0, gt=0)
    backoff_seconds: float = Field(default=1.0, ge=0, description="Wait before the n-th restart: this x 2^(n-1).")


class Policy(_Strict):
    """What a level allows. ``None`` anywhere means no rule here (the ancestors' rules still apply)."""

    version: int = Field(default=1, ge=1, description="Bumped on every change of the policy.")
    template: str | None = Field(default=None, description="The template this policy started from.")
    max_children: int | None = Field(
        default=None, ge=0,
        description="Most children this level admits (domains, supervisors or agents).")
    max_agents: int | None = Field(default=None, ge=0, description="Most agents in this level's subtree.")
    agent: AgentLimits = Field(default_factory=AgentLimits)
    allowed_operations: OperationSet | None = Field(
        default=None, description="Operations allowed here (None: all not denied).")
    denied_operations: OperationSet = Field(default_factory=frozenset)
    messaging: MessagingPolicy = Field(default_factory=MessagingPolicy)
    images: ImagePolicy = Field(default_factory=ImagePolicy)
    evolution: EvolutionPolicy = Field(default_factory=EvolutionPolicy)
    default_agent_resources: Resources | None = Field(
        default=None, description="What an agent gets when its spawn request names no resources.")
    resources: ResourcePolicy = Field(default_factory=ResourcePolicy)
    restart: RestartPolicy | None = Field(default=None, description="Supervisors: how crashed agents restart.")

    def rules(self) -> Policy:
        """This policy with its bookkeeping (version, template) cleared: two policies with equal rules are equal."""
        return self.model_copy(update={"version": 1, "template": None})


DEFAULT_AGENT_RESOURCES = Resources.of(cpu=1, memory="1Gi")
DEFAULT_QUOTA_GRACE_SECONDS = 60.0
DEFAULT_PREEMPT_GRACE_SECONDS = 30.0

#: The seed's per-agent CPU shares by level: global 50%, domain 10%, supervisor 5%.
_STANDARD_CPU_SHARE = {"orchestrator": 50.0, "manager": 10.0, "supervisor": 5.0}
_LOCKED_DOWN_OPERATIONS = frozenset({OperationType.SPAWN, OperationType.KILL, OperationType.CHECKPOINT,
                                     OperationType.RESTORE})

TEMPLATES = ("permissive-dev", "standard", "locked-down")


def template(name: str, level: str) -> Policy:
    """A policy to start from at ``level`` (orchestrator, manager or supervisor).

    * permissive-dev: no rules at all; evolution allowed at any pace.
    * standard: the seed's per-agent CPU shares (global 50%, domain 10%, supervisor 5%),
      evolution at most hourly per agent.
    * locked-down: only spawn, kill, checkpoint and restore; no cross-domain messaging; no evolution.
    """
    if level not in _STANDARD_CPU_SHARE:
        raise ValueError(f"unknown level {level!r}: one of {', '.join(_STANDARD_CPU_SHARE)}")
    if name == "permissive-dev":
        return Policy(template=name, evolution=EvolutionPolicy(allowed=True, min_interval_seconds=0))
    share = AgentLimits(max_share=ShareLimits(cpu_pct=_STANDARD_CPU_SHARE[level]))
    if name == "standard":
        return Policy(template=name, agent=share, evolution=EvolutionPolicy(allowed=True, min_interval_seconds=3600))
    if name == "locked-down":
        return Policy(template=name, agent=share, allowed_operations=_LOCKED_DOWN_OPERATIONS,
                      messaging=MessagingPolicy(send_to=frozenset(), accept_from=frozenset()),
                      evolution=EvolutionPolicy(allowed=False))
    raise ValueError(f"unknown policy template {name!r}: one of {', '.join(TEMPLATES)}")
