"""The agent as an entity workflow: holds its state, reports each status change to its supervisor.

Agents are top-level workflows (not children of their supervisor, whose pending-children cap is
2,000), tied to their supervisor by id and search attributes. Stopping is an Update that returns
once the agent has stopped; the workflow then completes with its final state.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import (
        AgentState,
        Checkpoint,
        StopAgent,
        SwitchImage,
        TakeCheckpoint,
        TaskInput,
        TaskResult,
        Throttle,
        UsageReport,
    )
    from tetrarch.calls import RunTask, StartOperation
    from tetrarch.errors import Conflict, InvalidRequest, TetrarchError
    from tetrarch.images import validate_intent_input
    from tetrarch.lifecycle_ops import SelfRequest, SelfRequestResult
    from tetrarch.models import AgentStatus, LevelRef, LevelSummary
    from tetrarch.names import Level, supervisor_id
    from tetrarch.operations import AgentInput
    from tetrarch.resources import Resources

from workflows.common import (
    AGENT_STATUS_KEY,
    DOMAIN_KEY,
    ENTITY_CALL_RETRY,
    LEVEL_KEY,
    SUPERVISOR_KEY,
    queues,
    to_application_error,
)
from workflows.levels import EntityLoop


async def _run_task(call: RunTask) -> TaskResult:
    """One attempt, on the agent level's workers (by name: the activity module imports this one)."""
    result: TaskResult = await workflow.execute_activity(
        "run_task", call, result_type=TaskResult, task_queue=queues().for_level(Level.AGENT),
        start_to_close_timeout=timedelta(seconds=call.task.timeout_seconds + 60), retry_policy=ENTITY_CALL_RETRY)
    return result


