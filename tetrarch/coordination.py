"""The order of a coordinated set of operations (pure): dependencies first, dependents stopped first."""

from __future__ import annotations

from tetrarch.errors import InvalidRequest
from tetrarch.lifecycle_ops import CoordinatedOp


def _label(op: CoordinatedOp) -> str:
    return f"{op.op} {op.agent}"


def plan(ops: list[CoordinatedOp]) -> list[CoordinatedOp]:
    """The operations in an order that respects what they need of each other.

    An agent must be spawned before an agent that depends on it is spawned, and before it is cloned,
    upgraded, specialized, checkpointed or stopped; an agent is stopped after the agents of the set
    that depend on it are stopped. Otherwise the given order is kept. A cycle is refused.
    """
    labels = [_label(o) for o in ops]
    if len(set(labels)) != len(labels):
        raise InvalidRequest("each operation appears once per agent in a coordinated set", level="supervisor")
    spawned = {o.agent: i for i, o in enumerate(ops) if o.op in ("spawn", "clone")}
    stops = {o.agent: i for i, o in enumerate(ops) if o.op == "stop"}
    needs: dict[int, set[int]] = {i: set() for i in range(len(ops))}
    for i, o in enumerate(ops):
        for dep in o.depends_on:
            if dep in spawned and spawned[dep] != i:
                needs[i].add(spawned[dep])
            if o.op == "spawn" and dep in stops:
                raise InvalidRequest(f"{o.agent} would depend on {dep}, which the same set stops", level="supervisor")
        if o.op == "clone" and o.source in spawned:
            needs[i].add(spawned[o.source or ""])
        if o.op in ("stop", "upgrade", "specialize", "checkpoint") and o.agent in spawned and spawned[o.agent] != i:
            needs[i].add(spawned[o.agent])
        if o.op == "stop":  # after the set's agents that depend on it have stopped
            for j, other in enumerate(ops):
                if other.op == "stop" and o.agent in _deps_of(ops, other.agent) and j != i:
                    needs[i].add(j)
    order: list[int] = []
    done: set[int] = set()
    while len(order) < len(ops):
        ready = [i for i in range(len(ops)) if i not in done and needs[i] <= done]
        if not ready:
            stuck = ", ".join(labels[i] for i in range(len(ops)) if i not in done)
            raise InvalidRequest(f"the operations need each other in a cycle: {stuck}", level="supervisor")
        order.append(ready[0])
        done.add(ready[0])
    return [ops[i] for i in order]


def _deps_of(ops: list[CoordinatedOp], agent: str) -> set[str]:
    return {d for o in ops if o.agent == agent for d in o.depends_on}
