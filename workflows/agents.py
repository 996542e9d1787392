"""Operations on agents, run on the supervisor's queue: SpawnAgent and StopAgent.

Spawn asks the three levels at once (the seed's parallel validation): the orchestrator and the
domain's manager judge it by their own policies and count the agent in, the supervisor judges it by
its policy and carves the agent's slice; then the agent entity starts and reports running. If any
level refuses, the highest refusing level decides (Global > Domain > Supervisor) and every step
already taken is undone, so a refused spawn leaves nothing behind. Images and the agent runtime are
added as further steps of the same saga.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import AgentImage, AgentSpec, AgentState, StopAgent
    from tetrarch.calls import LoadImage
    from tetrarch.decisions import PolicyCheck
    from tetrarch.errors import Conflict, InvalidRequest, NotFound, PolicyDenied, TetrarchError
    from tetrarch.images import ImageTampered, resolve_parameters
    from tetrarch.level import AdmitAgents, RegisterChild, RegisterResult, ReleaseAgents
    from tetrarch.models import LevelRef
    from tetrarch.names import Level
    from tetrarch.operations import (
        AgentInput,
        AgentResult,
        EntitySettings,
        RemovalResult,
        SpawnAgentRequest,
        StopAgentRequest,
    )
    from tetrarch.placement import place
    from tetrarch.policy import DEFAULT_AGENT_RESOURCES, OperationType, PlacementStrategy
    from tetrarch.resources import Resources

from workflows import steps
from workflows.allocation import escalate, return_borrowed
from workflows.common import (
    DOMAIN_KEY,
    OPERATION_KEY,
    SUPERVISOR_KEY,
    Saga,
    error_info,
    gather_all,
    guarded,
    reraise,
    to_application_error,
)
from workflows.level_ops import request_id

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]
_PRECEDENCE = [Level.ORCHESTRATOR.value, Level.MANAGER.value, Level.SUPERVISOR.value, Level.AGENT.value]


def first_by_precedence(errors: list[BaseException]) -> BaseException:
    """The error to report when several levels refused at once: a policy denial by the highest level
    (Global > Domain > Supervisor), else the first error."""
    denials = []
    for err in errors:
        info = error_info(err)
        if info is not None and info.code == PolicyDenied.code and info.level in _PRECEDENCE:
            denials.append((_PRECEDENCE.index(info.level), err))
    return min(denials, key=lambda d: d[0])[1] if denials else errors[0]


async def place_in_domain(domain: str, need: Resources, strategy: PlacementStrategy | None, what: str) -> str:
    """The domain picks a supervisor for ``need`` (``optimizeAgentPlacement``) by ``strategy``, else its
    policy's."""
    info = await steps.placement_candidates(domain)
    chosen = place(info.candidates, need, strategy or info.strategy)
    if chosen is None:
        raise to_application_error(NotFound(f"domain {domain!r} has no active supervisor to place {what} on",
                                            level=Level.MANAGER.value, entity=LevelRef.manager(domain).entity_id))
    return chosen


async def judge_everywhere(domain: str, supervisor: str, check: PolicyCheck) -> None:
    """Ask the three levels for their verdicts at once; raise the highest denial, if any."""
    chain = [LevelRef.orchestrator(), LevelRef.manager(domain), LevelRef.supervisor(domain, supervisor)]
    verdicts = await steps.gather(*(steps.judge(target, check) for target in chain))
    for target, verdict in zip(chain, verdicts, strict=True):
        if not verdict.allowed:
            raise to_application_error(PolicyDenied(verdict.reason, level=verdict.level, entity=target.entity_id,
                                                    data={"rule": verdict.rule}))


