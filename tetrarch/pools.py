"""Pool arithmetic: grants, escalation shares, and the conservation audit (DESIGN.md decision 6).

Every level has a nominal ``capacity`` carved from its parent. It spends that capacity two ways:

* **carved**: the nominal slices of its children (a manager's supervisors, the orchestrator's domains);
* **grants**: its share of an *allocation*: resources an agent asked for. The supervisor pays what
  it can from its own pool (``own``); what it cannot, it borrows from its domain (``borrowed``), which
  pays what it can and borrows the rest from the global pool. Each level records its share under
  the allocation's key, so a release returns every part to the level it came from.

``granted = carved + Σ own`` is what a level's capacity funds; ``free = capacity - granted`` is never
negative (no pool is ever oversubscribed). ``borrowed = Σ borrowed`` is what it holds from its parent;
``lent = Σ own`` of the grants it made for requests that escalated to it from below. Across levels,
a child's ``borrowed`` for a key equals its parent's ``own + borrowed`` for the same key; the
:func:`audit` checks that, and the per-agent sums, over a whole hierarchy.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from tetrarch.policy import ResourceCap
from tetrarch.resources import KINDS, Resources, total


class Grant(BaseModel):
    """One level's share of one allocation."""

    key: str = Field(description="The allocation's key: '<domain>/<agent>#<allocation id>'.")
    agent: str = Field(description="'<domain>/<agent>': who holds the allocation.")
    child: str = Field(description="The child it went through: the agent at a supervisor, the supervisor at a "
                                   "manager, the domain at the orchestrator.")
    own: Resources = Field(description="Paid from this level's own capacity.")
    borrowed: Resources = Field(default_factory=Resources, description="Borrowed from the parent for it.")
    request_id: str = Field(default="", description="The request that made it (compensation releases only its own).")
    priority: int = Field(default=0, description="The holder's priority; preemption takes the lowest first.")
    spawn: bool = Field(default=False, description="The agent's spawn allocation (not returned by idle reclaim).")
    created_at: datetime

    @property
    def size(self) -> Resources:
        """What this grant passes down: its own part plus what it borrowed."""
        return self.own + self.borrowed


def allocation_key(domain: str, agent: str, allocation_id: str) -> str:
    """The key of an allocation in every ledger it touches."""
    return f"{domain}/{agent}#{allocation_id}"


def key_agent(key: str) -> str:
    """``'<domain>/<agent>'`` of an allocation key."""
    return key.split("#", 1)[0]


def component_min(a: Resources, b: Resources) -> Resources:
    """Component-wise minimum: the part of ``a`` that ``b`` can pay."""
    return Resources(**{k: min(getattr(a, k), getattr(b, k)) for k in KINDS})


def lendable(free: Resources, lent: Resources, limit: ResourceCap | None) -> Resources:
    """What a level may still lend to requests from below: its free pool, within its lending limit.

    A lending limit (Kueue's ``lendingLimit``) caps the total a level lends to requests escalated
    from below, so the rest of its capacity stays for its own children's nominal slices.
    """
    if limit is None:
        return free
    headroom = limit.bounded(1 << 62)
    room = Resources(**{k: max(0, getattr(headroom, k) - getattr(lent, k)) for k in KINDS})
    return component_min(free, room)


def split(request: Resources, available: Resources, may_borrow: bool) -> tuple[Resources, Resources]:
    """Split a request into (paid here, left for the parent).

    A level pays what it can of each component; the rest goes up when it may borrow. A level that
    may not borrow (the top, or a policy that forbids it) pays all or nothing: the caller refuses
    when the second part is not zero.
    """
    own = component_min(request, available)
    return own, request.minus(own)


class PoolTotals(BaseModel):
    """A level's pool as people read it: capacity = granted + free; borrowed and lent on the side."""

    capacity: Resources
    granted: Resources = Field(description="Carved for children plus this level's own share of allocations.")
    free: Resources
    borrowed: Resources = Field(default_factory=Resources, description="Held from the parent for allocations.")
    lent: Resources = Field(default_factory=Resources,
                            description="Own capacity lent to requests that escalated from below.")
    allocated: Resources = Field(default_factory=Resources,
                                 description="Everything allocations hold through this level (own + borrowed).")


def totals(capacity: Resources, carved: Resources, grants: list[Grant], lends: bool) -> PoolTotals:
    """The pool of a level with these slices and grants (``lends``: a manager or the orchestrator)."""
    own = total([g.own for g in grants])
    borrowed = total([g.borrowed for g in grants])
    granted = carved + own
    return PoolTotals(capacity=capacity, granted=granted, free=capacity.minus(granted),
                      borrowed=borrowed, lent=own if lends else Resources(), allocated=own + borrowed)


