"""Operations on domains, run on the orchestrator's queue: CreateDomain, ConfigureDomain, RemoveDomain."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.level import LevelState
    from tetrarch.models import LevelRef
    from tetrarch.names import Level
    from tetrarch.operations import (
        ConfigureDomainRequest,
        CreateDomainRequest,
        DomainResult,
        RemovalResult,
        RemoveDomainRequest,
        RemoveSupervisorRequest,
    )

from workflows.common import DOMAIN_KEY, OPERATION_KEY, queues
from workflows.level_ops import configure_level, create_level, remove_level, request_id
from workflows.supervisors import RemoveSupervisorWorkflow

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]


def _tag(operation: str, domain: str) -> None:
    workflow.upsert_search_attributes([OPERATION_KEY.value_set(operation), DOMAIN_KEY.value_set(domain)])


@workflow.defn(name="CreateDomain", failure_exception_types=_FAIL_FAST)
class CreateDomainWorkflow:
    """Create a domain: the orchestrator carves its pool, then its manager entity starts."""

    @workflow.run
    async def run(self, req: CreateDomainRequest) -> DomainResult:
        _tag("CreateDomain", req.domain)
        now = workflow.now()
        child = LevelState(level=Level.MANAGER, name=req.domain, domain=req.domain, capacity=req.resources,
                           policy=req.policy, created_at=now, updated_at=now)
        reg, created = await create_level(LevelRef.orchestrator(), child, request_id(req.request_id))
        return DomainResult(domain=reg.child, created=created)


@workflow.defn(name="ConfigureDomain", failure_exception_types=_FAIL_FAST)
class ConfigureDomainWorkflow:
    """Resize a domain's pool or replace its policy (global pool first, then the manager)."""

    @workflow.run
    async def run(self, req: ConfigureDomainRequest) -> DomainResult:
        _tag("ConfigureDomain", req.domain)
        rc = await configure_level(LevelRef.orchestrator(), LevelRef.manager(req.domain), req.domain,
                                   req.resources, req.policy, request_id(req.request_id))
        return DomainResult(domain=rc.child, created=False)


@workflow.defn(name="RemoveDomain", failure_exception_types=_FAIL_FAST)
class RemoveDomainWorkflow:
    """Remove a domain; with ``drain`` its supervisors (and their agents) are removed first."""

    @workflow.run
    async def run(self, req: RemoveDomainRequest) -> RemovalResult:
        _tag("RemoveDomain", req.domain)
        rid = request_id(req.request_id)
        async def drain(supervisor: str) -> object:
            return await workflow.execute_child_workflow(
                RemoveSupervisorWorkflow.run,
                RemoveSupervisorRequest(domain=req.domain, name=supervisor, drain=True,
                                        request_id=f"{rid}/{supervisor}"),
                id=f"{workflow.info().workflow_id}/remove-supervisor/{supervisor}",
                task_queue=queues().manager)

        return await remove_level(LevelRef.orchestrator(), LevelRef.manager(req.domain), req.domain,
                                  req.drain, rid, drain)
