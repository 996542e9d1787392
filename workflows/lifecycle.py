"""The supervisor's lifecycle operations beyond spawn and kill: checkpoint, restore, clone, upgrade and
specialize. Each is a durable workflow, judged by the three levels' policies, built from the steps the
spawn saga already has (so a refused or failed operation leaves nothing behind), and each keeps the
agent it started from running unless it succeeded.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import AgentImage, Checkpoint, SwitchImage, TakeCheckpoint, TaskInput
    from tetrarch.calls import LoadImage, RunTask
    from tetrarch.decisions import PolicyCheck
    from tetrarch.errors import Conflict, InvalidRequest, NotFound, TetrarchError
    from tetrarch.images import narrow, resolve_parameters, score_eval
    from tetrarch.lifecycle_ops import (
        CheckpointRequest,
        CloneRequest,
        LifecycleResult,
        RestoreRequest,
        SpecializeRequest,
        UpgradeRequest,
    )
    from tetrarch.models import LevelRef
    from tetrarch.names import Level
    from tetrarch.operations import AgentResult, SpawnAgentRequest
    from tetrarch.policy import OperationType

from workflows import steps
from workflows.agents import SpawnAgentWorkflow, judge_everywhere
from workflows.common import DOMAIN_KEY, OPERATION_KEY, queues, to_application_error
from workflows.level_ops import request_id

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]


def _tag(operation: str, domain: str) -> None:
    workflow.upsert_search_attributes([OPERATION_KEY.value_set(operation), DOMAIN_KEY.value_set(domain)])


def _refuse(err: TetrarchError) -> BaseException:
    return to_application_error(err)


async def _running_agent(domain: str, name: str) -> tuple[LevelRef, str]:
    """The agent (which must be running) and its supervisor."""
    target = LevelRef.agent(domain, name)
    found = await steps.find_agent(target)
    if not found.running:
        raise _refuse(Conflict(f"agent {domain}/{name} is not running (it is {found.state.status.value})",
                               level="agent", entity=target.entity_id))
    return target, found.state.spec.supervisor


async def _spawn_from(rid: str, domain: str, name: str, supervisor: str, cp: Checkpoint,
                      operation: OperationType) -> AgentResult:
    """A new agent from a checkpoint: the very same image (by digest), parameters and working state."""
    image = cp.image
    req = SpawnAgentRequest(request_id=f"{rid}/spawn", domain=domain, supervisor=supervisor, name=name,
                            resources=cp.resources, image=image.path if image is not None else None,
                            image_digest=image.digest if image is not None else None, params=cp.params,
                            memory=cp.memory, operation=operation)
    result: AgentResult = await workflow.execute_child_workflow(
        SpawnAgentWorkflow.run, req, id=f"{workflow.info().workflow_id}/spawn/{name}",
        task_queue=queues().for_level(Level.SUPERVISOR))
    return result


@workflow.defn(name="CheckpointAgent", failure_exception_types=_FAIL_FAST)
class CheckpointAgentWorkflow:
    """Checkpoint a running agent: its image, parameters and working state, restorable later anywhere."""

    @workflow.run
    async def run(self, req: CheckpointRequest) -> Checkpoint:
        _tag("CheckpointAgent", req.domain)
        rid = request_id(req.request_id)
        target, supervisor = await _running_agent(req.domain, req.name)
        await judge_everywhere(req.domain, supervisor, PolicyCheck(
            operation=OperationType.CHECKPOINT, domain=req.domain, supervisor=supervisor, agent=req.name))
        return await steps.checkpoint_agent(target, TakeCheckpoint(request_id=rid, label=req.label))


@workflow.defn(name="RestoreAgent", failure_exception_types=_FAIL_FAST)
class RestoreAgentWorkflow:
    """Start an agent from a checkpoint of another, or of itself once stopped (its final checkpoint),
    on its old supervisor or another one."""

    @workflow.run
    async def run(self, req: RestoreRequest) -> LifecycleResult:
        _tag("RestoreAgent", req.domain)
        rid = request_id(req.request_id)
        source = req.source or req.name
        found = await steps.find_agent(LevelRef.agent(req.domain, source))
        if source == req.name and found.running:
            raise _refuse(Conflict(f"agent {req.domain}/{req.name} is running; stop it first or restore it under "
                                   "another name", level="agent", entity=LevelRef.agent(req.domain, source).entity_id))
        checkpoints = found.state.checkpoints
        cp = (next((c for c in checkpoints if c.id == req.checkpoint), None) if req.checkpoint
              else (checkpoints[-1] if checkpoints else None))
        if cp is None:
            have = ", ".join(c.id for c in checkpoints) or "none"
            raise _refuse(NotFound(f"agent {req.domain}/{source} has no checkpoint "
                                   f"{req.checkpoint or '(any)'} (it has: {have})", level="agent"))
        supervisor = req.supervisor or found.state.spec.supervisor
        spawned = await _spawn_from(rid, req.domain, req.name, supervisor, cp, OperationType.RESTORE)
        return LifecycleResult(operation="restore", domain=req.domain, agents=[spawned.agent.name],
                               supervisor=spawned.supervisor, checkpoint=cp.id)


@workflow.defn(name="CloneAgent", failure_exception_types=_FAIL_FAST)
class CloneAgentWorkflow:
    """A new agent with a copy of a running agent's state and image (the source keeps running)."""

    @workflow.run
    async def run(self, req: CloneRequest) -> LifecycleResult:
        _tag("CloneAgent", req.domain)
        rid = request_id(req.request_id)
        target, supervisor = await _running_agent(req.domain, req.source)
        cp = await steps.checkpoint_agent(target, TakeCheckpoint(request_id=f"{rid}/clone", label=f"clone {req.name}"))
        spawned = await _spawn_from(rid, req.domain, req.name, req.supervisor or supervisor, cp, OperationType.CLONE)
        return LifecycleResult(operation="clone", domain=req.domain, agents=[spawned.agent.name],
                               supervisor=spawned.supervisor, checkpoint=cp.id)


