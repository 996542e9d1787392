"""Activities that reach agents: start an agent entity, stop it, read it."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy

from activities.calls import query, update
from tetrarch.agent import AgentState
from tetrarch.calls import StopAgentCall
from tetrarch.models import LevelRef
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
        return await query(self.client, LevelRef.agent(spec.domain, spec.name), AgentWorkflow.describe,
                           AgentState)

    @activity.defn
    async def describe_agent(self, target: LevelRef) -> AgentState:
        """The agent's state (NotFound if it is not running)."""
        return await query(self.client, target, AgentWorkflow.describe, AgentState)

    @activity.defn
    async def stop_agent(self, call: StopAgentCall) -> AgentState:
        """Stop the agent cleanly; returns its final state."""
        return await update(self.client, call.target, AgentWorkflow.stop, call.request, AgentState,
                            call.request.request_id)
