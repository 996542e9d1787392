"""The escalation saga's steps, shared by AllocateResources and SpawnAgent, and the release path
shared by ReleaseResources, StopAgent and reclaim (DESIGN.md decision 6).

A supervisor pays what it can of an allocation; what is left is borrowed from its domain, and what
the domain cannot pay from the global pool. Every level records its share under the allocation's
key, and each compensation is registered before its step and scoped to the request, so a failed or
cancelled allocation returns exactly what it took, and a release returns each part where it came from.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from tetrarch.decisions import PolicyCheck
    from tetrarch.errors import Conflict
    from tetrarch.level import ReleaseGrants, Reserve
    from tetrarch.models import LevelRef
    from tetrarch.names import Level
    from tetrarch.pools import Grant
    from tetrarch.resources import Resources, total

from workflows import steps
from workflows.common import Saga, gather_all, to_application_error


async def escalate(saga: Saga, rid: str, key: str, domain: str, supervisor: str, remainder: Resources,
                   check: PolicyCheck | None, priority: int = 0, spawn: bool = False) -> dict[str, Resources]:
    """Borrow what the supervisor could not pay: from the domain, then from the global pool.

    Returns what each higher level paid. The top pays all of what reaches it or refuses, and then the
    saga (whose undo steps are registered here first) gives back every share this request took.
    """
    parts: dict[str, Resources] = {}
    if remainder.is_zero():
        return parts
    undo = ReleaseGrants(request_id=f"{rid}/undo", keys=[key], owner=rid)
    manager, orchestrator = LevelRef.manager(domain), LevelRef.orchestrator()
    saga.add(f"return {key} to {manager.entity_id}", lambda: steps.release_grants(manager, undo))
    mid = await steps.reserve(manager, Reserve(request_id=rid, key=key, child=supervisor, resources=remainder,
                                               check=check, priority=priority, spawn=spawn))
    parts[Level.MANAGER.value] = mid.grant.own
    if mid.remainder.is_zero():
        await _still_held(domain, supervisor, key)
        return parts
    saga.add(f"return {key} to {orchestrator.entity_id}", lambda: steps.release_grants(orchestrator, undo))
    top = await steps.reserve(orchestrator, Reserve(request_id=rid, key=key, child=domain, resources=mid.remainder,
                                                    escalate=False, check=check, priority=priority,
                                                    spawn=spawn))
    parts[Level.ORCHESTRATOR.value] = top.grant.own
    await _still_held(domain, supervisor, key)
    return parts


async def _still_held(domain: str, supervisor: str, key: str) -> None:
    """After borrowing: the supervisor must still hold the allocation. A release or a stop that ran while
    this request borrowed could not return what was borrowed after it; then the request fails, and its
    saga gives back what it borrowed."""
    if (await steps.read_grant(LevelRef.supervisor(domain, supervisor), key)).grant is None:
        raise to_application_error(Conflict(
            f"allocation {key} was released while it was being borrowed for; what was borrowed goes back",
            level=Level.SUPERVISOR.value, entity=LevelRef.supervisor(domain, supervisor).entity_id))


async def return_borrowed(rid: str, domain: str, released: list[Grant]) -> dict[str, Resources]:
    """Give back, above the supervisor, what its released grants had borrowed; returns what each level got.

    Released by key at the domain and the global level at once: a key a level never lent is ignored,
    and a key already released is not released twice.
    """
    keys = [g.key for g in released if not g.borrowed.is_zero()]
    returned = {Level.SUPERVISOR.value: total([g.own for g in released])}
    if not keys:
        return returned
    req = ReleaseGrants(request_id=rid, keys=keys)
    mid, top = await gather_all(steps.release_grants(LevelRef.manager(domain), req),
                                steps.release_grants(LevelRef.orchestrator(), req))
    returned[Level.MANAGER.value] = total([g.own for g in mid.released])
    returned[Level.ORCHESTRATOR.value] = total([g.own for g in top.released])
    return returned
