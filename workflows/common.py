"""Plumbing shared by every workflow: error translation, search attributes, queues, activity options.

Only deterministic code lives here: it runs inside workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from tetrarch.errors import ErrorInfo, TetrarchError
    from tetrarch.names import Level, SearchAttr, TaskQueues

T = TypeVar("T")

LEVEL_KEY = SearchAttributeKey.for_keyword(SearchAttr.LEVEL)
DOMAIN_KEY = SearchAttributeKey.for_keyword(SearchAttr.DOMAIN)
SUPERVISOR_KEY = SearchAttributeKey.for_keyword(SearchAttr.SUPERVISOR)
AGENT_STATUS_KEY = SearchAttributeKey.for_keyword(SearchAttr.AGENT_STATUS)
OPERATION_KEY = SearchAttributeKey.for_keyword(SearchAttr.OPERATION)

#: Retries for activities that call entities: transient faults retry, domain refusals do not.
#: Unlimited attempts: a level whose worker is down is waited for (the operation stays open, visible
#: in the UI), never given up on half-way; refusals are non-retryable and fail at once.
ENTITY_CALL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), backoff_coefficient=2.0,
                                maximum_interval=timedelta(seconds=5), maximum_attempts=0)
ENTITY_CALL_TIMEOUT = timedelta(seconds=30)


def to_application_error(err: TetrarchError) -> ApplicationError:
    """A domain refusal as the non-retryable ApplicationError clients see (type = error code)."""
    return ApplicationError(str(err), err.info(), type=err.code, non_retryable=True)


def reraise(err: BaseException) -> NoReturn:
    """Re-raise a failed activity's or child's domain error as this workflow's own failure.

    The ApplicationError at the bottom of the cause chain keeps its type, message and details, so a
    refusal three hops down reaches the client unchanged. Anything else is raised as it is.
    """
    cause: BaseException | None = err
    while isinstance(cause, ActivityError | ChildWorkflowError):
        cause = cause.cause
    if isinstance(cause, ApplicationError) and cause.type:
        raise ApplicationError(cause.message, *cause.details, type=cause.type,
                               non_retryable=True) from None
    raise err


def error_info(err: BaseException) -> ErrorInfo | None:
    """The ErrorInfo carried by a failed activity or child, if it is a domain refusal."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError | ChildWorkflowError):
        cause = cause.cause
    if isinstance(cause, ApplicationError) and cause.details:
        detail = cause.details[0]
        if isinstance(detail, ErrorInfo):
            return detail
        if isinstance(detail, dict):
            return ErrorInfo.model_validate(detail)
    return None


def current_level() -> Level | None:
    """The level whose queue this workflow runs on (None on a queue not named after a level)."""
    tq = workflow.info().task_queue
    return next((level for level in Level if tq.endswith(level.value)), None)


def queues() -> TaskQueues:
    """The task queues of this deployment, derived from the queue this workflow runs on.

    Every queue is ``<prefix><level>``; the prefix is whatever precedes the level name here, so a
    deployment (or a test) with a prefix needs no extra configuration.
    """
    level = current_level()
    tq = workflow.info().task_queue
    return TaskQueues(tq[: -len(level.value)] if level is not None else "")


class Saga:
    """Compensations registered before each step and run in reverse, shielded, on failure."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    def add(self, what: str, undo: Callable[[], Awaitable[Any]]) -> None:
        """Register how to undo the step about to run."""
        self._undo.append((what, undo))

    async def compensate(self) -> None:
        """Run every compensation, newest first; one failing does not stop the others."""
        for what, undo in reversed(self._undo):
            try:
                await asyncio.shield(asyncio.ensure_future(undo()))
            except (Exception, asyncio.CancelledError) as e:  # one failed undo must not stop the others
                workflow.logger.error("compensation %s failed: %s", what, e)
        self._undo.clear()


async def guarded(saga: Saga, forward: Awaitable[T]) -> T:
    """Run an operation's steps; if they fail, undo them. If the operation is cancelled, its steps first
    run to their end, and then all of them are undone.

    Steps reach the levels through local activities, whose results are recorded only when the workflow
    task completes. A cancellation that arrives meanwhile makes the server refuse that completion, so the
    workflow runs again from its history: without the steps' results, interrupted at its first step. The
    levels have seen every step of the lost attempt, but the compensations of the later steps would
    never have been registered. Running the steps to their end again (each is idempotent on the request
    id) registers every compensation before any runs.
    """
    task = asyncio.ensure_future(forward)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            with contextlib.suppress(BaseException):
                await task
        await saga.compensate()
        raise
    except BaseException:
        await saga.compensate()
        raise


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    """Await every step to its end, then raise the first failure, if any.

    A plain gather fails as soon as one child fails, and a failed parent terminates its running
    children half-way through their own sagas; this lets each finish (and compensate) first.
    """
    outcomes = await asyncio.gather(*aws, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]
