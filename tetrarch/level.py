"""The state of a management level and its pure transitions.

Orchestrator, managers and supervisors share one shape: a pool carved from the parent, a policy,
and a ledger of children (domains, supervisors or agents) each holding a slice of the pool. Every
change is a method here that validates first and changes nothing when it refuses, so the entity
workflows only route Updates to these methods. The sum of children's resources never exceeds the
level's capacity.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from tetrarch.decisions import CacheStats, ChainLink, DecisionCache, PolicyChain, PolicyCheck, Verdict, evaluate
from tetrarch.errors import (
    CapacityExceeded,
    Conflict,
    ErrorInfo,
    HasChildren,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PolicyDenied,
    TetrarchError,
)
from tetrarch.models import (
    AgentStatus,
    ChildStatus,
    ChildView,
    Health,
    LevelSummary,
    LevelView,
    PoolView,
    ResourceTotals,
)
from tetrarch.names import ORCHESTRATOR_ID, Level, agent_id, is_valid_name, manager_id, supervisor_id
from tetrarch.policy import DEFAULT_AGENT_RESOURCES, Policy, QuotaAction, RestartPolicy
from tetrarch.pools import Grant, LedgerSnapshot, PoolTotals, allocation_key, lendable, split, totals
from tetrarch.resources import Resources, total


class ChildRecord(BaseModel):
    """A child in its parent's ledger."""

    name: str
    resources: Resources
    policy: Policy = Field(default_factory=Policy)
    status: ChildStatus = ChildStatus.ACTIVE
    request_id: str = Field(default="", description="The request that created this child.")
    last_report: LevelSummary | None = None
    priority: int = Field(default=0, description="Agents: preemption takes the lowest priority first.")
    used: Resources | None = Field(default=None, description="Agents: their last reported use.")
    over_quota_since: datetime | None = Field(default=None, description="Agents: using more than allocated since.")
    quota_action: QuotaAction | None = Field(default=None, description="Agents: the quota action already taken.")
    quota_watch: datetime | None = Field(
        default=None, description="Agents: the overuse (by its start) an EnforceAgentQuotas run already watches.")
    lift_throttle: bool = Field(default=False, description="Agents: throttled, and back within the allocation.")
    restarts: list[datetime] = Field(default_factory=list, description="Agents: recent restarts after a crash.")
    failed: str | None = Field(default=None, description="Agents: why it is given up on (restarts exhausted).")


class RegisterChild(BaseModel):
    """Admit a child with a slice of this level's pool. Idempotent on an identical definition."""

    request_id: str
    name: str
    resources: Resources | None = Field(
        default=None, description="The child's slice; agents default to the policy's agent default.")
    policy: Policy = Field(default_factory=Policy)
    check: PolicyCheck | None = Field(
        default=None, description="For agents: the operation, judged by this level's policy before admission.")
    escalate: bool = Field(
        default=False, description="Agents: what the supervisor cannot pay is left to borrow from the domain.")
    priority: int = 0


class Reserve(BaseModel):
    """Take this level's share of an allocation: what it can pay, the rest to borrow from its parent.

    Idempotent on ``key``: a retried step gets the grant it already made.
    """

    request_id: str
    key: str = Field(description="The allocation's key ('<domain>/<agent>#<allocation id>').")
    child: str = Field(description="The child it goes to: the agent (supervisor), supervisor (manager) or domain.")
    resources: Resources = Field(description="What is asked of this level.")
    escalate: bool = Field(default=True, description="May leave what it cannot pay to its parent.")
    check: PolicyCheck | None = Field(
        default=None, description="Judged by this level's policy first; ``resources`` there is the agent's total "
                                  "after this allocation (supervisors fill it in from their ledger).")
    above: list[ChainLink] = Field(
        default_factory=list, description="Supervisors: the levels above (top first), judged with this one.")
    priority: int = 0
    spawn: bool = Field(default=False, description="A share of an agent's spawn allocation (escalated by a spawn).")


class ReserveResult(BaseModel):
    """The grant this level made and what is left to ask of its parent."""

    grant: Grant
    remainder: Resources
    created: bool
    agent_total: Resources = Field(default_factory=Resources,
                                   description="Supervisors: the agent's whole allocation after this one.")


class ReleaseGrants(BaseModel):
    """Return allocations to this level's pool: by key, or every grant of one agent.

    With ``owner`` only grants made by that request are released (compensation). Unknown keys are
    ignored, so a release is exactly-once however often it is retried.
    """

    request_id: str = ""
    keys: list[str] = Field(default_factory=list)
    agent: str | None = Field(default=None, description="'<domain>/<agent>': every grant it holds here.")
    owner: str | None = None
    keep_spawn: bool = Field(default=False, description="With ``agent``: keep its spawn allocation.")


class ReleasedGrants(BaseModel):
    """The grants a release returned (empty when they were already gone)."""

    released: list[Grant] = Field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """The released allocations' keys."""
        return [g.key for g in self.released]


class TransferCapacity(BaseModel):
    """Move nominal capacity from one child's slice to another's (balancing); the pool's free is unchanged."""

    request_id: str = ""
    source: str
    target: str
    resources: Resources


class Reclaiming(BaseModel):
    """Start (``resources`` set) or stop (None) wanting lent capacity back; while set nothing new is lent."""

    request_id: str = ""
    resources: Resources | None = None


