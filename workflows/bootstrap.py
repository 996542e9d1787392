"""ApplyHierarchy: bring a whole hierarchy file into being, idempotently, as one durable workflow.

The file is checked whole first (shape and arithmetic), then compared with what exists: any
conflict refuses the whole file before anything is applied. Then the orchestrator, the domains,
their supervisors and their demo agents are created by the same operation workflows a user runs,
each of which is a no-op when its target already exists identically.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.bootstrap import DomainEntry, HierarchySpec, plan_bootstrap, spec_problems
    from tetrarch.errors import Conflict, InvalidBootstrap
    from tetrarch.level import LevelState
    from tetrarch.names import Level
    from tetrarch.operations import (
        ApplyResult,
        CreateDomainRequest,
        CreateSupervisorRequest,
        LevelInput,
        SpawnAgentRequest,
    )

from workflows import steps
from workflows.agents import SpawnAgentWorkflow
from workflows.common import OPERATION_KEY, gather_all, queues, to_application_error
from workflows.domains import CreateDomainWorkflow
from workflows.supervisors import CreateSupervisorWorkflow


@workflow.defn(name="ApplyHierarchy", failure_exception_types=[pydantic.ValidationError])
class ApplyHierarchyWorkflow:
    """Apply a hierarchy file: validate, plan against what exists, then create what is missing."""

    @workflow.run
    async def run(self, spec: HierarchySpec) -> ApplyResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("ApplyHierarchy")])
        problems = spec_problems(spec)
        if problems:
            raise to_application_error(InvalidBootstrap(
                f"the hierarchy is not valid ({len(problems)} problem(s))", level="orchestrator",
                problems=problems))
        current = await steps.read_hierarchy([d.name for d in spec.domains])
        plan = plan_bootstrap(spec, current)
        if plan.conflicts:
            raise to_application_error(Conflict(
                f"the hierarchy conflicts with what exists ({len(plan.conflicts)} conflict(s)); "
                "nothing was applied", level="orchestrator", problems=plan.conflicts))
        result = ApplyResult(unchanged=plan.unchanged)
        if plan.create_orchestrator:
            now = workflow.now()
            await steps.start_level(LevelInput(level_state=LevelState(
                level=Level.ORCHESTRATOR, name="orchestrator", capacity=spec.global_.resources,
                policy=spec.global_.policy, created_at=now, updated_at=now)))
            result.created.append("orchestrator")
        outcomes = await gather_all(*(self._apply_domain(d) for d in spec.domains))
        for created in outcomes:
            result.created += created
        return result

    async def _apply_domain(self, d: DomainEntry) -> list[str]:
        wf_id = workflow.info().workflow_id
        created: list[str] = []
        dom = await workflow.execute_child_workflow(
            CreateDomainWorkflow.run,
            CreateDomainRequest(domain=d.name, resources=d.resources, policy=d.policy,
                                request_id=f"{wf_id}/{d.name}"),
            id=f"{wf_id}/domain/{d.name}", task_queue=queues().orchestrator)
        if dom.created:
            created.append(f"domain {d.name}")
        sups = await gather_all(*(workflow.execute_child_workflow(
            CreateSupervisorWorkflow.run,
            CreateSupervisorRequest(domain=d.name, name=s.name, resources=s.resources, policy=s.policy,
                                    request_id=f"{wf_id}/{d.name}/{s.name}"),
            id=f"{wf_id}/supervisor/{d.name}/{s.name}", task_queue=queues().manager) for s in d.supervisors))
        created += [f"supervisor {d.name}/{r.supervisor.name}" for r in sups if r.created]
        agents = await gather_all(*(workflow.execute_child_workflow(
            SpawnAgentWorkflow.run,
            SpawnAgentRequest(domain=d.name, supervisor=s.name, name=f"{s.name}-agent-{i}",
                              resources=s.agent_resources, image=s.agent_image,
                              request_id=f"{wf_id}/{d.name}/{s.name}/{i}"),
            id=f"{wf_id}/agent/{d.name}/{s.name}-agent-{i}", task_queue=queues().supervisor)
            for s in d.supervisors for i in range(1, s.agents + 1)))
        created += [f"agent {d.name}/{r.agent.name}" for r in agents if r.created]
        return created
