"""Activities that reach agents: start an agent entity, stop it, read it."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.calls import query, raise_translated, update
from tetrarch.agent import AgentLookup, AgentState, StopAgent, Throttle
from tetrarch.calls import DiscardAgentCall, StartAgents, StartedAgent, StartedAgents, StopAgentCall, ThrottleCall
from tetrarch.errors import ErrorInfo
from tetrarch.models import AgentStatus, LevelRef
from tetrarch.operations import AgentInput
from workflows.agent import AgentWorkflow
from workflows.common import AGENT_STATUS_KEY, DOMAIN_KEY, LEVEL_KEY, SUPERVISOR_KEY


class AgentActivities:
    """Calls on agent entities, with an injected Temporal client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn
    async def start_agent(self, inp: AgentInput) -> AgentState:
        """Start the agent entity, or find it running (its state tells which supervisor holds it)."""
        spec = inp.agent_state.spec
        await self.client.start_workflow(
            AgentWorkflow.run, inp, id=inp.agent_state.entity_id, task_queue=activity.info().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes([
                SearchAttributePair(LEVEL_KEY, "agent"), SearchAttributePair(DOMAIN_KEY, spec.domain),
                SearchAttributePair(SUPERVISOR_KEY, spec.supervisor),
                SearchAttributePair(AGENT_STATUS_KEY, inp.agent_state.status.value)]))
        state = await query(self.client, LevelRef.agent(spec.domain, spec.name), AgentWorkflow.describe,
                            AgentState)
        if state.status in (AgentStatus.STOPPING, AgentStatus.STOPPED):
            # An earlier agent of this name is finishing its stop: wait for its run to close, then a
            # retry starts the new one (USE_EXISTING would otherwise hand back the old run).
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
