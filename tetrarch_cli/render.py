"""Human output: plain-text tables and one-line summaries (``--json`` bypasses all of this)."""

from __future__ import annotations

from collections.abc import Sequence

from tetrarch.agent import AgentState
from tetrarch.models import ChildView, LevelView
from tetrarch.operations import SystemStatus


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
        f"  resources  {s.resources.human()}",
        f"  image      {s.image or '-'}",
        f"  started    {st.started_at.isoformat(timespec='seconds')}",
    ])
