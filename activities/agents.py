"""Activities that reach agents: start an agent entity, stop it, read it."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities.calls import domain_error, query, queue_of, raise_translated, uninterrupted, update
from runtime.sandbox import TaskLimits, TaskRequest, run_task
from tetrarch.agent import AgentLookup, AgentState, Checkpoint, StopAgent, TaskResult, Throttle
from tetrarch.calls import (
    CheckpointCall,
    CrashedAgent,
    DiscardAgentCall,
    Liveness,
    LivenessQuery,
    RestartAgentCall,
    RunTask,
    StartAgents,
    StartedAgent,
    StartedAgents,
    StateHook,
    StopAgentCall,
    SwitchImageCall,
    ThrottleCall,
)
from tetrarch.errors import ErrorInfo, InvalidRequest, NotFound, TetrarchError
from tetrarch.images import ImageTampered, open_verified
from tetrarch.level import ChildLookup, ChildRef
from tetrarch.models import AgentStatus, LevelRef
from tetrarch.names import Level, agent_id
from tetrarch.operations import AgentInput, EntitySettings
from tetrarch.tasks import task_limits
from workflows.agent import AgentWorkflow
from workflows.common import AGENT_STATUS_KEY, DOMAIN_KEY, LEVEL_KEY, SUPERVISOR_KEY
from workflows.levels import ManagementEntity


class AgentActivities:
    """Calls on agent entities, with an injected Temporal client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn
    async def start_agent(self, inp: AgentInput) -> AgentState:
        """Start the agent entity, or find it running (its state tells which supervisor holds it).

        A new run is not waited for: it starts from ``inp``'s state and reports itself running from its
        first task. Waiting for that task (a Query) cost a workflow task's round trip on every spawn.
        """
        spec = inp.agent_state.spec
        try:
            await uninterrupted(self.client.start_workflow(
                AgentWorkflow.run, inp, id=inp.agent_state.entity_id, task_queue=queue_of(Level.AGENT),
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=TypedSearchAttributes([
                    SearchAttributePair(LEVEL_KEY, "agent"), SearchAttributePair(DOMAIN_KEY, spec.domain),
                    SearchAttributePair(SUPERVISOR_KEY, spec.supervisor),
                    SearchAttributePair(AGENT_STATUS_KEY, inp.agent_state.status.value)])))
            return inp.agent_state
        except WorkflowAlreadyStartedError:
            pass  # running already: a retried start, or an agent of this name (its state says whose)
        state = await query(self.client, LevelRef.agent(spec.domain, spec.name), AgentWorkflow.describe,
                            AgentState)
        if state.status in (AgentStatus.STOPPING, AgentStatus.STOPPED):
            # An earlier agent of this name is finishing its stop: wait for its run to close, then a
            # retry starts the new one.
            raise ApplicationError(f"{state.entity_id} is still stopping; retrying", type="AgentStopping")
        return state

    @activity.defn
    async def start_agents(self, call: StartAgents) -> StartedAgents:
        """Start (or find) many agent entities at once: one activity for a whole batch."""

        async def one(inp: AgentInput) -> StartedAgent:
            try:
                return StartedAgent(name=inp.agent_state.spec.name, state=await self.start_agent(inp))
            except ApplicationError as e:
                if e.type == "AgentStopping":  # retryable: the whole activity retries (starts are idempotent)
                    raise
                detail = e.details[0] if e.details else None
                info = detail if isinstance(detail, ErrorInfo) else ErrorInfo(
                    code=e.type or "Error", level="agent", entity=inp.agent_state.entity_id, message=e.message)
                return StartedAgent(name=inp.agent_state.spec.name, error=info)

        return StartedAgents(agents=list(await asyncio.gather(*(one(i) for i in call.inputs))))

    @activity.defn
    async def run_task(self, call: RunTask) -> TaskResult:
        """One attempt of a task: re-verify the agent's image (same digest, same signer), read the agent's
        live allocation from its supervisor, and run the entrypoint in a child process under it."""
        img = call.image
        sup = LevelRef.supervisor(call.target.domain or "", call.supervisor)
        found = await query(self.client, sup, ManagementEntity.child, ChildLookup,
                            arg=ChildRef(name=call.target.name or ""))
        if found.child is None:
            raise domain_error(NotFound(f"supervisor {sup.domain}/{call.supervisor} no longer holds this agent",
                                        level="supervisor", entity=sup.entity_id))
        limits = task_limits(found.child.resources, call.task.timeout_seconds)
        try:
            with open_verified(img.path, frozenset({img.signer})) as verified:
                if verified.digest != img.digest:
                    raise ImageTampered(f"image {img.ref} at {img.path} changed since the agent was spawned "
                                        f"(digest {verified.digest[:12]}, expected {img.digest[:12]})",
                                        level="agent", entity=call.target.entity_id)
                outcome = await run_task(TaskRequest(
                    image_root=str(verified.path), entrypoint=verified.manifest.entrypoint, intent=call.task.intent,
                    input=call.task.input, params=call.params, state=call.memory, limits=limits, probe=call.probe))
        except TetrarchError as e:
            raise domain_error(e) from None
        return TaskResult(request_id=call.task.request_id, intent=call.task.intent, ok=outcome.ok,
                          reason=outcome.reason, output=outcome.output, error=outcome.error,
                          memory=outcome.state, cpu_seconds=outcome.usage.cpu_seconds,
                          max_rss_mib=outcome.usage.max_rss_mib, wall_seconds=outcome.usage.wall_seconds,
                          limits={"memory_mib": limits.memory_mib, "cpu_seconds": limits.cpu_seconds,
                                  "wall_seconds": limits.wall_seconds})

    @activity.defn
    async def checkpoint_agent(self, call: CheckpointCall) -> Checkpoint:
        """A checkpoint of a running agent."""
        return await update(self.client, call.target, AgentWorkflow.checkpoint, call.request, Checkpoint,
                            call.request.request_id)

    @activity.defn
    async def switch_agent_image(self, call: SwitchImageCall) -> AgentState:
        """Switch a running agent to another verified image."""
        return await update(self.client, call.target, AgentWorkflow.switch_image, call.request, AgentState,
                            call.request.request_id)

    @activity.defn
    async def agent_liveness(self, call: LivenessQuery) -> Liveness:
        """The agents whose workflow is no longer running: the running ones are listed in one visibility
        query, and each one missing from it is confirmed by describing its workflow (visibility lags)."""
        query_text = (f"WorkflowType='Agent' AND Domain='{call.domain}' AND Supervisor='{call.supervisor}' "
                      "AND ExecutionStatus='Running'")
        running = {wf.id async for wf in self.client.list_workflows(query_text)}
        suspects = [n for n in call.agents if agent_id(call.domain, n) not in running]

        async def status(name: str) -> CrashedAgent | None:
            try:
                desc = await self.client.get_workflow_handle(agent_id(call.domain, name)).describe()
            except RPCError:
                return None  # never started: the spawn that registered it is still running
            st = desc.status.name if desc.status is not None else "UNKNOWN"
            return None if st == "RUNNING" else CrashedAgent(name=name, status=st)

        found = list(await asyncio.gather(*(status(n) for n in suspects)))
        crashed = {c.name for c in found if c is not None}
        hung = [CrashedAgent(name=n, status="SILENT") for n in call.silent if n not in crashed]
        return Liveness(crashed=[c for c in found if c is not None] + hung)

    @activity.defn
    async def restart_agent(self, call: RestartAgentCall) -> AgentState:
        """Start a crashed agent again from its last checkpoint (its last state if it has none); a silent
        one still running (hung: its run makes no progress) is terminated first."""
        target = call.target
        handle = self.client.get_workflow_handle(target.entity_id)
        desc = await handle.describe()
        running = desc.status is not None and desc.status.name == "RUNNING"
        if running and not call.silent:
            return (await self.find_agent(target)).state  # restarted meanwhile
        if running:
            await handle.terminate("silent: restarted by its supervisor")
        last, settings = await self._last_state(target, desc.run_id, queryable=not call.silent)
        memory = last.checkpoints[-1].memory if last.checkpoints else last.memory
        now = datetime.now(UTC)
        fresh = last.model_copy(update={"status": AgentStatus.STARTING, "status_reason": "restarted after a crash",
                                        "memory": memory, "started_at": now, "updated_at": now,
                                        "report_seq": max(last.report_seq, call.report_seq)})
        return await self.start_agent(AgentInput(agent_state=fresh, settings=settings))

    @activity.defn
    async def run_state_hook(self, call: StateHook) -> Any:
        """Run the image's merge or split hook in a child process (the task runtime, small fixed limits)
        on the verified code, and return its output: the merged state, or the list of parts' states."""
        img = call.image
        try:
            with open_verified(img.path, frozenset({img.signer})) as verified:
                if verified.digest != img.digest:
                    raise ImageTampered(f"image {img.ref} at {img.path} changed since the agents were spawned",
                                        level="supervisor")
                outcome = await run_task(TaskRequest(
                    image_root=str(verified.path), entrypoint=call.hook, intent=call.kind, input=call.input,
                    limits=TaskLimits(memory_mib=256, cpu_seconds=5, wall_seconds=10)))
        except TetrarchError as e:
            raise domain_error(e) from None
        if not outcome.ok:
            raise domain_error(InvalidRequest(f"the {call.kind} hook {call.hook} of {img.ref} failed "
                                              f"({outcome.reason}): {outcome.error}", level="supervisor"))
        return outcome.output

    async def _last_state(self, target: LevelRef, run_id: str | None,
                          queryable: bool) -> tuple[AgentState, EntitySettings]:
        """The agent's last state and its entity settings. The state is asked of its ended run when a worker
        can answer, else it is the state the run started from (the last one durably recorded: a hung
        agent's worker answers nothing); the settings are the run's own."""
        history = await self.client.get_workflow_handle(target.entity_id, run_id=run_id).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        inp = (await self.client.data_converter.decode(started.input.payloads, [AgentInput]))[0]
        assert isinstance(inp, AgentInput)
        if queryable:
            with contextlib.suppress(Exception):
                return (await asyncio.wait_for(self.find_agent(target), timeout=5)).state, inp.settings
        return inp.agent_state, inp.settings

    @activity.defn
    async def discard_agent(self, call: DiscardAgentCall) -> AgentLookup | None:
        """Stop the agent if the request ``call.owner`` started it and it still runs (else do nothing)."""
        try:
            found = await self.find_agent(call.target)
        except ApplicationError as e:
            if e.type == "NotFound":
                return None
            raise
        if found.running and found.state.spec.request_id == call.owner:
            state = await self.stop_agent(StopAgentCall(target=call.target, request=StopAgent(
                request_id=f"{call.owner}/discard", reason="spawn undone")))
            return AgentLookup(state=state, running=False)
        return found

    @activity.defn
    async def find_agent(self, target: LevelRef) -> AgentLookup:
        """The agent's last state, running or closed (NotFound only if no workflow of that id ever ran)."""
        handle: WorkflowHandle[Any, Any] = self.client.get_workflow_handle(target.entity_id)
        try:
            desc = await handle.describe()
            state: AgentState = await handle.query(AgentWorkflow.describe)
        except (RPCError, WorkflowQueryFailedError) as e:
            raise_translated(e, target)
        running = desc.status is not None and desc.status.name == "RUNNING"
        return AgentLookup(state=state, running=running)

    @activity.defn
    async def stop_agent(self, call: StopAgentCall) -> AgentState:
        """Stop the agent cleanly; returns its final state (also when a retry finds it already stopped)."""
        try:
            return await update(self.client, call.target, AgentWorkflow.stop, call.request, AgentState,
                                call.request.request_id)
        except ApplicationError as e:
            if e.type != "NotFound":
                raise
            handle = self.client.get_workflow_handle(call.target.entity_id, result_type=AgentState)
            try:  # an earlier attempt stopped it and the run completed: its result is the final state
                result: AgentState = await handle.result(follow_runs=False)
            except Exception:
                raise e from None
            return result

    @activity.defn
    async def throttle_agent(self, call: ThrottleCall) -> AgentState:
        """Tell an agent it is throttled (quota enforcement)."""
        return await update(self.client, call.target, AgentWorkflow.throttle,
                            Throttle(throttled=call.throttled, reason=call.reason), AgentState)
