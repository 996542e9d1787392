"""The create / configure / remove sagas shared by domains and supervisors.

A domain is a manager admitted by the orchestrator; a supervisor is admitted by its manager. Both
follow the same steps, each registering its compensation before it runs:

* create: the parent carves the slice (idempotent), then the child entity starts; if the start
  fails, the slice is returned.
* configure: the parent resizes the slice, then the child applies it; if the child refuses (its
  own children hold more), the parent's old slice is restored.
* remove: the parent marks the child as removing, the child refuses if it still has children
  (unless draining, then ``drain`` removes them), closes, and the parent takes the slice back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from tetrarch.errors import NotFound
    from tetrarch.level import (
        BeginRemoval,
        ConfigureLevel,
        LevelState,
        ReconfigureChild,
        ReconfigureResult,
        RegisterChild,
        RegisterResult,
    )
    from tetrarch.models import LevelRef
    from tetrarch.operations import EntitySettings, LevelInput, RemovalResult
    from tetrarch.policy import Policy
    from tetrarch.resources import Resources

from workflows import steps
from workflows.common import Saga, error_info, gather_all, guarded, reraise


def request_id(given: str) -> str:
    """The request's idempotency key: the caller's, else this workflow's id (stable across retries)."""
    return given or workflow.info().workflow_id


async def create_level(parent: LevelRef, child: LevelState, rid: str,
                       settings: EntitySettings | None = None) -> tuple[RegisterResult, bool]:
    """Admit ``child`` at ``parent`` and start its entity. Returns the registration and whether new."""
    saga = Saga()

    async def forward() -> tuple[RegisterResult, bool]:
        saga.add(f"unregister {child.name}",
                 lambda: steps.unregister_child(parent, child.name, f"{rid}/undo", owner=rid))
        reg = await steps.register_child(parent, RegisterChild(
            request_id=rid, name=child.name, resources=child.capacity, policy=child.policy))
        await steps.start_level(LevelInput(level_state=child, settings=settings or EntitySettings()))
        return reg, reg.created

    try:
        return await guarded(saga, forward())
    except BaseException as e:
        reraise(e)


async def configure_level(parent: LevelRef, target: LevelRef, name: str, resources: Resources | None,
                          policy: Policy | None, rid: str) -> ReconfigureResult:
    """Resize ``name``'s slice at ``parent`` and apply it at ``target``; undo at the parent if refused."""
    saga = Saga()

    async def forward() -> ReconfigureResult:
        rc = await steps.reconfigure_child(parent, ReconfigureChild(
            request_id=rid, name=name, resources=resources, policy=policy))
        saga.add(f"restore {name}", lambda: steps.reconfigure_child(parent, ReconfigureChild(
            request_id=f"{rid}/undo", name=name, resources=rc.previous_resources,
            policy=rc.previous_policy)))
        await steps.configure_level(target, ConfigureLevel(request_id=rid, resources=resources, policy=policy))
        return rc

    try:
        return await guarded(saga, forward())
    except BaseException as e:
        reraise(e)


async def remove_level(parent: LevelRef, target: LevelRef, name: str, drain: bool, rid: str,
                       drain_child: Callable[[str], Awaitable[object]]) -> RemovalResult:
    """Remove ``target`` (child ``name`` of ``parent``), draining its children first if asked."""
    saga = Saga()

    async def forward() -> RemovalResult:
        drained: list[str] = []
        await steps.begin_child_removal(parent, name, rid)
        saga.add(f"reactivate {name} at parent", lambda: steps.cancel_child_removal(parent, name, rid))
        gone = False
        try:
            plan = await steps.begin_removal(target, BeginRemoval(request_id=rid, drain=drain))
        except Exception as e:  # the entity already closed (an earlier removal crashed before the parent)
            info = error_info(e)
            if info is None or info.code != NotFound.code:
                raise
            gone = True
        if not gone:
            saga.add(f"reactivate {target.entity_id}",
                     lambda: steps.cancel_removal(target, BeginRemoval(request_id=rid)))
            if plan.children:
                await gather_all(*(drain_child(c) for c in plan.children))
                drained = plan.children
            await steps.close_level(target, BeginRemoval(request_id=rid))
        released = await steps.unregister_child(parent, name, rid)
        return RemovalResult(entity_id=target.entity_id, released=released.released, drained=drained)

    try:
        return await guarded(saga, forward())
    except BaseException as e:
        reraise(e)