class QuotaMark(BaseModel):
    """Record the quota action taken on an agent (so it is taken once per overuse)."""

    request_id: str = ""
    agent: str
    action: QuotaAction
    since: datetime


class RecordRestart(BaseModel):
    """A crashed agent is about to be restarted: allowed while under the restart intensity."""

    request_id: str = ""
    agent: str
    reason: str = ""


class RestartDecision(BaseModel):
    """Whether to restart, after how long, and how many restarts the period has seen."""

    allowed: bool
    backoff_seconds: float = 0.0
    restarts_in_period: int
    reason: str = ""


class GrantLookup(BaseModel):
    """One allocation's share at a level, if the level holds it."""

    grant: Grant | None = None


class AgentList(BaseModel):
    """Agents by key (``<domain>/<agent>``)."""

    agents: list[str] = Field(default_factory=list)


class AgentFailure(BaseModel):
    """A supervisor gave up on an agent (its restarts exhausted); its manager records and reports it."""

    request_id: str = ""
    agent: str = Field(description="'<domain>/<agent>'")
    supervisor: str
    reason: str


class AdmitAgents(BaseModel):
    """Count agents in at a level, judged by that level's own policy (its rules and its live count).

    Keys are ``<domain>/<agent>``; admitting a key already counted is a no-op, so a retried step never
    counts twice.
    """

    request_id: str = ""
    agents: list[str]
    check: PolicyCheck
    partial: bool = Field(default=False, description="Best effort: admit as many as the live count allows "
                                                     "(in order) instead of all or none.")
    depends_on: dict[str, list[str]] = Field(
        default_factory=dict, description="Managers: agent key -> the keys it depends on (recorded when admitted).")


class RegisterChildren(BaseModel):
    """Admit several agents in one Update (batch spawn): all or none, or each on its own (best effort)."""

    request_id: str
    children: list[RegisterChild]
    all_or_nothing: bool = True


class ChildOutcome(BaseModel):
    """One child of a batch: registered, or why not."""

    name: str
    result: RegisterResult | None = None
    error: ErrorInfo | None = None


class RegisterChildrenResult(BaseModel):
    """One outcome per child, in the order asked."""

    outcomes: list[ChildOutcome]


class ReleaseAgents(BaseModel):
    """Count agents out again (stop, or compensation of an admission). Unknown keys are ignored.

    With ``owner``, only keys counted in by that request are released: a compensation or a stop
    never takes away a count that belongs to another spawn of the same name.
    """

    request_id: str = ""
    agents: list[str]
    owner: str | None = None


class AdmitResult(BaseModel):
    """The level's verdict, the keys this request counted in (to undo exactly those), the count after."""

    verdict: Verdict
    added: list[str] = Field(default_factory=list)
    agents: int


class SetPolicy(BaseModel):
    """Replace a level's policy; its version becomes the old version + 1."""

    request_id: str = ""
    policy: Policy


class RegisterResult(BaseModel):
    """The child as registered; ``created`` is false when an identical child already existed."""

    child: ChildView
    created: bool
    grant: Grant | None = Field(default=None, description="Agents: the spawn allocation's share at this level.")


class ReconfigureChild(BaseModel):
    """Change a child's slice and/or policy; fields left out stay as they are."""

    request_id: str
    name: str
    resources: Resources | None = None
    policy: Policy | None = None


class ReconfigureResult(BaseModel):
    """The child after the change, and its definition before (for compensation)."""

    child: ChildView
    previous_resources: Resources
    previous_policy: Policy


class ChildRef(BaseModel):
    """Names one child of a level, with the request that acts on it.

    With ``owner``, unregistering removes the child only if that request created it (compensation
    must not remove a child an earlier, identical request made).
    """

    request_id: str = ""
    name: str
    owner: str | None = None


class ChildLookup(BaseModel):
    """A child if it exists."""

    child: ChildView | None = None


class UnregisterResult(BaseModel):
    """What removing a child gave back to the pool (None when it was already gone)."""

    released: Resources | None = None
    grants: list[Grant] = Field(default_factory=list,
                                description="Agents: the allocations released with it (to release above too).")


class ConfigureLevel(BaseModel):
    """Change this level's own capacity and/or policy."""

    request_id: str = ""
    resources: Resources | None = None
    policy: Policy | None = None


class BeginRemoval(BaseModel):
    """Ask a level to prepare its own removal; with ``drain`` its children are to be removed first."""

    request_id: str = ""
    drain: bool = False


class RemovalPlan(BaseModel):
    """The children that must be removed before the level can close."""

    children: list[str]


