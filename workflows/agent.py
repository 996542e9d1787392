"""The agent as an entity workflow: holds its state, reports each status change to its supervisor.

Agents are top-level workflows (not children of their supervisor, whose pending-children cap is
2,000), tied to their supervisor by id and search attributes. Stopping is an Update that returns
once the agent has stopped; the workflow then completes with its final state.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import AgentState, StopAgent, Throttle, UsageReport
    from tetrarch.errors import TetrarchError
    from tetrarch.models import AgentStatus, LevelSummary
    from tetrarch.names import supervisor_id
    from tetrarch.operations import AgentInput

from workflows.common import AGENT_STATUS_KEY, DOMAIN_KEY, LEVEL_KEY, SUPERVISOR_KEY, to_application_error
from workflows.levels import EntityLoop


@workflow.defn(name="Agent", failure_exception_types=[pydantic.ValidationError])
class AgentWorkflow(EntityLoop):
    """One agent: its spec, status and counters; stop it with the ``stop`` Update."""

    @workflow.init
    def __init__(self, inp: AgentInput) -> None:
        self.state = inp.agent_state
        self._init_loop(inp.settings)
        self._tagged_status: AgentStatus | None = None

    def _parent_id(self) -> str | None:
        return supervisor_id(self.state.spec.domain, self.state.spec.supervisor)

    def _next_summary(self) -> LevelSummary:
        self.state.report_seq += 1
        return self.state.summary(workflow.now())

    def _continue_as_new_input(self) -> AgentInput:
        self.state.continued_as_new += 1
        return AgentInput(agent_state=self.state, settings=self.settings)

    def _tag(self) -> None:
        """Keep the AgentStatus search attribute in step with the state."""
        if self._tagged_status is self.state.status:
            return
        updates = [AGENT_STATUS_KEY.value_set(self.state.status.value)]
        if self._tagged_status is None:
            updates += [LEVEL_KEY.value_set("agent"), DOMAIN_KEY.value_set(self.state.spec.domain),
                        SUPERVISOR_KEY.value_set(self.state.spec.supervisor)]
        workflow.upsert_search_attributes(updates)
        self._tagged_status = self.state.status

    @workflow.run
    async def run(self, inp: AgentInput) -> AgentState:
        self.state.mark_running(workflow.now())
        self._tag()
        await self._loop()
        self._tag()
        await self._report()  # the final status reaches the supervisor
        return self.state

    @workflow.update
    def stop(self, req: StopAgent) -> AgentState:
        """Stop cleanly; returns the final state once stopped."""
        try:
            self.state.request_stop(req, workflow.now())
        except TetrarchError as e:
            raise to_application_error(e) from None
        self._touch()
        if self.state.status is AgentStatus.STOPPING:
            self.state.finish_stop(workflow.now())
        self._tag()
        self._closing = True
        return self.state

    @stop.validator
    def _validate_stop(self, req: StopAgent) -> None:
        try:
            self.state.model_copy(deep=True).request_stop(req, workflow.now())
        except TetrarchError as e:
            raise to_application_error(e) from None

    @workflow.update
    def report_usage(self, report: UsageReport) -> AgentState:
        """Record what the runtime measured; the supervisor hears it in the next report."""
        self.state.used = report.used
        self.state.updated_at = workflow.now()
        self._touch()
        return self.state

    @workflow.update
    def throttle(self, req: Throttle) -> AgentState:
        """The supervisor holds this agent back (quota enforcement) or lets it go again."""
        self.state.throttled = req.throttled
        if req.reason:
            self.state.status_reason = req.reason
        self.state.updated_at = workflow.now()
        self._touch()
        return self.state

    @workflow.query
    def describe(self) -> AgentState:
        """The agent's whole state."""
        return self.state