@workflow.defn(name="SpawnAgent", failure_exception_types=_FAIL_FAST)
class SpawnAgentWorkflow:
    """Spawn an agent under a supervisor; nothing is left behind if any step fails."""

    @workflow.run
    async def run(self, req: SpawnAgentRequest) -> AgentResult:
        sup_name = await self._where(req)
        rid = request_id(req.request_id)
        orchestrator, manager = LevelRef.orchestrator(), LevelRef.manager(req.domain)
        supervisor = LevelRef.supervisor(req.domain, sup_name)
        key = f"{req.domain}/{req.name}"
        saga = Saga()
        try:  # nothing is taken before the steps below, so a failure or cancellation here simply ends
            image = None
            # Runs recorded before images were loaded went on without this step (they replay unchanged).
            loads_image = bool(req.image) and workflow.patched("spawn-loads-image")
            if loads_image and req.resources is None:  # its default resources come from the image
                image = await steps.load_image(LoadImage(domain=req.domain, supervisor=sup_name, agent=req.name,
                                                         image=req.image))
            resources = req.resources or (image.manifest.default_resources if image is not None else None) \
                or await self._default_resources(supervisor)
            check = PolicyCheck(operation=req.operation, domain=req.domain, supervisor=sup_name,
                                agent=req.name, resources=resources)
            await self._await_dependencies(req)
        except BaseException as e:
            reraise(e)

        async def forward(image: AgentImage | None) -> AgentResult:
            admit = AdmitAgents(request_id=rid, agents=[key], check=check,
                                depends_on={key: [f"{req.domain}/{dep}" for dep in req.depends_on]})
            # Compensations first, scoped to this request: they undo only what it took, so they are
            # safe whether the step ran, half-ran (cancelled) or found the agent already there.
            count_out = ReleaseAgents(request_id=f"{rid}/undo", agents=[key], owner=rid)
            for level in (orchestrator, manager):
                saga.add(f"count {key} out at {level.entity_id}",
                         lambda t=level: steps.release_agents(t, count_out))  # type: ignore[misc]
            saga.add(f"release {req.name}",
                     lambda: steps.unregister_child(supervisor, req.name, f"{rid}/undo", owner=rid))
            steps_at_once = [
                steps.admit_agents(orchestrator, admit), steps.admit_agents(manager, admit),
                steps.register_child(supervisor, RegisterChild(request_id=rid, name=req.name, resources=resources,
                                                               check=check, escalate=True, priority=req.priority))]
            if loads_image and image is None:  # the supervisor verifies the image while the levels admit
                steps_at_once.append(steps.load_image(LoadImage(domain=req.domain, supervisor=sup_name,
                                                                agent=req.name, image=req.image)))
            outcomes = await asyncio.gather(*steps_at_once, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise first_by_precedence(failed)
            reg = outcomes[2]
            assert isinstance(reg, RegisterResult)
            if len(outcomes) > 3:
                assert isinstance(outcomes[3], AgentImage)
                image = outcomes[3]
            if image is not None and req.image_digest is not None and image.digest != req.image_digest:
                raise to_application_error(ImageTampered(
                    f"image {image.ref} at {image.path} is no longer the code this agent ran (digest "
                    f"{image.digest[:12]}, expected {req.image_digest[:12]})", level="supervisor",
                    entity=supervisor.entity_id))
            params = self._params(image, req)
            if reg.grant is not None and reg.grant.request_id == rid:
                # What the supervisor could not pay is borrowed from the domain, then the global pool.
                await escalate(saga, rid, reg.grant.key, req.domain, sup_name, reg.grant.borrowed, None,
                               req.priority, spawn=True)
            now = workflow.now()
            spec = AgentSpec(domain=req.domain, supervisor=sup_name, name=req.name,
                             resources=resources, image=image.ref if image is not None else req.image,
                             labels=req.labels, request_id=rid if reg.created else "", image_info=image, params=params,
                             task_retries=req.task_retries)
            target = LevelRef.agent(req.domain, req.name)
            saga.add(f"discard {target.entity_id}", lambda: steps.discard_agent(target, rid))
            state = await steps.start_agent(AgentInput(agent_state=AgentState(
                spec=spec, memory=req.memory, started_at=now, updated_at=now),
                settings=req.settings or EntitySettings()))
            if state.spec.supervisor != sup_name:
                raise to_application_error(Conflict(
                    f"agent {req.domain}/{req.name} already runs under supervisor {state.spec.supervisor}",
                    level="agent", entity=state.entity_id))
            return AgentResult(agent=reg.child, created=reg.created, supervisor=sup_name,
                               borrowed=reg.grant.borrowed if reg.grant is not None else None)

        try:
            return await guarded(saga, forward(image))
        except BaseException as e:
            reraise(e)

    async def _where(self, req: SpawnAgentRequest) -> str:
        """Tag this run, and choose the supervisor when the request names none (placement)."""
        tags = [OPERATION_KEY.value_set("SpawnAgent"), DOMAIN_KEY.value_set(req.domain)]
        if req.supervisor:
            workflow.upsert_search_attributes([*tags, SUPERVISOR_KEY.value_set(req.supervisor)])
            return req.supervisor
        workflow.upsert_search_attributes(tags)
        chosen = await self._place(req)
        workflow.upsert_search_attributes([SUPERVISOR_KEY.value_set(chosen)])
        return chosen

    @staticmethod
    async def _await_dependencies(req: SpawnAgentRequest) -> None:
        """``manageAgentDependencies``: wait (durably) until every agent this one depends on runs."""
        if req.name in req.depends_on:
            raise to_application_error(InvalidRequest(f"agent {req.name!r} cannot depend on itself",
                                                      level="supervisor"))
        deadline = workflow.now() + timedelta(seconds=req.dependency_timeout_seconds)
        pause = 0.2
        for dep in req.depends_on:
            while True:
                try:
                    if (await steps.find_agent(LevelRef.agent(req.domain, dep))).running:
                        break
                except Exception as e:
                    info = error_info(e)
                    if info is None or info.code != NotFound.code:
                        raise
                if workflow.now() >= deadline:
                    raise to_application_error(Conflict(
                        f"agent {req.domain}/{dep}, which {req.name!r} depends on, is not running after "
                        f"{req.dependency_timeout_seconds:g}s", level="supervisor", data={"dependency": dep}))
                await workflow.sleep(timedelta(seconds=pause))
                pause = min(2.0, pause * 2)

    @staticmethod
    def _params(image: AgentImage | None, req: SpawnAgentRequest) -> dict[str, Any]:
        """The agent's image parameters: the image's defaults with the request's overrides (refused if invalid)."""
        if image is None:
            if req.params:
                raise to_application_error(InvalidRequest("parameters are given but no image", level="supervisor"))
            return {}
        try:
            return resolve_parameters(image.manifest, req.params)
        except TetrarchError as e:
            raise to_application_error(e) from None

    @staticmethod
    async def _place(req: SpawnAgentRequest) -> str:
        return await place_in_domain(req.domain, req.resources or DEFAULT_AGENT_RESOURCES, req.placement,
                                     f"agent {req.name!r}")

    @staticmethod
    async def _default_resources(supervisor: LevelRef) -> Resources:
        view = await steps.describe_level(supervisor)
        return view.policy.default_agent_resources or DEFAULT_AGENT_RESOURCES


@workflow.defn(name="StopAgent", failure_exception_types=_FAIL_FAST)
class StopAgentWorkflow:
    """Stop (kill) an agent cleanly and return its slice and its counts, exactly once."""

    @staticmethod
    async def _stop_dependents(req: StopAgentRequest, rid: str) -> None:
        """Refuse while agents depend on this one, unless cascading: then stop them first."""
        dependents = [k.split("/", 1)[1] for k in (await steps.read_dependents(req.domain, req.name)).agents]
        if not dependents:
            return
        if not req.cascade:
            raise to_application_error(Conflict(
                f"agents {', '.join(dependents)} depend on {req.domain}/{req.name}; stop them first or cascade",
                level="supervisor", data={"dependents": dependents}))
        await gather_all(*(workflow.execute_child_workflow(
            StopAgentWorkflow.run, StopAgentRequest(domain=req.domain, name=d, cascade=True, request_id=f"{rid}/{d}",
                                                    reason=f"cascade: {req.name} stops"),
            id=f"{workflow.info().workflow_id}/cascade/{d}") for d in dependents))

    @workflow.run
    async def run(self, req: StopAgentRequest) -> RemovalResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("StopAgent"),
                                           DOMAIN_KEY.value_set(req.domain)])
        rid = request_id(req.request_id)
        target = LevelRef.agent(req.domain, req.name)
        found = await steps.find_agent(target)
        spec = found.state.spec
        supervisor = LevelRef.supervisor(req.domain, spec.supervisor)
        if found.running:
            await judge_everywhere(req.domain, spec.supervisor, PolicyCheck(
                operation=OperationType.KILL, domain=req.domain, supervisor=spec.supervisor, agent=req.name))
            # Runs recorded before dependencies existed went straight on (their histories replay unchanged).
            if workflow.patched("stop-agent-checks-dependents"):
                await self._stop_dependents(req, rid)
            saga = Saga()
            try:
                saga.add(f"reactivate {req.name}", lambda: steps.cancel_child_removal(supervisor, req.name, rid))
                await steps.begin_child_removal(supervisor, req.name, rid)
                await steps.stop_agent(target, StopAgent(request_id=rid, reason=req.reason))
            except BaseException as e:
                info = error_info(e)
                if info is None or info.code != NotFound.code:  # gone meanwhile: roll forward below
                    await saga.compensate()
                    reraise(e)
        else:
            # The agent's workflow ended without a clean stop (terminated, crashed): if its supervisor
            # still holds it, roll forward and release what it held; otherwise there is nothing to stop.
            held = await steps.describe_level(supervisor)
            if not any(c.name == req.name for c in held.children):
                raise to_application_error(NotFound(
                    f"agent {req.domain}/{req.name} is not running (its last run ended {found.state.status.value})",
                    level="agent", entity=target.entity_id))
            if workflow.patched("stop-marks-crashed-agent-removing"):
                # So its supervisor's failure check does not restart it while it is being released.
                await steps.begin_child_removal(supervisor, req.name, rid)
        released = await steps.unregister_child(supervisor, req.name, rid)
        await return_borrowed(rid, req.domain, released.grants)  # each borrowed part goes back where it came from
        count_out = ReleaseAgents(request_id=rid, agents=[f"{req.domain}/{req.name}"],
                                  owner=spec.request_id or None)
        await gather_all(steps.release_agents(LevelRef.orchestrator(), count_out),
                         steps.release_agents(LevelRef.manager(req.domain), count_out))
        return RemovalResult(entity_id=target.entity_id, released=released.released)
