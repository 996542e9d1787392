"""Operations on agents, run on the supervisor's queue: SpawnAgent and StopAgent.

Spawn here is the foundation's: the supervisor carves the agent's slice, then the agent entity
starts and reports running. Policy checks, placement, image verification and the agent runtime
are added as steps of the same saga.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import AgentSpec, AgentState, StopAgent
    from tetrarch.errors import Conflict
    from tetrarch.level import RegisterChild
    from tetrarch.models import LevelRef
    from tetrarch.operations import AgentInput, AgentResult, RemovalResult, SpawnAgentRequest, StopAgentRequest

from workflows import steps
from workflows.common import DOMAIN_KEY, OPERATION_KEY, SUPERVISOR_KEY, Saga, reraise, to_application_error
from workflows.level_ops import request_id

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]


@workflow.defn(name="SpawnAgent", failure_exception_types=_FAIL_FAST)
class SpawnAgentWorkflow:
    """Spawn an agent under a supervisor; nothing is left behind if any step fails."""

    @workflow.run
    async def run(self, req: SpawnAgentRequest) -> AgentResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("SpawnAgent"),
                                           DOMAIN_KEY.value_set(req.domain),
                                           SUPERVISOR_KEY.value_set(req.supervisor)])
        rid = request_id(req.request_id)
        supervisor = LevelRef.supervisor(req.domain, req.supervisor)
        saga = Saga()
        try:
            reg = await steps.register_child(supervisor, RegisterChild(
                request_id=rid, name=req.name, resources=req.resources))
            if reg.created:
                saga.add(f"release {req.name}", lambda: steps.unregister_child(supervisor, req.name, rid))
            now = workflow.now()
            spec = AgentSpec(domain=req.domain, supervisor=req.supervisor, name=req.name,
                             resources=reg.child.resources, image=req.image, labels=req.labels)
            state = await steps.start_agent(AgentInput(agent_state=AgentState(
                spec=spec, started_at=now, updated_at=now)))
            if state.spec.supervisor != req.supervisor:
                raise to_application_error(Conflict(
                    f"agent {req.domain}/{req.name} already runs under supervisor {state.spec.supervisor}",
                    level="agent", entity=state.entity_id))
            return AgentResult(agent=reg.child, created=reg.created)
        except BaseException as e:
            await saga.compensate()
            reraise(e)


@workflow.defn(name="StopAgent", failure_exception_types=_FAIL_FAST)
class StopAgentWorkflow:
    """Stop an agent cleanly and return its slice to its supervisor, exactly once."""

    @workflow.run
    async def run(self, req: StopAgentRequest) -> RemovalResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("StopAgent"),
                                           DOMAIN_KEY.value_set(req.domain)])
        rid = request_id(req.request_id)
        target = LevelRef.agent(req.domain, req.name)
        state = await steps.describe_agent(target)
        supervisor = LevelRef.supervisor(req.domain, state.spec.supervisor)
        saga = Saga()
        try:
            await steps.begin_child_removal(supervisor, req.name, rid)
            saga.add(f"reactivate {req.name}", lambda: steps.cancel_child_removal(supervisor, req.name, rid))
            await steps.stop_agent(target, StopAgent(request_id=rid, reason=req.reason))
            released = await steps.unregister_child(supervisor, req.name, rid)
            return RemovalResult(entity_id=target.entity_id, released=released.released)
        except BaseException as e:
            await saga.compensate()
            reraise(e)