def priority_order(grants: list[Grant]) -> list[Grant]:
    """Grants in the order preemption takes them: lowest priority first, newest first among equals."""
    return sorted(grants, key=lambda g: (g.priority, -g.created_at.timestamp(), g.key))


# -- the audit ----------------------------------------------------------------------------------------


class LedgerSnapshot(BaseModel):
    """One level's ledger as read for an audit."""

    entity_id: str
    level: str
    name: str
    parent: str | None = Field(default=None, description="The parent's entity id (None at the top).")
    capacity: Resources
    carved: Resources = Field(default_factory=Resources)
    children_slices: dict[str, Resources] = Field(
        default_factory=dict, description="Children's nominal slices (managers and the orchestrator).")
    agents: dict[str, Resources] = Field(
        default_factory=dict, description="Supervisors: each agent's recorded allocation.")
    grants: list[Grant] = Field(default_factory=list)


class AuditReport(BaseModel):
    """What an audit found: every problem, and the totals it checked."""

    ok: bool
    problems: list[str] = Field(default_factory=list)
    levels: int = 0
    allocations: int = 0


def _signed(a: Resources, b: Resources) -> dict[str, int]:
    return {k: getattr(a, k) - getattr(b, k) for k in KINDS}


def audit(ledgers: list[LedgerSnapshot]) -> AuditReport:
    """Check conservation over a quiescent hierarchy; every violated invariant is listed.

    * no level is oversubscribed: carved + own shares ≤ capacity, component-wise;
    * the nominal slice a parent records for a child equals that child's capacity, and the slices of a
      level's children sum to its ``carved``;
    * the top borrows nothing; every borrowed part is matched by the parent's grant of the same key to
      this child (own + borrowed there = borrowed here), and every grant of a parent to a child is
      matched by the child's;
    * a supervisor's record of each agent equals the sum of that agent's grants.
    """
    problems: list[str] = []
    by_id = {led.entity_id: led for led in ledgers}
    allocations: set[str] = set()
    for led in ledgers:
        own = total([g.own for g in led.grants])
        over = {k: v for k, v in _signed(led.carved + own, led.capacity).items() if v > 0}
        if over:
            problems.append(f"{led.entity_id} is oversubscribed by {over}")
        if led.children_slices and total(list(led.children_slices.values())) != led.carved:
            problems.append(f"{led.entity_id} carved {led.carved.human()} but its children's slices sum to "
                            f"{total(list(led.children_slices.values())).human()}")
        for child_name, slice_ in led.children_slices.items():
            child = next((c for c in ledgers if c.parent == led.entity_id and c.name == child_name), None)
            if child is not None and child.capacity != slice_:
                problems.append(f"{led.entity_id} records {child_name} at {slice_.human()}, "
                                f"but {child.entity_id} has {child.capacity.human()}")
        parent = by_id.get(led.parent) if led.parent else None
        for g in led.grants:
            allocations.add(g.key)
            if g.borrowed.is_zero():
                continue
            if led.parent is None:
                problems.append(f"{led.entity_id} (the top) borrowed {g.borrowed.human()} for {g.key}")
                continue
            if parent is None:
                continue  # parent not in this snapshot
            match = next((p for p in parent.grants if p.key == g.key), None)
            if match is None:
                problems.append(f"{led.entity_id} borrowed {g.borrowed.human()} for {g.key}, "
                                f"but {parent.entity_id} has no grant for it")
            elif match.size != g.borrowed:
                problems.append(f"{led.entity_id} borrowed {g.borrowed.human()} for {g.key}, "
                                f"but {parent.entity_id} granted {match.size.human()}")
            elif match.child != led.name:
                problems.append(f"{parent.entity_id} granted {g.key} to {match.child}, not {led.name}")
        for g in led.grants:
            child = next((c for c in ledgers if c.parent == led.entity_id and c.name == g.child), None)
            if child is None:
                continue
            match = next((c for c in child.grants if c.key == g.key), None)
            if match is None:
                problems.append(f"{led.entity_id} granted {g.size.human()} for {g.key} to {g.child}, "
                                f"which holds nothing for it (leaked)")
            elif match.borrowed != g.size:
                problems.append(f"{led.entity_id} granted {g.size.human()} for {g.key} to {g.child}, "
                                f"which borrowed {match.borrowed.human()} for it")
        if led.level == "supervisor":
            for g in led.grants:
                if g.child not in led.agents:
                    problems.append(f"{led.entity_id} holds {g.key} for {g.child}, which is not one of its agents")
        for name, held in led.agents.items():
            mine = total([g.size for g in led.grants if g.child == name])
            if mine != held:
                problems.append(f"{led.entity_id} records agent {name} at {held.human()}, "
                                f"but its grants sum to {mine.human()}")
    return AuditReport(ok=not problems, problems=problems, levels=len(ledgers), allocations=len(allocations))
