"""Operations on supervisors, run on the manager's queue: Create, Configure, Remove and Scale."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.errors import CapacityExceeded, HasChildren, InvalidRequest, LimitExceeded
    from tetrarch.level import LevelState
    from tetrarch.models import ChildStatus, LevelRef, LevelView
    from tetrarch.names import Level, is_valid_name
    from tetrarch.operations import (
        ConfigureSupervisorRequest,
        CreateSupervisorRequest,
        RemovalResult,
        RemoveSupervisorRequest,
        ScaleResult,
        ScaleSupervisorsRequest,
        StopAgentRequest,
        SupervisorResult,
    )
    from tetrarch.resources import total

from workflows import steps
from workflows.agents import StopAgentWorkflow
from workflows.common import (
    DOMAIN_KEY,
    OPERATION_KEY,
    SUPERVISOR_KEY,
    Saga,
    queues,
    reraise,
    to_application_error,
)
from workflows.level_ops import configure_level, create_level, remove_level, request_id

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]


def _tag(operation: str, domain: str, supervisor: str | None = None) -> None:
    attrs = [OPERATION_KEY.value_set(operation), DOMAIN_KEY.value_set(domain)]
    if supervisor is not None:
        attrs.append(SUPERVISOR_KEY.value_set(supervisor))
    workflow.upsert_search_attributes(attrs)


@workflow.defn(name="CreateSupervisor", failure_exception_types=_FAIL_FAST)
class CreateSupervisorWorkflow:
    """Create a supervisor: its manager carves the pool, then the supervisor entity starts."""

    @workflow.run
    async def run(self, req: CreateSupervisorRequest) -> SupervisorResult:
        _tag("CreateSupervisor", req.domain, req.name)
        now = workflow.now()
        child = LevelState(level=Level.SUPERVISOR, name=req.name, domain=req.domain, capacity=req.resources,
                           policy=req.policy, created_at=now, updated_at=now)
        reg, created = await create_level(LevelRef.manager(req.domain), child, request_id(req.request_id),
                                          req.settings)
        return SupervisorResult(supervisor=reg.child, created=created)


@workflow.defn(name="ConfigureSupervisor", failure_exception_types=_FAIL_FAST)
class ConfigureSupervisorWorkflow:
    """Resize a supervisor's pool or replace its policy (domain pool first, then the supervisor)."""

    @workflow.run
    async def run(self, req: ConfigureSupervisorRequest) -> SupervisorResult:
        _tag("ConfigureSupervisor", req.domain, req.name)
        rc = await configure_level(LevelRef.manager(req.domain), LevelRef.supervisor(req.domain, req.name),
                                   req.name, req.resources, req.policy, request_id(req.request_id))
        return SupervisorResult(supervisor=rc.child, created=False)


@workflow.defn(name="RemoveSupervisor", failure_exception_types=_FAIL_FAST)
class RemoveSupervisorWorkflow:
    """Remove a supervisor; with ``drain`` its agents are stopped cleanly first."""

    @workflow.run
    async def run(self, req: RemoveSupervisorRequest) -> RemovalResult:
        _tag("RemoveSupervisor", req.domain, req.name)
        rid = request_id(req.request_id)
        async def drain(agent: str) -> object:
            return await workflow.execute_child_workflow(
                StopAgentWorkflow.run,
                StopAgentRequest(domain=req.domain, name=agent, reason="supervisor drained",
                                 request_id=f"{rid}/{agent}"),
                id=f"{workflow.info().workflow_id}/stop-agent/{agent}", task_queue=queues().supervisor)

        return await remove_level(LevelRef.manager(req.domain), LevelRef.supervisor(req.domain, req.name),
                                  req.name, req.drain, rid, drain)


