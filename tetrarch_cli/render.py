"""Human output: plain-text tables and one-line summaries (``--json`` bypasses all of this)."""

from __future__ import annotations

from collections.abc import Sequence

from tetrarch.agent import AgentState
from tetrarch.models import ChildView, LevelView
from tetrarch.operations import SystemStatus
from tetrarch.pools import AuditReport
from tetrarch.resource_ops import (
    AllocationResult,
    AllocationsView,
    BalanceResult,
    PoolsView,
    ReclaimResult,
    ReleaseResult,
)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned text table with a header rule."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def children_table(children: Sequence[ChildView], kind: str) -> str:
    """Children of a level: name, status, resources, and what they report."""
    rows = []
    for c in children:
        r = c.last_report
        below = "-" if r is None else (
            r.status if kind == "agent" else
            ", ".join(f"{n} {s}" for s, n in sorted(r.agents_by_status.items())) or "no agents")
        rows.append([c.name, c.status.value, c.resources.human(), below])
    if not rows:
        return f"(no {kind}s)"
    return table([kind, "status", "resources", "agents" if kind != "agent" else "agent status"], rows)


def level_view(view: LevelView) -> str:
    """A management level's face: pool, policy, health, children."""
    kind = {"orchestrator": "domain", "manager": "supervisor", "supervisor": "agent"}[view.level.value]
    p = view.pool
    policy = f"v{view.policy.version}"
    if view.policy.max_children is not None:
        policy += f", at most {view.policy.max_children} {kind}s"
    head = [
        f"{view.level.value} {view.id}  ({view.scope})",
        f"  status    {view.status.value}, health {view.health.value}",
        f"  pool      capacity {p.capacity.human()}",
        f"            granted  {p.granted.human()}",
        f"            free     {p.free.human()}",
        f"            borrowed {p.borrowed.human()}, lent {p.lent.human()}"
        + (f"; reclaiming {p.reclaiming.human()}" if p.reclaiming else ""),
        f"  policy    {policy}",
        f"  agents    {agents_line(view.metrics.agents_by_status)}",
    ]
    if view.policy_cache is not None:
        c = view.policy_cache
        head.append(f"  decisions {c.hits} cached / {c.hits + c.misses} ({c.hit_rate:.0%} hit rate, "
                    f"TTL {c.ttl_seconds * 1000:.0f} ms)")
    head += [""]
    return "\n".join(head) + children_table(view.children, kind)


def agents_line(by_status: dict[str, int]) -> str:
    """``3 running, 1 stopped`` or ``none``."""
    return ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"


def system_status(st: SystemStatus) -> str:
    """System-wide counts, then resources by level, then the domains."""
    lines = [f"system: {st.domains} domain(s), {st.supervisors} supervisor(s), "
             f"{st.agents_total} agent(s) ({agents_line(st.agents_by_status)}); "
             f"health {st.orchestrator.health.value}", ""]
    rows = [[lvl, t.capacity.human(), t.granted.human()]
            for lvl, t in st.orchestrator.metrics.resources_by_level.items()]
    lines.append(table(["level", "capacity", "granted to children"], rows))
    lines += ["", children_table(st.orchestrator.children, "domain")]
    return "\n".join(lines)


def agent_state(st: AgentState) -> str:
    """An agent's state in a few lines."""
    s = st.spec
    return "\n".join([
        f"agent {st.entity_id}",
        f"  supervisor {s.domain}/{s.supervisor}",
        f"  status     {st.status.value}{f' ({st.status_reason})' if st.status_reason else ''}",
        f"  spawned    with {s.resources.human()} (all it holds: tetrarch resources show {s.domain} {s.name})",
        f"  image      {s.image or '-'}" + (f" (signed by {s.image_info.signer[:16]}...)" if s.image_info else ""),
        *([f"  tasks      {st.tasks_completed} done, {st.tasks_failed} failed"] if s.image_info else []),
        *([f"  uses       {st.used.human()}" + (" (throttled)" if st.throttled else "")] if st.used else []),
        f"  started    {st.started_at.isoformat(timespec='seconds')}",
    ])


_LEVELS = ("supervisor", "manager", "orchestrator")


def allocation(r: AllocationResult) -> str:
    """Where each part of an allocation came from."""
    parts = ", ".join(f"{lvl} {r.parts[lvl].human()}" for lvl in _LEVELS if lvl in r.parts)
    verb = "allocated" if r.created else "already allocated"
    return (f"{verb} {r.resources.human()} to agent {r.domain}/{r.agent} (allocation {r.allocation_id}); "
            f"served by {r.served_by}: {parts}\n  the agent now holds {r.agent_total.human()}")


def release(r: ReleaseResult) -> str:
    """What went back where."""
    if not r.released:
        return f"agent {r.domain}/{r.agent}: nothing to release (already released)"
    back = ", ".join(f"{lvl} {r.returned[lvl].human()}" for lvl in _LEVELS if lvl in r.returned)
    return f"released {len(r.released)} allocation(s) of agent {r.domain}/{r.agent}: returned {back}"


def allocations(v: AllocationsView) -> str:
    """An agent's allocations: own and borrowed part of each."""
    a = v.agent
    head = [f"agent {v.domain}/{a.name} under supervisor {v.supervisor}: holds {a.resources.human()}"
            + (f", uses {a.used.human()}" if a.used else "")
            + (f" (over its allocation since {a.over_quota_since.isoformat(timespec='seconds')}"
               f"{', ' + a.quota_action if a.quota_action else ''})" if a.over_quota_since else "")]
    rows = [[g.key.split("#", 1)[1], "spawn" if g.spawn else "extra", g.own.human(), g.borrowed.human()]
            for g in v.grants]
    return "\n".join(head) + "\n" + (table(["allocation", "kind", "from supervisor", "borrowed above"], rows)
                                     if rows else "(no allocations)")


def pools(v: PoolsView) -> str:
    """Every level's pool in one table."""
    rows = [[eid, p.capacity.human(), p.granted.human(), p.borrowed.human(), p.lent.human(), p.free.human()
             + (" (reclaiming)" if p.reclaiming else "")] for eid, p in v.pools.items()]
    return table(["level", "capacity", "granted", "borrowed", "lent", "free"], rows)


def audit(r: AuditReport) -> str:
    """The conservation audit's verdict."""
    if r.ok:
        return f"balanced: {r.levels} ledgers, {r.allocations} allocations; capacity = granted + free everywhere"
    return f"NOT balanced ({len(r.problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in r.problems)


def balance(r: BalanceResult) -> str:
    """Planned and done capacity moves."""
    if not r.planned:
        return f"domain {r.domain}: balanced already (no supervisor borrows while another has free capacity)"
    lines = [f"domain {r.domain}: {len(r.done)}/{len(r.planned)} move(s) done"]
    lines += [f"  {m.source} -> {m.target}: {m.resources.human()}{'' if m in r.done else ' (planned)'}"
              for m in r.planned]
    lines += [f"  skipped: {s}" for s in r.skipped]
    return "\n".join(lines)


def reclaim(r: ReclaimResult) -> str:
    """What a reclaim got back."""
    state = "satisfied" if r.satisfied else "NOT satisfied"
    lines = [f"{r.target} wants {r.wanted.human()} free: {state}; free now {r.free.human()}"]
    if r.released:
        lines.append(f"  idle allocations given back: {', '.join(r.released)}")
    if r.preempted:
        lines.append(f"  preempted agents: {', '.join(r.preempted)}")
    if r.refusing_new_loans:
        lines.append("  lending paused: new loans are refused until enough comes back")
    lines += [f"  {p}" for p in r.problems]
    return "\n".join(lines)
