"""Calling entities from activities: Updates with request ids, and translation of failures.

A refusal by an entity arrives as ``WorkflowUpdateFailedError`` (or an RPC error when the entity
does not exist); both become non-retryable ``ApplicationError``s carrying :class:`ErrorInfo`, so
the operation workflow fails at once with the refusing level named. Transport faults stay
retryable and the activity's retry policy handles them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import QueryRejectCondition
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from tetrarch.errors import ErrorInfo, NotFound, TetrarchError
from tetrarch.models import LevelRef
from tetrarch.names import Level, TaskQueues

R = TypeVar("R")

_OPEN_ONLY = QueryRejectCondition.NOT_OPEN


def queue_of(level: Level | str) -> str:
    """The task queue of ``level`` in this deployment, from the queue this activity runs for.

    Every queue is ``<prefix><level>``. A regular activity runs on the queue of the level it acts on;
    a local one runs on its calling workflow's queue, which may be another level's, so the queue a
    started workflow belongs on is derived here rather than taken as it is.
    """
    here = activity.info().task_queue
    prefix = next((here[: -len(lv.value)] for lv in Level if here.endswith(lv.value)), "")
    return TaskQueues(prefix).for_level(Level(level))


async def uninterrupted(call: Awaitable[R]) -> R:
    """Finish ``call`` even when the activity is cancelled meanwhile, then let the cancellation through.

    A change sent to an entity may land even if its sender gave up half-way; the calling workflow's
    compensation must run after it lands, never before, or it undoes nothing and the change stays.
    Local activities are cancelled at once with their workflow, so every change is sent this way.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def domain_error(err: TetrarchError) -> ApplicationError:
    """A domain error as a non-retryable ApplicationError with its ErrorInfo as details."""
    return ApplicationError(str(err), err.info(), type=err.code, non_retryable=True)


def not_found(target: LevelRef) -> ApplicationError:
    """The refusal for an entity that is not running."""
    level = target.level.value
    return domain_error(NotFound(f"{target.describe()} does not exist (no running {target.entity_id})",
                                 level=level, entity=target.entity_id))


def translate(err: BaseException, target: LevelRef) -> BaseException:
    """Map a client-side failure of a call on ``target`` to what the activity should raise."""
    if isinstance(err, WorkflowUpdateFailedError):
        cause = err.cause
        if isinstance(cause, ApplicationError):
            details = list(cause.details) or [ErrorInfo(code=cause.type or "Error", level=target.level.value,
                                                        entity=target.entity_id, message=cause.message)]
            return ApplicationError(cause.message, *details, type=cause.type, non_retryable=True)
        return ApplicationError(str(cause), type="UpdateFailed", non_retryable=True)
    if isinstance(err, RPCError) and err.status == RPCStatusCode.NOT_FOUND:
        return not_found(target)
    if isinstance(err, WorkflowQueryFailedError):
        return ApplicationError(str(err), type="QueryFailed", non_retryable=True)
    return err


def raise_translated(err: BaseException, target: LevelRef) -> NoReturn:
    """Raise ``err``'s translation (caused by ``err``), or ``err`` itself when it stays as it is.

    ``raise translate(e) from e`` would make an untranslated transport fault its own cause, and
    reporting such an error (the failure converter walks the causes) recurses without end.
    """
    out = translate(err, target)
    if out is err:
        raise err
    raise out from err


def _digest(arg: Any) -> str:
    """A short digest of an Update's argument: one request id reused for another target or another
    definition must not be answered with the first call's result."""
    data = arg.model_dump_json() if isinstance(arg, BaseModel) else repr(arg)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


async def update(client: Client, target: LevelRef, method: Any, arg: Any, result_type: type[R],
                 request_id: str = "") -> R:
    """Execute Update ``method`` on ``target``; ``<request_id>:<update>`` is the Update id (dedup).

    The update name and a digest of the argument are part of the id: one request makes several
    Updates on one entity (admit, then compensate), a caller may reuse a request id for another
    target, and the server answers a reused id with the first result.
    """
    handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(target.entity_id)
    update_id = f"{request_id}:{method.__name__}:{_digest(arg)}" if request_id else None
    try:
        result = await uninterrupted(handle.execute_update(method, arg, id=update_id, result_type=result_type))
    except (WorkflowUpdateFailedError, RPCError) as e:
        raise_translated(e, target)
    return result  # type: ignore[no-any-return]


async def query(client: Client, target: LevelRef, method: Any, result_type: type[R], arg: Any = None) -> R:
    """Query a running entity (with ``arg`` if the query takes one); a missing or closed entity is NotFound."""
    handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(target.entity_id)
    try:
        # One round trip: the server refuses the query when the workflow is closed (a closed entity
        # would otherwise answer from its last state, replayed).
        result = await (handle.query(method, arg, result_type=result_type, reject_condition=_OPEN_ONLY)
                        if arg is not None else
                        handle.query(method, result_type=result_type, reject_condition=_OPEN_ONLY))
    except WorkflowQueryRejectedError:
        raise not_found(target) from None
    except (RPCError, WorkflowQueryFailedError) as e:
        raise_translated(e, target)
    return result  # type: ignore[no-any-return]