class LevelState(BaseModel):
    """Everything a management level knows; carried whole across continue-as-new."""

    level: Level
    name: str
    domain: str | None = None
    capacity: Resources
    policy: Policy = Field(default_factory=Policy)
    status: ChildStatus = ChildStatus.ACTIVE
    children: dict[str, ChildRecord] = Field(default_factory=dict)
    admitted_agents: dict[str, str] = Field(
        default_factory=dict, description="Orchestrator and managers: agents counted in (key -> request id).")
    grants: dict[str, Grant] = Field(default_factory=dict, description="This level's shares of allocations.")
    reclaiming: Resources | None = Field(
        default=None, description="Capacity this level wants back; while set it lends nothing new.")
    agent_failures: dict[str, str] = Field(
        default_factory=dict, description="Managers: agents their supervisors gave up on (key -> reason).")
    dependencies: dict[str, list[str]] = Field(
        default_factory=dict, description="Managers: agent key -> the agents it depends on.")
    report_seq: int = 0
    created_at: datetime
    updated_at: datetime
    continued_as_new: int = 0

    # -- identity -----------------------------------------------------------------------------------

    @property
    def entity_id(self) -> str:
        """This level's workflow id."""
        if self.level is Level.ORCHESTRATOR:
            return ORCHESTRATOR_ID
        if self.level is Level.MANAGER:
            return manager_id(self.name)
        assert self.domain is not None
        return supervisor_id(self.domain, self.name)

    @property
    def scope(self) -> str:
        """Human scope: system, a domain or a supervisor."""
        if self.level is Level.ORCHESTRATOR:
            return "system"
        if self.level is Level.MANAGER:
            return f"domain:{self.name}"
        return f"supervisor:{self.domain}/{self.name}"

    @property
    def child_level(self) -> Level:
        """The level of this level's children."""
        child = self.level.child
        assert child is not None
        return child

    def child_entity_id(self, name: str) -> str:
        """Workflow id of child ``name``."""
        if self.level is Level.ORCHESTRATOR:
            return manager_id(name)
        domain = self.name if self.level is Level.MANAGER else self.domain
        assert domain is not None
        return supervisor_id(domain, name) if self.level is Level.MANAGER else agent_id(domain, name)

    # -- pool ---------------------------------------------------------------------------------------

    @property
    def carved(self) -> Resources:
        """Nominal slices of children (agents hold allocations, which are grants, not slices)."""
        if self.level is Level.SUPERVISOR:
            return Resources()
        return total([c.resources for c in self.children.values()])

    @property
    def granted(self) -> Resources:
        """What this level's capacity funds: children's slices plus its own shares of allocations."""
        return self.carved + total([g.own for g in self.grants.values()])

    @property
    def free(self) -> Resources:
        """Capacity neither carved for a child nor granted to an allocation."""
        return self.capacity.minus(self.granted)

    def pool(self) -> PoolTotals:
        """Capacity, granted, free, borrowed, lent."""
        return totals(self.capacity, self.carved, list(self.grants.values()),
                      lends=self.level is not Level.SUPERVISOR)

    def snapshot(self) -> LedgerSnapshot:
        """This level's ledger, for a conservation audit."""
        parent = None if self.level is Level.ORCHESTRATOR else (
            ORCHESTRATOR_ID if self.level is Level.MANAGER else manager_id(self.domain or ""))
        is_sup = self.level is Level.SUPERVISOR
        return LedgerSnapshot(
            entity_id=self.entity_id, level=self.level.value, name=self.name, parent=parent, capacity=self.capacity,
            carved=self.carved,
            children_slices={} if is_sup else {n: c.resources for n, c in self.children.items()},
            agents={n: c.resources for n, c in self.children.items()} if is_sup else {},
            grants=[self.grants[k] for k in sorted(self.grants)])

    # -- policy -------------------------------------------------------------------------------------

    @property
    def agent_count(self) -> int:
        """Agents in this level's subtree: a supervisor's children, else the agents counted in."""
        return len(self.children) if self.level is Level.SUPERVISOR else len(self.admitted_agents)

    def link(self) -> ChainLink:
        """This level as a link of a policy chain (its policy, its pool, its live agent count)."""
        return ChainLink(level=self.level.value, entity=self.entity_id, policy=self.policy, capacity=self.capacity,
                         agents=self.agent_count)

    def trial(self) -> LevelState:
        """A copy to try an admission on (``register_child``, ``register_children``, ``admit_agents``,
        ``reserve``): new containers holding the same records.

        Those changes only add or replace entries, never change a record in place, so trying one here
        leaves this state untouched, at the cost of copying the containers (not a deep copy, which
        took 67 ms per Update for a supervisor with 1,000 agents).
        """
        return self.model_copy(update={
            "children": dict(self.children), "admitted_agents": dict(self.admitted_agents),
            "grants": dict(self.grants), "agent_failures": dict(self.agent_failures),
            "dependencies": dict(self.dependencies)})

    def judge(self, check: PolicyCheck, cache: DecisionCache | None = None) -> Verdict:
        """This level's own verdict on ``check`` (cached when a cache is given)."""
        link = self.link()
        if cache is None:
            return evaluate(check, [link]).verdicts[0]
        if check.agent is not None or check.supervisor is not None:
            # No rule reads these names; keyed by them, every spawn (a new agent's name) would miss the cache.
            check = check.model_copy(update={"agent": None, "supervisor": None})
        return cache.evaluate(check, PolicyChain([link])).verdicts[0]

    def _enforce(self, check: PolicyCheck, cache: DecisionCache | None) -> Verdict:
        verdict = self.judge(check, cache)
        if not verdict.allowed:
            raise PolicyDenied(verdict.reason, level=self.level.value, entity=self.entity_id,
                               data={"rule": verdict.rule, "policy_version": self.policy.version})
        return verdict

    def admit_agents(self, req: AdmitAgents, now: datetime, cache: DecisionCache | None = None) -> AdmitResult:
        """Judge ``req.check`` by this level's policy counting the new agents, and count them in if allowed."""
        new = [key for key in dict.fromkeys(req.agents) if key not in self.admitted_agents]
        if not new:  # all counted in already: by this request (a retry) or by the spawn that made them
            mine = [key for key in req.agents if self.admitted_agents.get(key) == req.request_id]
            return AdmitResult(verdict=Verdict(level=self.level.value, entity=self.entity_id, allowed=True),
                               added=mine, agents=self.agent_count)
        self._require_active("admit agents")
        check = req.check if req.check.count == len(new) else req.check.model_copy(update={"count": len(new)})
        if req.partial:
            room = self._room(check)
            if 0 < room < len(new):  # best effort: as many as the live count allows, in order
                new = new[:room]
                check = check.model_copy(update={"count": room})
        verdict = self._enforce(check, cache)
        for key in new:
            self.admitted_agents[key] = req.request_id
            if req.depends_on.get(key):
                self.dependencies[key] = list(req.depends_on[key])
        self.updated_at = now
        return AdmitResult(verdict=verdict, added=new, agents=self.agent_count)

    def _room(self, check: PolicyCheck) -> int:
        """How many more agents this level's ``max_agents`` admits now (a large number if unlimited)."""
        limit = self.policy.max_agents
        return check.count if limit is None else max(0, limit - self.agent_count)

    def register_children(self, req: RegisterChildren, now: datetime,
                          cache: DecisionCache | None = None) -> RegisterChildrenResult:
        """Register a batch of agents in one step.

        All or nothing: every child is tried on a copy first and, if any is refused, the batch is refused
        with every child's problem listed and nothing changes. Best effort: each child is registered or
        refused on its own, in order.
        """
        if req.all_or_nothing:
            trial = self.trial()
            refusals: list[tuple[str, TetrarchError]] = []
            for child in req.children:
                try:
                    trial.register_child(child, now)
                except TetrarchError as e:
                    refusals.append((child.name, e))
            if refusals:  # the first refusal's kind, with every agent's problem listed
                problems = [f"{name}: {e.message}" for name, e in refusals]
                first = refusals[0][1]
                err = type(first)(f"{self.scope} refuses the batch of {len(req.children)} agents "
                                  f"({len(problems)} cannot be admitted): " + "; ".join(problems[:5])
                                  + (" ..." if len(problems) > 5 else ""),
                                  level=self.level.value, entity=self.entity_id, problems=problems, data=first.data)
                err.code = first.code
                raise err
        outcomes = []
        for child in req.children:
            try:
                outcomes.append(ChildOutcome(name=child.name, result=self.register_child(child, now, cache)))
            except TetrarchError as e:
                outcomes.append(ChildOutcome(name=child.name, error=e.info()))
        return RegisterChildrenResult(outcomes=outcomes)

    def release_agents(self, req: ReleaseAgents, now: datetime) -> AdmitResult:
        """Count agents out (idempotent)."""
        for key in req.agents:
            if req.owner is None or self.admitted_agents.get(key) == req.owner:
                self.admitted_agents.pop(key, None)
                self.agent_failures.pop(key, None)
                self.dependencies.pop(key, None)
        self.updated_at = now
        return AdmitResult(verdict=Verdict(level=self.level.value, entity=self.entity_id, allowed=True),
                           agents=self.agent_count)

    def set_policy(self, req: SetPolicy, now: datetime) -> Policy:
        """Replace the policy (version bumped); refused below what exists (max_children)."""
        new = req.policy
        if new.max_children is not None and new.max_children < len(self.children):
            raise Conflict(f"policy max_children {new.max_children} is below the {len(self.children)} "
                           f"{self.child_level.value}s that exist in {self.scope}",
                           level=self.level.value, entity=self.entity_id)
        if new.rules() == self.policy.rules():
            return self.policy
        self.policy = new.model_copy(update={"version": self.policy.version + 1})
        self.updated_at = now
        return self.policy

    # -- transitions --------------------------------------------------------------------------------

    def _require_active(self, action: str) -> None:
        if self.status is not ChildStatus.ACTIVE:
            raise Conflict(f"{self.entity_id} is being removed; cannot {action}",
                           level=self.level.value, entity=self.entity_id)

    def _child(self, name: str) -> ChildRecord:
        child = self.children.get(name)
        if child is None:
            raise NotFound(f"{self.scope} has no {self.child_level.value} named {name!r}",
                           level=self.level.value, entity=self.entity_id, data={"name": name})
        return child

    def register_child(self, req: RegisterChild, now: datetime, cache: DecisionCache | None = None) -> RegisterResult:
        """Admit a child, carving its slice from the free pool; identical re-registration is a no-op.

        An agent's resources are not a carved slice but its spawn allocation: the supervisor pays what
        it can and, with ``escalate``, leaves the rest to borrow from its domain (see :meth:`reserve`).
        """
        kind = self.child_level.value
        resources = req.resources if req.resources is not None else (
            self.policy.default_agent_resources or DEFAULT_AGENT_RESOURCES)
        if not is_valid_name(req.name):
            raise InvalidRequest(
                f"{kind} name {req.name!r} is not a lowercase DNS label (a-z, 0-9, '-', at most 63)",
                level=self.level.value, entity=self.entity_id)
        is_agent = self.child_level is Level.AGENT
        existing = self.children.get(req.name)
        if existing is not None:
            spawn = self._spawn_grant(req.name) if is_agent else None
            # An agent's spawn allocation defines it (later allocations do not); one spawned with
            # nothing holds no spawn grant.
            defined = (spawn.size if spawn is not None else Resources()) if is_agent else existing.resources
            if defined == resources and existing.policy == req.policy:
                if existing.status is ChildStatus.REMOVING:
                    raise Conflict(f"{kind} {req.name!r} is being removed",
                                   level=self.level.value, entity=self.entity_id)
                return RegisterResult(child=self.view_child(req.name),
                                      created=existing.request_id == req.request_id, grant=spawn)
            raise Conflict(
                f"{kind} {req.name!r} already exists in {self.scope} with a different definition "
                f"(has {defined.human()}, asked {resources.human()})",
                level=self.level.value, entity=self.entity_id,
                data={"existing": defined.model_dump(), "requested": resources.model_dump()})
        self._require_active(f"admit {kind} {req.name!r}")
        if req.check is not None:
            self._enforce(req.check.model_copy(update={"resources": resources}), cache)
        limit = self.policy.max_children
        if limit is not None and len(self.children) >= limit:
            raise LimitExceeded(
                f"{self.scope} admits at most {limit} {kind}s (policy v{self.policy.version} max_children)",
                level=self.level.value, entity=self.entity_id)
        if is_agent:
            assert self.domain is not None
            key = allocation_key(self.domain, req.name, f"spawn/{req.request_id}")
            grant = None
            if not resources.is_zero():
                own, rest = self._split(resources, req.escalate, f"{kind} {req.name!r}", lending=False)
                grant = Grant(key=key, agent=f"{self.domain}/{req.name}", child=req.name, own=own, borrowed=rest,
                              request_id=req.request_id, priority=req.priority, spawn=True, created_at=now)
                self.grants[key] = grant
            self.children[req.name] = ChildRecord(name=req.name, resources=resources, policy=req.policy,
                                                  request_id=req.request_id, priority=req.priority)
            self.updated_at = now
            return RegisterResult(child=self.view_child(req.name), created=True, grant=grant)
        short = resources.shortfall(self.free)
        if short:
            raise CapacityExceeded(
                f"{self.scope} cannot carve {resources.human()} for {kind} {req.name!r}: "
                + "; ".join(f"{k} {v}" for k, v in short.items()),
                level=self.level.value, entity=self.entity_id, problems=[f"{k}: {v}" for k, v in short.items()])
        self.children[req.name] = ChildRecord(name=req.name, resources=resources, policy=req.policy,
                                              request_id=req.request_id)
        self.updated_at = now
        return RegisterResult(child=self.view_child(req.name), created=True)

    # -- allocations ----------------------------------------------------------------------------------

    def _spawn_grant(self, agent: str) -> Grant | None:
        return next((g for g in self.grants.values() if g.child == agent and g.spawn), None)

    def _may_borrow(self) -> bool:
        return self.level is not Level.ORCHESTRATOR and self.policy.resources.borrowing is not False

    def _split(self, request: Resources, escalate: bool, what: str, lending: bool) -> tuple[Resources, Resources]:
        """What this level pays of ``request`` and what it leaves to its parent; refuse if it must pay all."""
        if request.is_zero():
            raise InvalidRequest(f"{self.scope}: an allocation for {what} must ask for some cpu, memory or gpu",
                                 level=self.level.value, entity=self.entity_id)
        if lending and self.reclaiming is not None:
            raise CapacityExceeded(
                f"{self.scope} lends nothing new while it reclaims {self.reclaiming.human()} it lent out",
                level=self.level.value, entity=self.entity_id, data={"reclaiming": self.reclaiming.model_dump()})
        pool = self.pool()
        available = lendable(pool.free, pool.lent, self.policy.resources.lending_limit) if lending else pool.free
        own, rest = split(request, available, escalate and self._may_borrow())
        if not rest.is_zero() and not (escalate and self._may_borrow()):
            short = request.shortfall(available)
            why = ("" if available == pool.free else
                   f" (lending limit {self.policy.resources.lending_limit})")
            tail = "" if self.level is Level.ORCHESTRATOR or not escalate else "; borrowing from above is off"
            raise CapacityExceeded(
                f"{self.scope} cannot allocate {request.human()} for {what}: "
                + "; ".join(f"{k} {v}" for k, v in short.items()) + why + tail,
                level=self.level.value, entity=self.entity_id, problems=[f"{k}: {v}" for k, v in short.items()])
        return own, rest

    def reserve(self, req: Reserve, now: datetime, cache: DecisionCache | None = None) -> ReserveResult:
        """Take this level's share of an allocation (all of it at the top); idempotent on the key."""
        existing = self.grants.get(req.key)
        if existing is not None:
            if existing.child != req.child or existing.size != req.resources:
                raise Conflict(f"allocation {req.key} already holds {existing.size.human()} at {self.scope} "
                               f"for {existing.child}; asked {req.resources.human()} for {req.child}",
                               level=self.level.value, entity=self.entity_id)
            return ReserveResult(grant=existing, remainder=existing.borrowed, created=False,
                                 agent_total=self._agent_total(req.child))
        self._require_active("allocate")
        child = self._child(req.child)
        if child.status is not ChildStatus.ACTIVE:
            raise Conflict(f"{self.child_level.value} {req.child!r} is being removed; it gets no new resources",
                           level=self.level.value, entity=self.entity_id)
        is_sup = self.level is Level.SUPERVISOR
        after = (child.resources + req.resources) if is_sup else None
        if req.check is not None:
            check = req.check if after is None else req.check.model_copy(update={"resources": after})
            if req.above:  # the whole chain at once, on the agent's live total: the highest refusal decides
                decision = evaluate(check, [*req.above, self.link()])
                if not decision.allowed:
                    raise PolicyDenied(decision.reason or "refused", level=decision.level or self.level.value,
                                       entity=decision.entity or self.entity_id, data={"rule": decision.rule})
            else:
                self._enforce(check, cache)
        own, rest = self._split(req.resources, req.escalate, f"agent {req.key.split('#')[0]}", lending=not is_sup)
        grant = Grant(key=req.key, agent=req.key.split("#", 1)[0], child=req.child, own=own, borrowed=rest,
                      request_id=req.request_id, priority=req.priority if not is_sup else child.priority,
                      spawn=req.spawn, created_at=now)
        self.grants[req.key] = grant
        if after is not None:  # replaced, not changed in place: a trial copy shares the records (see trial)
            self.children[req.child] = child.model_copy(update={"resources": after})
        self.updated_at = now
        return ReserveResult(grant=grant, remainder=rest, created=True, agent_total=self._agent_total(req.child))

    def _agent_total(self, child: str) -> Resources:
        if self.level is not Level.SUPERVISOR or child not in self.children:
            return Resources()
        return self.children[child].resources

    def release(self, req: ReleaseGrants, now: datetime) -> ReleasedGrants:
        """Return allocations (by key or by agent) to the pool; exactly once, whatever the retries."""
        chosen = [k for k in dict.fromkeys(req.keys) if k in self.grants]
        if req.agent is not None:
            chosen += [k for k, g in self.grants.items()
                       if g.agent == req.agent and k not in chosen and not (req.keep_spawn and g.spawn)]
        released: list[Grant] = []
        for key in chosen:
            grant = self.grants[key]
            if req.owner is not None and grant.request_id != req.owner:
                continue
            del self.grants[key]
            released.append(grant)
            holder = self.children.get(grant.child)
            if self.level is Level.SUPERVISOR and holder is not None:
                holder.resources = holder.resources.minus(grant.size)
        if released:
            self.updated_at = now
            if self.reclaiming is not None and self.reclaiming.fits_in(self.free):
                self.reclaiming = None
        return ReleasedGrants(released=released)

    def set_reclaiming(self, req: Reclaiming, now: datetime) -> PoolTotals:
        """Begin or end a reclaim: while it runs, this level lends nothing new."""
        self.reclaiming = None if req.resources is None or req.resources.fits_in(self.free) else req.resources
        self.updated_at = now
        return self.pool()

    def transfer_capacity(self, req: TransferCapacity, now: datetime) -> ReconfigureResult:
        """Move nominal capacity between two children's slices (the pool's free is unchanged)."""
        source, target = self._child(req.source), self._child(req.target)
        short = req.resources.shortfall(source.resources)
        if short:
            raise CapacityExceeded(
                f"{self.scope} cannot move {req.resources.human()} from {req.source!r}: "
                + "; ".join(f"{k} {v}" for k, v in short.items()),
                level=self.level.value, entity=self.entity_id, problems=[f"{k}: {v}" for k, v in short.items()])
        previous = source.resources
        source.resources = source.resources.minus(req.resources)
        target.resources = target.resources + req.resources
        self.updated_at = now
        return ReconfigureResult(child=self.view_child(req.target), previous_resources=previous,
                                 previous_policy=source.policy)

    def mark_quota(self, req: QuotaMark, now: datetime) -> ChildView:
        """Record the quota action taken on an agent over its allocation since ``req.since``."""
        child = self._child(req.agent)
        if child.over_quota_since == req.since:
            child.quota_action = req.action
            self.updated_at = now
        return self.view_child(req.agent)

    def record_restart(self, req: RecordRestart, now: datetime) -> RestartDecision:
        """OTP restart intensity: allow a restart while fewer than ``intensity`` happened in the period;
        past that the agent is marked failed (given up on)."""
        child = self._child(req.agent)
        policy = self.policy.restart or RestartPolicy()
        recent = [t for t in child.restarts if (now - t).total_seconds() < policy.period_seconds]
        if child.failed is not None or len(recent) >= policy.intensity:
            child.failed = child.failed or (f"{len(recent)} restarts in {policy.period_seconds:g}s "
                                            f"(intensity {policy.intensity}); last crash: {req.reason}")
            child.restarts = recent
            self.updated_at = now
            return RestartDecision(allowed=False, restarts_in_period=len(recent), reason=child.failed)
        child.restarts = [*recent, now]
        self.updated_at = now
        return RestartDecision(allowed=True, restarts_in_period=len(child.restarts),
                               backoff_seconds=policy.backoff_seconds * 2 ** (len(child.restarts) - 1))

    def record_agent_failure(self, req: AgentFailure, now: datetime) -> LevelView:
        """A manager records an agent its supervisor gave up on (shown in its view, health degraded)."""
        self.agent_failures[req.agent] = f"{req.supervisor}: {req.reason}"
        self.updated_at = now
        return self.view(now)

    def silent_agents(self, now: datetime, silence_seconds: float) -> list[str]:
        """Active agents not heard from for ``silence_seconds`` (by their last report), newest checks first."""
        if not silence_seconds:
            return []
        out = []
        for name, c in self.children.items():
            seen = c.last_report.reported_at if c.last_report is not None else None
            if c.status is ChildStatus.ACTIVE and c.failed is None and seen is not None \
                    and (now - seen).total_seconds() > silence_seconds:
                out.append(name)
        return sorted(out)

    def dependents(self, key: str) -> list[str]:
        """Agents (keys) that depend on agent ``key`` (managers)."""
        return sorted(k for k, deps in self.dependencies.items() if key in deps)

    def watches_due(self) -> list[tuple[str, datetime]]:
        """Agents over their allocation whose overuse no EnforceAgentQuotas run watches yet."""
        return sorted((n, c.over_quota_since) for n, c in self.children.items()
                      if c.over_quota_since is not None and c.quota_watch != c.over_quota_since)

    def throttles_to_lift(self) -> list[str]:
        """Throttled agents whose use is back within their allocation; each is lifted once."""
        names = sorted(n for n, c in self.children.items() if c.lift_throttle)
        for n in names:
            self.children[n].lift_throttle = False
        return names

    def mark_watched(self, name: str, since: datetime) -> None:
        """An EnforceAgentQuotas run now watches this overuse."""
        child = self.children.get(name)
        if child is not None:
            child.quota_watch = since

    def reconfigure_child(self, req: ReconfigureChild, now: datetime) -> ReconfigureResult:
        """Resize a child's slice (it must fit in free + its old slice) and/or replace its policy."""
        child = self._child(req.name)
        previous_resources, previous_policy = child.resources, child.policy
        if req.resources is not None and req.resources != child.resources and self.level is Level.SUPERVISOR:
            raise InvalidRequest(f"agent {req.name!r} holds allocations, not a slice: change its resources by "
                                 "allocating or releasing (AllocateResources / ReleaseResources)",
                                 level=self.level.value, entity=self.entity_id)
        if req.resources is not None and req.resources != child.resources:
            available = self.free + child.resources
            short = req.resources.shortfall(available)
            if short:
                raise CapacityExceeded(
                    f"{self.scope} cannot resize {self.child_level.value} {req.name!r} to "
                    f"{req.resources.human()}: " + "; ".join(f"{k} {v}" for k, v in short.items()),
                    level=self.level.value, entity=self.entity_id, problems=[f"{k}: {v}" for k, v in short.items()])
            child.resources = req.resources
        if req.policy is not None:
            child.policy = req.policy
        self.updated_at = now
        return ReconfigureResult(child=self.view_child(req.name), previous_resources=previous_resources,
                                 previous_policy=previous_policy)

    def begin_child_removal(self, ref: ChildRef, now: datetime) -> ChildView:
        """Mark a child as being removed so nothing new is routed to it."""
        child = self._child(ref.name)
        child.status = ChildStatus.REMOVING
        self.updated_at = now
        return self.view_child(ref.name)

    def cancel_child_removal(self, ref: ChildRef, now: datetime) -> ChildLookup:
        """Undo :meth:`begin_child_removal` (compensation); a missing child is left alone."""
        child = self.children.get(ref.name)
        if child is None:
            return ChildLookup()
        child.status = ChildStatus.ACTIVE
        self.updated_at = now
        return ChildLookup(child=self.view_child(ref.name))

    def unregister_child(self, ref: ChildRef, now: datetime) -> UnregisterResult:
        """Remove a child and return its slice to the pool. Idempotent: a missing child releases nothing."""
        child = self.children.get(ref.name)
        if child is None or (ref.owner is not None and child.request_id != ref.owner):
            return UnregisterResult(released=None)
        del self.children[ref.name]
        grants: list[Grant] = []
        if self.level is Level.SUPERVISOR:
            grants = [g for g in self.grants.values() if g.child == ref.name]
            for g in grants:
                del self.grants[g.key]
        self.updated_at = now
        return UnregisterResult(released=child.resources, grants=grants)

    def configure(self, req: ConfigureLevel, now: datetime) -> LevelView:
        """Change own capacity (never below what children hold) and/or policy (never below their count)."""
        problems: list[str] = []
        if req.resources is not None:
            short = self.granted.shortfall(req.resources)
            problems += [f"capacity {k}: children hold more ({v})" for k, v in short.items()]
        if req.policy is not None and req.policy.max_children is not None \
                and req.policy.max_children < len(self.children):
            problems.append(f"policy max_children {req.policy.max_children} is below the "
                            f"{len(self.children)} {self.child_level.value}s that exist")
        if problems:
            raise Conflict(f"{self.scope} cannot be reconfigured: " + "; ".join(problems),
                           level=self.level.value, entity=self.entity_id, problems=problems)
        if req.resources is not None:
            self.capacity = req.resources
        if req.policy is not None:
            self.set_policy(SetPolicy(request_id=req.request_id, policy=req.policy), now)
        self.updated_at = now
        return self.view(now)

    def begin_removal(self, req: BeginRemoval, now: datetime) -> RemovalPlan:
        """Refuse if children remain and no drain was asked; otherwise stop admitting and list them."""
        if self.children and not req.drain:
            names = sorted(self.children)
            raise HasChildren(
                f"{self.scope} still has {len(names)} {self.child_level.value}(s): {', '.join(names[:10])}"
                f"{' ...' if len(names) > 10 else ''}; remove them first or ask to drain",
                level=self.level.value, entity=self.entity_id, data={"children": names})
        self.status = ChildStatus.REMOVING
        self.updated_at = now
        return RemovalPlan(children=sorted(self.children))

    def cancel_removal(self, now: datetime) -> None:
        """Undo :meth:`begin_removal` (compensation when a drain fails)."""
        self.status = ChildStatus.ACTIVE
        self.updated_at = now

    def check_can_close(self) -> None:
        """Closing is allowed only once removal began and no child is left."""
        if self.status is not ChildStatus.REMOVING:
            raise Conflict(f"{self.entity_id} must begin removal before it closes",
                           level=self.level.value, entity=self.entity_id)
        if self.children:
            raise HasChildren(f"{self.scope} still has children: {', '.join(sorted(self.children))}",
                              level=self.level.value, entity=self.entity_id, data={"children": sorted(self.children)})
        if self.grants:
            keys = sorted(self.grants)
            raise HasChildren(f"{self.scope} still holds {len(keys)} allocation(s): {', '.join(keys[:5])}"
                              f"{' ...' if len(keys) > 5 else ''}; release them first",
                              level=self.level.value, entity=self.entity_id, data={"allocations": keys})

    def apply_report(self, report: LevelSummary) -> bool:
        """Record a child's upward report; stale or unknown reports are ignored. True if recorded."""
        child = self.children.get(report.name)
        if child is None:
            return False
        if child.last_report is not None and report.seq <= child.last_report.seq:
            return False
        child.last_report = report
        if self.level is Level.SUPERVISOR and report.used is not None:
            child.used = report.used
            over = not report.used.fits_in(child.resources)
            if not over:
                if child.quota_action is QuotaAction.THROTTLE:
                    child.lift_throttle = True
                child.over_quota_since, child.quota_action = None, None
            elif child.over_quota_since is None:
                child.over_quota_since = report.reported_at or self.updated_at
        return True

    # -- views --------------------------------------------------------------------------------------

    def view_child(self, name: str) -> ChildView:
        """One child as this level sees it."""
        c = self.children[name]
        return ChildView(name=c.name, entity_id=self.child_entity_id(c.name), status=c.status,
                         resources=c.resources, policy=c.policy, last_report=c.last_report, used=c.used,
                         over_quota_since=c.over_quota_since,
                         quota_action=c.quota_action.value if c.quota_action is not None else None,
                         priority=c.priority, failed=c.failed, restarts=len(c.restarts))

    def pool_view(self) -> PoolView:
        """The pool as the ManagementLevel face shows it."""
        p = self.pool()
        return PoolView(capacity=p.capacity, granted=p.granted, free=p.free, borrowed=p.borrowed, lent=p.lent,
                        reclaiming=self.reclaiming)

    def health(self) -> Health:
        """Draining while being removed; degraded if anything below reports trouble."""
        if self.status is ChildStatus.REMOVING:
            return Health.DRAINING
        if self.agent_failures or any(c.failed for c in self.children.values()):
            return Health.DEGRADED
        for child in self.children.values():
            r = child.last_report
            if r is None:
                continue
            if r.health is Health.DEGRADED or r.status == AgentStatus.FAILED.value \
                    or r.agents_by_status.get(AgentStatus.FAILED.value, 0) > 0:
                return Health.DEGRADED
        return Health.HEALTHY

    def summary(self, now: datetime) -> LevelSummary:
        """This level and everything below it, as reported upward."""
        agents: dict[str, int] = {}
        by_level: dict[str, ResourceTotals] = {
            self.level.value: ResourceTotals(capacity=self.capacity, granted=self.granted)}
        supervisors = 0
        done = sum(c.last_report.tasks_completed for c in self.children.values() if c.last_report is not None)
        failed = sum(c.last_report.tasks_failed for c in self.children.values() if c.last_report is not None)
        for child in self.children.values():
            r = child.last_report
            if self.child_level is Level.AGENT:
                status = r.status if r is not None else AgentStatus.STARTING.value
                agents[status] = agents.get(status, 0) + 1
                key = Level.AGENT.value
                by_level[key] = by_level.get(key, ResourceTotals()).plus(
                    ResourceTotals(capacity=child.resources, granted=child.resources))
                continue
            if self.child_level is Level.SUPERVISOR:
                supervisors += 1
            elif r is not None:
                supervisors += r.supervisors
            if r is None:
                key = self.child_level.value
                by_level[key] = by_level.get(key, ResourceTotals()).plus(
                    ResourceTotals(capacity=child.resources))
                continue
            for status, n in r.agents_by_status.items():
                agents[status] = agents.get(status, 0) + n
            for key, sub in r.resources_by_level.items():
                by_level[key] = by_level.get(key, ResourceTotals()).plus(sub)
        if self.level is Level.SUPERVISOR:
            supervisors = 1
        return LevelSummary(entity_id=self.entity_id, level=self.level, name=self.name, seq=self.report_seq,
                            health=self.health(), status=self.status.value, resources=self.capacity,
                            supervisors=supervisors, agents_by_status=agents, tasks_completed=done,
                            tasks_failed=failed,
                            resources_by_level=by_level, reported_at=now)

    def view(self, now: datetime, run_updates: int = 0, cache: CacheStats | None = None) -> LevelView:
        """The common ManagementLevel face of this level."""
        return LevelView(
            id=self.entity_id, level=self.level, scope=self.scope, domain=self.domain, name=self.name,
            status=self.status, policy=self.policy,
            pool=self.pool_view(),
            health=self.health(), children=[self.view_child(n) for n in sorted(self.children)],
            metrics=self.summary(now), created_at=self.created_at, updated_at=self.updated_at,
            run_updates=run_updates, continued_as_new=self.continued_as_new, agents=self.agent_count,
            policy_cache=cache, agent_failures=dict(self.agent_failures))