@workflow.defn(name="ScaleSupervisors", failure_exception_types=_FAIL_FAST)
class ScaleSupervisorsWorkflow:
    """Add or remove N supervisors in a domain.

    Adding names them ``<prefix>-<n>`` with the lowest numbers not in use. Removing picks the
    supervisors with the fewest agents; without ``drain`` only empty ones qualify, and if too few
    are empty the whole request is refused before anything is removed.
    """

    @workflow.run
    async def run(self, req: ScaleSupervisorsRequest) -> ScaleResult:
        _tag("ScaleSupervisors", req.domain)
        rid = request_id(req.request_id)
        if req.delta == 0:
            raise to_application_error(InvalidRequest("delta must not be 0", level=Level.MANAGER.value))
        if not is_valid_name(f"{req.name_prefix}-1"):
            raise to_application_error(InvalidRequest(
                f"name_prefix {req.name_prefix!r} does not make valid supervisor names",
                level=Level.MANAGER.value))
        view = await steps.describe_level(LevelRef.manager(req.domain))
        wf_id = workflow.info().workflow_id
        if req.delta > 0:
            taken = {c.name for c in view.children}
            names: list[str] = []
            n = 1
            while len(names) < req.delta:
                candidate = f"{req.name_prefix}-{n}"
                if candidate not in taken:
                    names.append(candidate)
                n += 1
            # All or nothing: refuse what cannot fit before creating any, and undo the ones created
            # if another still fails (a concurrent change), so a refusal never leaves a partial scale.
            _check_room(view, req)
            outcomes = await asyncio.gather(*(workflow.execute_child_workflow(
                CreateSupervisorWorkflow.run,
                CreateSupervisorRequest(domain=req.domain, name=name, resources=req.resources,
                                        policy=req.policy, request_id=f"{rid}/{name}"),
                id=f"{wf_id}/create/{name}") for name in names), return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                saga = Saga()
                for name, o in zip(names, outcomes, strict=True):
                    if isinstance(o, SupervisorResult) and o.created:
                        saga.add(f"remove {name}", _remover(req.domain, name, f"{rid}/{name}/undo",
                                                            f"{wf_id}/undo/{name}"))
                await saga.compensate()
                reraise(failed[0])
            return ScaleResult(domain=req.domain, added=names)

        # Decide on what each supervisor holds now, not on its last report (which may predate a spawn).
        active = [c.name for c in view.children if c.status is ChildStatus.ACTIVE]
        views = await steps.gather(*(steps.describe_level(LevelRef.supervisor(req.domain, name))
                                       for name in active))
        load = {v.name: len(v.children) for v in views}
        candidates = sorted(active if req.drain else [name for name in active if load[name] == 0],
                            key=lambda name: (load[name], name))
        want = -req.delta
        if len(candidates) < want:
            raise to_application_error(HasChildren(
                f"domain {req.domain!r} has only {len(candidates)} supervisor(s) that can be removed "
                f"{'' if req.drain else 'without draining '}but {want} were asked",
                level=Level.MANAGER.value, entity=view.id,
                data={"removable": candidates}))
        chosen = candidates[:want]
        # Let every removal finish (a failed parent would terminate its running children half-way).
        removals = await asyncio.gather(*(workflow.execute_child_workflow(
            RemoveSupervisorWorkflow.run,
            RemoveSupervisorRequest(domain=req.domain, name=name, drain=req.drain, request_id=f"{rid}/{name}"),
            id=f"{wf_id}/remove/{name}") for name in chosen), return_exceptions=True)
        for outcome in removals:
            if isinstance(outcome, BaseException):
                reraise(outcome)
        return ScaleResult(domain=req.domain, removed=chosen)


def _check_room(view: LevelView, req: ScaleSupervisorsRequest) -> None:
    """Refuse a scale-up that the domain's free pool or its max_children cannot take whole."""
    needed = total([req.resources] * req.delta)
    short = needed.shortfall(view.pool.free)
    if short:
        raise to_application_error(CapacityExceeded(
            f"{view.scope} cannot carve {req.delta} supervisor(s) of {req.resources.human()}: "
            + "; ".join(f"{k} {v}" for k, v in short.items()),
            level=Level.MANAGER.value, entity=view.id, problems=[f"{k}: {v}" for k, v in short.items()]))
    limit = view.policy.max_children
    if limit is not None and len(view.children) + req.delta > limit:
        raise to_application_error(LimitExceeded(
            f"{view.scope} admits at most {limit} supervisors (policy v{view.policy.version} max_children); "
            f"it has {len(view.children)} and {req.delta} were asked",
            level=Level.MANAGER.value, entity=view.id))


def _remover(domain: str, name: str, rid: str, wf_id: str) -> Callable[[], Awaitable[object]]:
    """Compensation of a supervisor created by a scale-up that failed as a whole."""
    async def undo() -> object:
        return await workflow.execute_child_workflow(
            RemoveSupervisorWorkflow.run, RemoveSupervisorRequest(domain=domain, name=name, request_id=rid),
            id=wf_id)
    return undo