#: Task failures worth another attempt (a limit would only be hit again).
_RETRIED = ("error", "crashed")


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

    def _periodic_seconds(self) -> float | None:
        if not self.settings.heartbeat_seconds or not workflow.patched("agent-heartbeat"):
            return None  # runs recorded before heartbeats existed set no timer (they replay unchanged)
        return self.settings.heartbeat_seconds

    async def _periodic(self) -> None:
        """A heartbeat: report even though nothing changed, so the supervisor knows this agent is alive."""
        self._dirty = True

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

    @workflow.update
    async def execute_task(self, task: TaskInput) -> TaskResult:
        """Run a task of this agent's image (``executeTask``) in a child process under its allocation.

        A failed attempt (an error or a crash) is retried per the task, else per the agent's policy, with
        backoff; a task
        stopped by its memory or CPU limit is reported at once. Either way the agent keeps running, and
        what the task used is reported to the supervisor (which applies quotas).
        """
        image = self.state.spec.image_info
        assert image is not None  # the validator refused otherwise
        call = RunTask(target=LevelRef.agent(self.state.spec.domain, self.state.spec.name),
                       supervisor=self.state.spec.supervisor, image=image, task=task, params=self.state.spec.params,
                       memory=self.state.memory)
        attempt = 0
        while True:
            attempt += 1
            result = await _run_task(call.model_copy(update={"memory": self.state.memory}))
            retries = task.retries if task.retries is not None else self.state.spec.task_retries
            if result.ok or result.reason not in _RETRIED or attempt > retries:
                break
            await workflow.sleep(timedelta(seconds=min(30.0, 0.5 * 2 ** (attempt - 1))))
        result.attempts = attempt
        self._record(result)
        return result

    @execute_task.validator
    def _validate_execute_task(self, task: TaskInput) -> None:
        """Refused before anything runs: a stopped agent, an agent without an image, an unknown intent,
        an input that does not match the intent's schema (the schema's own error is given)."""
        if self.state.status is not AgentStatus.RUNNING:
            raise to_application_error(Conflict(
                f"{self.state.entity_id} is {self.state.status.value}; it runs no tasks",
                level="agent", entity=self.state.entity_id))
        image = self.state.spec.image_info
        if image is None:
            raise to_application_error(InvalidRequest(f"{self.state.entity_id} runs no image; it has no tasks to run",
                                                      level="agent", entity=self.state.entity_id))
        try:
            validate_intent_input(image.manifest, task.intent, task.input)
        except TetrarchError as e:
            e.entity = self.state.entity_id
            raise to_application_error(e) from None

    def _record(self, result: TaskResult) -> None:
        """Count the task, keep the state it left, and report what it used.

        CPU is reported as cores over the task's time window (its timeout): the allocation is a rate, and
        the kernel held the task to cores x window of CPU time. (Cores over the few milliseconds a short
        task runs would read as a whole core for any task, and flag every agent allocated less.)
        """
        st = self.state
        if result.ok:
            st.tasks_completed += 1
            if result.memory is not None:
                st.memory = result.memory
        else:
            st.tasks_failed += 1
        window = result.limits.get("wall_seconds") or result.wall_seconds
        cores = result.cpu_seconds / window if window > 0 else 0.0
        st.used = Resources(cpu_millis=round(cores * 1000), memory_mib=math.ceil(result.max_rss_mib))
        st.last_task = result
        st.updated_at = workflow.now()
        self._touch()

    @workflow.update
    def checkpoint(self, req: TakeCheckpoint) -> Checkpoint:
        """A checkpoint of this agent as it is now (its image, parameters, working state)."""
        cp = self.state.take_checkpoint(req, workflow.now())
        self._touch()
        return cp

    @workflow.update
    def switch_image(self, req: SwitchImage) -> AgentState:
        """Run another verified image from now on (an upgrade, or a narrower view of the same image)."""
        self.state.switch_image(req, workflow.now())
        self._touch()
        return self.state

    @switch_image.validator
    def _validate_switch_image(self, req: SwitchImage) -> None:
        if self.state.status is not AgentStatus.RUNNING:
            raise to_application_error(Conflict(
                f"{self.state.entity_id} is {self.state.status.value}; its image cannot change",
                level="agent", entity=self.state.entity_id))

    @workflow.update
    async def request_operation(self, req: SelfRequest) -> SelfRequestResult:
        """``requestLifecycleOperation``: this agent asks its supervisor to checkpoint, clone, split or stop
        it. The operation runs as its own workflow, judged by the policies like any other."""
        d, me = self.state.spec.domain, self.state.spec.name
        rid = req.request_id or str(workflow.uuid4())[:12]
        ops: dict[str, tuple[str, str, dict[str, Any]]] = {
            "checkpoint": ("CheckpointAgent", me, {"domain": d, "name": me, "label": req.reason}),
            "clone": ("CloneAgent", req.name or "", {"domain": d, "source": me, "name": req.name}),
            "split": ("SplitAgent", me, {"domain": d, "name": me, "parts": req.parts}),
            "stop": ("StopAgent", me, {"domain": d, "name": me, "reason": req.reason or "asked by itself"}),
        }
        kind, target, body = ops[req.operation]
        wf_id = f"op/{req.operation}/{d}/{target}/{rid}"
        await workflow.execute_activity(
            "start_operation", StartOperation(workflow=kind, input={**body, "request_id": rid}, workflow_id=wf_id),
            result_type=str, task_queue=queues().for_level(Level.SUPERVISOR),
            start_to_close_timeout=timedelta(seconds=30), retry_policy=ENTITY_CALL_RETRY)
        return SelfRequestResult(operation=req.operation, workflow_id=wf_id)

    @request_operation.validator
    def _validate_request_operation(self, req: SelfRequest) -> None:
        problem = None
        if self.state.status is not AgentStatus.RUNNING:
            problem = f"{self.state.entity_id} is {self.state.status.value}"
        elif req.operation == "clone" and not req.name:
            problem = "a clone needs the new agent's name"
        elif req.operation == "split" and (req.parts is None or req.parts < 2):
            problem = f"a split needs at least 2 parts, not {req.parts}"
        if problem:
            raise to_application_error(InvalidRequest(problem, level="agent", entity=self.state.entity_id))

    @workflow.query
    def describe(self) -> AgentState:
        """The agent's whole state."""
        return self.state
