"""CoordinateAgentOperations: operations on agents of one supervisor as one saga (``coordinateAgentOperations``).

The set is put in dependency order (:func:`tetrarch.coordination.plan`), then each operation runs as its
own child workflow, its undo registered first: a spawn or a clone is undone by stopping the new agent,
a stop by restoring the agent from its final checkpoint, an upgrade or a specialization by switching the
agent back to the image it ran. If one operation is refused or fails, the ones done are undone, newest
first, and the set fails with that operation named.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import SwitchImage
    from tetrarch.coordination import plan
    from tetrarch.errors import InvalidRequest
    from tetrarch.images import Narrowing
    from tetrarch.lifecycle_ops import (
        CheckpointRequest,
        CloneRequest,
        CoordinatedOp,
        CoordinateRequest,
        CoordinateResult,
        RestoreRequest,
        SpecializeRequest,
        UpgradeRequest,
    )
    from tetrarch.models import LevelRef
    from tetrarch.names import Level
    from tetrarch.operations import SpawnAgentRequest, StopAgentRequest

from workflows import steps
from workflows.agents import SpawnAgentWorkflow, StopAgentWorkflow
from workflows.common import DOMAIN_KEY, OPERATION_KEY, SUPERVISOR_KEY, Saga, queues, reraise, to_application_error
from workflows.level_ops import request_id
from workflows.lifecycle import (
    CheckpointAgentWorkflow,
    CloneAgentWorkflow,
    RestoreAgentWorkflow,
    SpecializeAgentWorkflow,
    UpgradeAgentWorkflow,
)


@workflow.defn(name="CoordinateAgentOperations", failure_exception_types=[pydantic.ValidationError])
class CoordinateAgentOperationsWorkflow:
    """Apply a set of agent operations of one supervisor in dependency order, all or none."""

    @workflow.run
    async def run(self, req: CoordinateRequest) -> CoordinateResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("CoordinateAgentOperations"),
                                           DOMAIN_KEY.value_set(req.domain), SUPERVISOR_KEY.value_set(req.supervisor)])
        self.rid = request_id(req.request_id)
        self.req = req
        try:
            ordered = plan(req.operations)
        except InvalidRequest as e:
            raise to_application_error(e) from None
        saga = Saga()
        done: list[str] = []
        for i, op in enumerate(ordered):
            label = f"{op.op} {op.agent}"
            try:
                await self._apply(i, op, saga)
            except BaseException as e:
                workflow.logger.warning("coordinated operation %s failed; undoing %s", label, done)
                await saga.compensate()
                reraise(e)
            done.append(label)
        return CoordinateResult(domain=req.domain, supervisor=req.supervisor, order=done)

    async def _child(self, run: Any, arg: Any, tag: str) -> Any:
        return await workflow.execute_child_workflow(
            run, arg, id=f"{workflow.info().workflow_id}/{tag}", task_queue=queues().for_level(Level.SUPERVISOR))

    async def _check_supervisor(self, agent: str) -> None:
        found = await steps.find_agent(LevelRef.agent(self.req.domain, agent))
        if found.state.spec.supervisor != self.req.supervisor:
            raise to_application_error(InvalidRequest(
                f"agent {self.req.domain}/{agent} is under supervisor {found.state.spec.supervisor}, not "
                f"{self.req.supervisor}: a coordinated set acts on one supervisor's agents", level="supervisor"))

    async def _apply(self, i: int, op: CoordinatedOp, saga: Saga) -> None:
        d, sup, rid = self.req.domain, self.req.supervisor, f"{self.rid}/{i}"
        stop = StopAgentRequest(domain=d, name=op.agent, reason="undone: a coordinated operation failed",
                                request_id=f"{rid}/undo")
        # A spawn or clone that fails undoes itself; only an agent this set created is stopped again.
        if op.op == "spawn":
            spawned = await self._child(SpawnAgentWorkflow.run, SpawnAgentRequest(
                request_id=rid, domain=d, supervisor=sup, name=op.agent, resources=op.resources, image=op.image,
                params=op.params, depends_on=op.depends_on), f"{i}/spawn")
            if spawned.created:
                saga.add(f"stop {op.agent}", lambda: self._child(StopAgentWorkflow.run, stop, f"{i}/undo"))
        elif op.op == "clone":
            await self._check_supervisor(op.source or "")
            await self._child(CloneAgentWorkflow.run, CloneRequest(
                request_id=rid, domain=d, source=op.source or "", name=op.agent, supervisor=sup), f"{i}/clone")
            saga.add(f"stop {op.agent}", lambda: self._child(StopAgentWorkflow.run, stop, f"{i}/undo"))
        elif op.op == "stop":
            await self._check_supervisor(op.agent)
            saga.add(f"restore {op.agent}", lambda: self._child(RestoreAgentWorkflow.run, RestoreRequest(
                request_id=f"{rid}/undo", domain=d, name=op.agent, supervisor=sup), f"{i}/undo"))
            await self._child(StopAgentWorkflow.run, StopAgentRequest(
                request_id=rid, domain=d, name=op.agent, reason="coordinated"), f"{i}/stop")
        elif op.op == "checkpoint":
            await self._check_supervisor(op.agent)
            await self._child(CheckpointAgentWorkflow.run, CheckpointRequest(
                request_id=rid, domain=d, name=op.agent), f"{i}/checkpoint")
        else:  # upgrade, specialize: undone by switching back to the image it ran
            await self._check_supervisor(op.agent)
            target = LevelRef.agent(d, op.agent)
            before = (await steps.find_agent(target)).state.spec
            if before.image_info is not None:
                back = SwitchImage(request_id=f"{rid}/undo", image=before.image_info, params=before.params)
                saga.add(f"switch {op.agent} back", lambda: steps.switch_agent_image(target, back))
            if op.op == "upgrade":
                await self._child(UpgradeAgentWorkflow.run, UpgradeRequest(
                    request_id=rid, domain=d, name=op.agent, image=op.image or "", params=op.params), f"{i}/upgrade")
            else:
                await self._child(SpecializeAgentWorkflow.run, SpecializeRequest(
                    request_id=rid, domain=d, name=op.agent, narrowing=op.narrowing or Narrowing(),
                    params=op.params), f"{i}/specialize")