@workflow.defn(name="UpgradeAgent", failure_exception_types=_FAIL_FAST)
class UpgradeAgentWorkflow:
    """Switch a running agent to a newer signed version of its image (``updateAgentCode``).

    The new version is verified (signature, trust, image rules) and tried first: every evaluation task
    it ships runs under the agent's limits and must pass. Only then does the agent switch; on any
    refusal or failure it keeps running the old version.
    """

    @workflow.run
    async def run(self, req: UpgradeRequest) -> LifecycleResult:
        _tag("UpgradeAgent", req.domain)
        rid = request_id(req.request_id)
        target, supervisor = await _running_agent(req.domain, req.name)
        state = (await steps.find_agent(target)).state
        old = state.spec.image_info
        if old is None:
            raise _refuse(InvalidRequest(f"agent {req.domain}/{req.name} runs no image; spawn it with one",
                                         level="agent", entity=target.entity_id))
        await judge_everywhere(req.domain, supervisor, PolicyCheck(
            operation=OperationType.UPGRADE, domain=req.domain, supervisor=supervisor, agent=req.name))
        new = await steps.load_image(LoadImage(domain=req.domain, supervisor=supervisor, agent=req.name,
                                               image=req.image, operation=OperationType.UPGRADE))
        if new.manifest.name != old.manifest.name:
            raise _refuse(InvalidRequest(f"{new.ref} is another image than {old.ref}: an upgrade keeps the image "
                                         "and changes its version", level="supervisor"))
        if new.manifest.semver <= old.manifest.semver:
            raise _refuse(InvalidRequest(f"{new.ref} is not newer than the running {old.ref}", level="supervisor"))
        try:
            params = resolve_parameters(new.manifest, {**state.spec.params, **req.params})
        except TetrarchError as e:
            raise _refuse(e) from None
        failures = await self._try(target, supervisor, new, params, state.memory, rid)
        if failures:
            raise _refuse(Conflict(f"{new.ref} failed {len(failures)} of its evaluation tasks; {req.domain}/"
                                   f"{req.name} keeps running {old.ref}", level="supervisor", problems=failures))
        await steps.switch_agent_image(target, SwitchImage(request_id=rid, image=new, params=params))
        return LifecycleResult(operation="upgrade", domain=req.domain, agents=[req.name], supervisor=supervisor,
                               image=new.ref, previous_image=old.ref)

    @staticmethod
    async def _try(target: LevelRef, supervisor: str, image: AgentImage, params: dict[str, object],
                   memory: dict[str, object], rid: str) -> list[str]:
        """Run the new version's evaluation tasks as the agent would; what failed, if anything."""
        failures = []
        for i, task in enumerate(image.manifest.evaluation):
            result = await steps.run_task_attempt(RunTask(
                target=target, supervisor=supervisor, image=image, params=dict(params), memory=dict(memory),
                task=TaskInput(request_id=f"{rid}/try/{i}", intent=task.intent, input=task.input)))
            if not result.ok:
                failures.append(f"evaluation {i} ({task.intent}): {result.reason}: {result.error}")
            elif task.expected is not None and not score_eval(task, result.output):
                failures.append(f"evaluation {i} ({task.intent}): got {result.output!r}, expected {task.expected!r}")
        return failures


@workflow.defn(name="SpecializeAgent", failure_exception_types=_FAIL_FAST)
class SpecializeAgentWorkflow:
    """Narrow a running agent to some of its image's intents and tighter parameters (never wider)."""

    @workflow.run
    async def run(self, req: SpecializeRequest) -> LifecycleResult:
        _tag("SpecializeAgent", req.domain)
        rid = request_id(req.request_id)
        target, supervisor = await _running_agent(req.domain, req.name)
        state = (await steps.find_agent(target)).state
        image = state.spec.image_info
        if image is None:
            raise _refuse(InvalidRequest(f"agent {req.domain}/{req.name} runs no image to specialize",
                                         level="agent", entity=target.entity_id))
        await judge_everywhere(req.domain, supervisor, PolicyCheck(
            operation=OperationType.SPECIALIZE, domain=req.domain, supervisor=supervisor, agent=req.name))
        try:
            manifest = narrow(image.manifest, req.narrowing)
            # Values the narrower ranges no longer admit fall back to the (narrowed) defaults.
            kept = {k: v for k, v in state.spec.params.items()
                    if k in manifest.parameters and manifest.parameters[k].problem(v) is None}
            params = resolve_parameters(manifest, kept | req.params)
        except TetrarchError as e:
            raise _refuse(e) from None
        narrowed = image.model_copy(update={"manifest": manifest})
        await steps.switch_agent_image(target, SwitchImage(request_id=rid, image=narrowed, params=params))
        return LifecycleResult(operation="specialize", domain=req.domain, agents=[req.name], supervisor=supervisor,
                               image=image.ref, intents=sorted(manifest.intents))
