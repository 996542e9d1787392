"""The supervisor's lifecycle operations beyond spawn and kill: checkpoint, restore, clone, upgrade and
specialize. Each is a durable workflow, judged by the three levels' policies, built from the steps the
spawn saga already has (so a refused or failed operation leaves nothing behind), and each keeps the
agent it started from running unless it succeeded.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from runtime.sandbox import MIN_MEMORY_MIB
    from tetrarch.agent import AgentImage, AgentState, Checkpoint, SwitchImage, TakeCheckpoint, TaskInput
    from tetrarch.calls import LoadImage, RunTask, StateHook
    from tetrarch.decisions import PolicyCheck
    from tetrarch.errors import Conflict, InvalidRequest, NotFound, TetrarchError
    from tetrarch.images import StateRules, narrow, resolve_parameters, score_eval
    from tetrarch.lifecycle_ops import (
        CheckpointRequest,
        CloneRequest,
        LifecycleResult,
        MergeRequest,
        RestoreRequest,
        SpecializeRequest,
        SplitRequest,
        UpgradeRequest,
    )
    from tetrarch.models import LevelRef
    from tetrarch.names import Level
    from tetrarch.operations import AgentResult, SpawnAgentRequest, StopAgentRequest
    from tetrarch.policy import OperationType
    from tetrarch.resources import total
    from tetrarch.state_rules import merge_states, split_resources, split_state

from workflows import steps
from workflows.agents import SpawnAgentWorkflow, StopAgentWorkflow, judge_everywhere
from workflows.common import DOMAIN_KEY, OPERATION_KEY, gather_all, queues, reraise, to_application_error
from workflows.level_ops import request_id

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]


def _tag(operation: str, domain: str) -> None:
    workflow.upsert_search_attributes([OPERATION_KEY.value_set(operation), DOMAIN_KEY.value_set(domain)])


def _refuse(err: TetrarchError) -> BaseException:
    return to_application_error(err)


async def _running_agent(domain: str, name: str) -> tuple[LevelRef, AgentState]:
    """The agent (which must be running) and its state."""
    target = LevelRef.agent(domain, name)
    found = await steps.find_agent(target)
    if not found.running:
        raise _refuse(Conflict(f"agent {domain}/{name} is not running (it is {found.state.status.value})",
                               level="agent", entity=target.entity_id))
    return target, found.state


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
        target, state = await _running_agent(req.domain, req.name)
        supervisor = state.spec.supervisor
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
        target, source = await _running_agent(req.domain, req.source)
        supervisor = source.spec.supervisor
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
        target, state = await _running_agent(req.domain, req.name)
        supervisor = state.spec.supervisor
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
            raise _refuse(Conflict(f"{new.ref} did not pass its trial (start, then its evaluation tasks): "
                                   f"{failures[0][:200]}; {req.domain}/{req.name} keeps running {old.ref}",
                                   level="supervisor", problems=failures))
        await steps.switch_agent_image(target, SwitchImage(request_id=rid, image=new, params=params))
        return LifecycleResult(operation="upgrade", domain=req.domain, agents=[req.name], supervisor=supervisor,
                               image=new.ref, previous_image=old.ref)

    @staticmethod
    async def _try(target: LevelRef, supervisor: str, image: AgentImage, params: dict[str, object],
                   memory: dict[str, object], rid: str) -> list[str]:
        """Start the new version's code (its entrypoint must load) and run its evaluation tasks as the agent
        would; what failed, if anything."""
        failures = []
        start = await steps.run_task_attempt(RunTask(
            target=target, supervisor=supervisor, image=image, params=dict(params), memory=dict(memory), probe=True,
            task=TaskInput(request_id=f"{rid}/start", intent="start")))
        if not start.ok:
            return [f"the new version does not start ({start.reason}): {start.error}"]
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
        target, state = await _running_agent(req.domain, req.name)
        supervisor = state.spec.supervisor
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


async def _stop(domain: str, name: str, reason: str) -> None:
    await workflow.execute_child_workflow(
        StopAgentWorkflow.run, StopAgentRequest(domain=domain, name=name, reason=reason,
                                                request_id=f"{workflow.info().workflow_id}/stop/{name}"),
        id=f"{workflow.info().workflow_id}/stop/{name}", task_queue=queues().for_level(Level.SUPERVISOR))


async def _can_stop(domain: str, supervisor: str, name: str) -> None:
    """Refuse up front what would refuse stopping an original later: its kill policy, or agents needing it."""
    await judge_everywhere(domain, supervisor, PolicyCheck(operation=OperationType.KILL, domain=domain,
                                                           supervisor=supervisor, agent=name))
    dependents = (await steps.read_dependents(domain, name)).agents
    if dependents:
        raise _refuse(Conflict(f"agents {', '.join(k.split('/', 1)[1] for k in dependents)} depend on "
                               f"{domain}/{name}; it cannot be replaced", level="supervisor"))


async def _stop_or_undo(domain: str, originals: list[str], made: list[str], reason: str) -> None:
    """Stop the originals; if that fails after all, stop the agents just made, so the set is as before."""
    try:
        await gather_all(*(_stop(domain, n, reason) for n in originals))
    except BaseException as e:
        await gather_all(*(_stop(domain, n, "undone: the originals could not be stopped") for n in made))
        reraise(e)


async def _spawn_all(requests: list[SpawnAgentRequest]) -> list[AgentResult]:
    """Spawn every agent or none: if one spawn fails, the others are stopped again."""
    outcomes = await asyncio.gather(*(workflow.execute_child_workflow(
        SpawnAgentWorkflow.run, r, id=f"{workflow.info().workflow_id}/spawn/{r.name}",
        task_queue=queues().for_level(Level.SUPERVISOR)) for r in requests), return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        done = [r.name for r, o in zip(requests, outcomes, strict=True) if not isinstance(o, BaseException)]
        await gather_all(*(_stop(requests[0].domain, n, "undone: its siblings could not be spawned") for n in done))
        reraise(failed[0])
    return [o for o in outcomes if isinstance(o, AgentResult)]


@workflow.defn(name="SplitAgent", failure_exception_types=_FAIL_FAST)
class SplitAgentWorkflow:
    """One running agent into N (``<name>-1..N``): its state dealt out, its allocation divided; the
    original stops only once every part runs (if any part cannot start, none is kept)."""

    @workflow.run
    async def run(self, req: SplitRequest) -> LifecycleResult:
        _tag("SplitAgent", req.domain)
        rid = request_id(req.request_id)
        _, state = await _running_agent(req.domain, req.name)
        supervisor = state.spec.supervisor
        image = state.spec.image_info
        rules = image.manifest.state if image is not None else StateRules()
        try:
            share = split_resources(state.spec.resources, req.parts, MIN_MEMORY_MIB if image is not None else 0)
            memories = None if ":" in rules.split else split_state(state.memory, rules, req.parts)
        except TetrarchError as e:
            raise _refuse(e) from None
        if memories is None and image is not None:  # the image declares how: its split hook decides
            out = await steps.run_state_hook(StateHook(image=image, hook=rules.split, kind="split",
                                                       input={"state": state.memory, "parts": req.parts}))
            if not (isinstance(out, list) and len(out) == req.parts and all(isinstance(m, dict) for m in out)):
                raise _refuse(InvalidRequest(f"the split hook {rules.split} of {image.ref} returned no list of "
                                             f"{req.parts} states", level="supervisor"))
            memories = out
        assert memories is not None
        await judge_everywhere(req.domain, supervisor, PolicyCheck(
            operation=OperationType.SPLIT, domain=req.domain, supervisor=supervisor, agent=req.name,
            resources=share, count=req.parts))
        await _can_stop(req.domain, supervisor, req.name)
        names = [f"{req.name}-{i}" for i in range(1, req.parts + 1)]
        await _spawn_all([SpawnAgentRequest(
            request_id=f"{rid}/{n}", domain=req.domain, supervisor=supervisor, name=n, resources=share,
            image=image.path if image is not None else None, image_digest=image.digest if image is not None else None,
            params=state.spec.params, memory=memories[i], operation=OperationType.SPLIT)
            for i, n in enumerate(names)])
        await _stop_or_undo(req.domain, [req.name], names, f"split into {', '.join(names)}")
        return LifecycleResult(operation="split", domain=req.domain, agents=names, supervisor=supervisor,
                               image=image.ref if image is not None else None)


@workflow.defn(name="MergeAgents", failure_exception_types=_FAIL_FAST)
class MergeAgentsWorkflow:
    """Running agents of one domain into one: states combined, spawn allocations summed; the originals
    stop only once the merged agent runs."""

    @workflow.run
    async def run(self, req: MergeRequest) -> LifecycleResult:
        _tag("MergeAgents", req.domain)
        rid = request_id(req.request_id)
        names = []
        for entry in req.agents:
            dom, sep, name = entry.rpartition("/")
            if sep and dom != req.domain:
                raise _refuse(InvalidRequest(f"agent {entry} is in domain {dom!r}, not {req.domain!r}: agents of "
                                             "different domains cannot merge", level="manager"))
            names.append(name)
        if len(set(names)) != len(names):
            raise _refuse(InvalidRequest("each agent is merged once", level="supervisor"))
        states = []
        for n in names:
            states.append((await _running_agent(req.domain, n))[1])
        images = [s.spec.image_info for s in states]
        kinds = {i.manifest.name if i is not None else None for i in images}
        if len(kinds) > 1:
            raise _refuse(InvalidRequest(f"the agents run different images ({', '.join(sorted(map(str, kinds)))}); "
                                         "only agents of one image merge", level="supervisor"))
        image = max((i for i in images if i is not None), key=lambda i: i.manifest.semver, default=None)
        rules = image.manifest.state if image is not None else StateRules()
        if ":" in rules.merge and image is not None:  # the image declares how: its merge hook decides
            out = await steps.run_state_hook(StateHook(image=image, hook=rules.merge, kind="merge",
                                                       input={"states": [s.memory for s in states]}))
            if not isinstance(out, dict):
                raise _refuse(InvalidRequest(f"the merge hook {rules.merge} of {image.ref} returned no state",
                                             level="supervisor"))
            memory: dict[str, Any] = out
        else:
            try:
                memory = merge_states([s.memory for s in states], rules)
            except TetrarchError as e:
                raise _refuse(e) from None
        params = next((s.spec.params for s in states if s.spec.image_info is image), {})
        supervisor = req.supervisor or states[0].spec.supervisor
        for n, st in zip(names, states, strict=True):
            await _can_stop(req.domain, st.spec.supervisor, n)
        merged = await _spawn_all([SpawnAgentRequest(
            request_id=f"{rid}/merged", domain=req.domain, supervisor=supervisor, name=req.name,
            resources=total([s.spec.resources for s in states]), image=image.path if image is not None else None,
            image_digest=image.digest if image is not None else None, params=params, memory=memory,
            operation=OperationType.MERGE)])
        await _stop_or_undo(req.domain, names, [req.name], f"merged into {req.name}")
        return LifecycleResult(operation="merge", domain=req.domain, agents=[merged[0].agent.name],
                               supervisor=supervisor, image=image.ref if image is not None else None)
