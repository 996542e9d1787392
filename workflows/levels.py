"""The management levels as entity workflows: Orchestrator, Manager and Supervisor.

All three show one face (the seed's standardized ``ManagementLevel``): the same Updates to admit,
resize, remove and report children, the same Queries, the same upward report. Each subclass only
names its parent. State lives in one :class:`LevelState` model and changes only through the pure
methods behind validated Updates; the run loop reports upward (debounced), continues as new before
the history grows large, and returns when the level is closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.calls import Liveness, LivenessQuery, RestartAgentCall, StartQuotaWatch, ThrottleCall
    from tetrarch.decisions import ChainLink, DecisionCache, PolicyCheck, Verdict
    from tetrarch.errors import TetrarchError
    from tetrarch.level import (
        AdmitAgents,
        AdmitResult,
        AgentFailure,
        AgentList,
        BeginRemoval,
        ChildLookup,
        ChildRef,
        ConfigureLevel,
        GrantLookup,
        LevelState,
        QuotaMark,
        Reclaiming,
        ReconfigureChild,
        ReconfigureResult,
        RecordRestart,
        RegisterChild,
        RegisterChildren,
        RegisterChildrenResult,
        RegisterResult,
        ReleaseAgents,
        ReleasedGrants,
        ReleaseGrants,
        RemovalPlan,
        Reserve,
        ReserveResult,
        SetPolicy,
        TransferCapacity,
        UnregisterResult,
    )
    from tetrarch.models import ChildStatus, ChildView, LevelRef, LevelSummary, LevelView, PoolView
    from tetrarch.names import ORCHESTRATOR_ID, Level, manager_id
    from tetrarch.operations import EntitySettings, LevelInput
    from tetrarch.policy import Policy
    from tetrarch.pools import LedgerSnapshot
    from tetrarch.resource_ops import QuotaWatch

from workflows.common import DOMAIN_KEY, LEVEL_KEY, SUPERVISOR_KEY, queues, to_application_error

T = TypeVar("T")

_CALL = timedelta(seconds=30)
_FEW = RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=5))


class EntityLoop:
    """Run-loop mechanics shared by every entity workflow (management levels and agents).

    An entity marks itself dirty when its state changes; the loop sends at most one report to the
    parent per ``report_interval_seconds``, continues as new (carrying its whole state) once the run
    has handled ``continue_as_new_after`` Updates and signals or the server suggests it, and returns
    when closed, always after its handlers have finished.
    """

    settings: EntitySettings

    def _init_loop(self, settings: EntitySettings) -> None:
        self.settings = settings
        self._dirty = True
        self._closing = False
        self._run_updates = 0

    def _touch(self) -> None:
        """Count a handled Update or signal and schedule an upward report."""
        self._run_updates += 1
        self._dirty = True

    def _should_continue_as_new(self) -> bool:
        return (self._run_updates >= self.settings.continue_as_new_after
                or workflow.info().is_continue_as_new_suggested())

    def _parent_id(self) -> str | None:
        """Workflow id of the parent entity to report to, or None at the top."""
        raise NotImplementedError

    def _next_summary(self) -> LevelSummary:
        """Build the next upward report (bumping the report sequence)."""
        raise NotImplementedError

    def _continue_as_new_input(self) -> Any:
        """The input of the next run: the whole state, counters bumped."""
        raise NotImplementedError

    def _has_work(self) -> bool:
        """True when the entity has something to start itself (a supervisor's quota watches)."""
        return False

    def _periodic_seconds(self) -> float | None:
        """How long the loop may sleep before :meth:`_periodic` is due (None: nothing periodic)."""
        return None

    async def _periodic(self) -> None:
        """Periodic work (a supervisor looking for crashed agents)."""

    async def _work(self) -> None:
        """Start what :meth:`_has_work` found."""

    async def _report(self) -> None:
        """Send one upward report; a parent that is gone (being removed) is not an error."""
        self._dirty = False
        parent = self._parent_id()
        if parent is None:
            return
        summary = self._next_summary()
        try:
            await workflow.get_external_workflow_handle(parent).signal(ManagementEntity.child_report, summary)
        except Exception as e:  # the parent may have closed meanwhile; reports are advisory
            workflow.logger.warning("report to %s failed: %s", parent, e)

    async def _loop(self) -> None:
        """Report, continue as new, or return when closing; never finish with handlers running."""
        while True:
            period = self._periodic_seconds()
            try:
                await workflow.wait_condition(
                    lambda: self._dirty or self._closing or self._should_continue_as_new() or self._has_work(),
                    timeout=timedelta(seconds=period) if period else None)
            except TimeoutError:
                await self._periodic()
                continue
            if self._has_work() and not self._closing:
                await self._work()
            if self._dirty and not self._closing:
                await self._report()
                if self.settings.report_interval_seconds > 0:
                    with contextlib.suppress(TimeoutError):
                        await workflow.wait_condition(
                            lambda: self._closing or self._should_continue_as_new(),
                            timeout=timedelta(seconds=self.settings.report_interval_seconds))
            if self._closing:
                await workflow.wait_condition(workflow.all_handlers_finished)
                return
            if self._should_continue_as_new():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if self._dirty:
                    await self._report()
                workflow.continue_as_new(self._continue_as_new_input())


class ManagementEntity(EntityLoop):
    """Handlers shared by the three management levels. Subclasses add ``@workflow.run``."""

    @workflow.init
    def __init__(self, inp: LevelInput) -> None:
        self.state = inp.level_state
        self._init_loop(inp.settings)
        # Decisions of this level's own policy; workflow time keeps the TTL deterministic on replay.
        self._cache = DecisionCache(clock=workflow.time, ttl_seconds=inp.settings.policy_cache_ttl_seconds)

    # -- helpers ------------------------------------------------------------------------------------

    def _dry_run(self, change: Callable[[LevelState], Any]) -> None:
        """Run a change on a copy so a validator refuses exactly what the handler would refuse."""
        try:
            change(self.state.model_copy(deep=True))
        except TetrarchError as e:
            raise to_application_error(e) from None

    def _try(self, change: Callable[[LevelState], Any]) -> None:
        """:meth:`_dry_run` for admissions, on :meth:`LevelState.trial` (no deep copy)."""
        try:
            change(self.state.trial())
        except TetrarchError as e:
            raise to_application_error(e) from None

    def _apply(self, change: Callable[[LevelState], T]) -> T:
        try:
            result = change(self.state)
        except TetrarchError as e:  # raced past its validator: still refuse cleanly
            raise to_application_error(e) from None
        self._touch()
        return result

    def _parent_id(self) -> str | None:
        if self.state.level is Level.ORCHESTRATOR:
            return None
        if self.state.level is Level.MANAGER:
            return ORCHESTRATOR_ID
        assert self.state.domain is not None
        return manager_id(self.state.domain)

    def _next_summary(self) -> LevelSummary:
        self.state.report_seq += 1
        return self.state.summary(workflow.now())

    def _continue_as_new_input(self) -> LevelInput:
        self.state.continued_as_new += 1
        return LevelInput(level_state=self.state, settings=self.settings)

    def _has_work(self) -> bool:
        # Cheap: only a usage report can start an overuse, so the children are scanned only after one.
        return self._usage_reported

    def _init_loop(self, settings: EntitySettings) -> None:
        super()._init_loop(settings)
        # A continued run scans once: an overuse may have been recorded without its watch started.
        self._usage_reported = self.state.level is Level.SUPERVISOR and (
            bool(self.state.watches_due()) or any(c.lift_throttle for c in self.state.children.values()))

    async def _work(self) -> None:
        """Start one EnforceAgentQuotas run per new overuse of an agent (it waits out the grace and acts)."""
        assert self.state.domain is not None
        self._usage_reported = False
        for name, since in self.state.watches_due():
            self.state.mark_watched(name, since)  # first: a failed start is logged, not retried in a loop
            watch = QuotaWatch(domain=self.state.domain, supervisor=self.state.name, agent=name, since=since)
            try:
                await workflow.execute_activity(
                    "start_quota_watch", StartQuotaWatch(watch=watch), task_queue=workflow.info().task_queue,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=5)))
            except Exception as e:
                workflow.logger.error("could not start quota enforcement for %s: %s", name, e)
        for name in self.state.throttles_to_lift():
            try:
                await workflow.execute_activity(
                    "throttle_agent", ThrottleCall(target=LevelRef.agent(self.state.domain, name), throttled=False,
                                                   reason="back within its allocation"),
                    task_queue=queues().for_level(Level.AGENT), start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=5)))
            except Exception as e:
                workflow.logger.error("could not lift the throttle of %s: %s", name, e)

    def _periodic_seconds(self) -> float | None:
        if self.state.level is not Level.SUPERVISOR or not self.settings.failure_check_seconds:
            return None
        if not workflow.patched("supervisor-failure-check"):
            return None  # supervisor runs recorded before failure checks set no timer (they replay unchanged)
        watched = any(c.status is ChildStatus.ACTIVE and c.failed is None for c in self.state.children.values())
        return self.settings.failure_check_seconds if watched else None

    async def _periodic(self) -> None:
        """``detectAgentFailure``: find agents whose workflow ended without a clean stop, and restart each
        from its last checkpoint, at most ``intensity`` times per period with backoff; past that, give up
        on it and report it to the manager (OTP-style)."""
        assert self.state.domain is not None
        names = sorted(n for n, c in self.state.children.items()
                       if c.status is ChildStatus.ACTIVE and c.failed is None)
        silent = self.state.silent_agents(workflow.now(), self.settings.silence_seconds)
        try:
            found: Liveness = await workflow.execute_activity(
                "agent_liveness", LivenessQuery(domain=self.state.domain, supervisor=self.state.name, agents=names,
                                                silent=silent),
                result_type=Liveness, task_queue=queues().for_level(Level.AGENT), start_to_close_timeout=_CALL,
                retry_policy=_FEW)
        except Exception as e:
            workflow.logger.warning("could not check the agents' liveness: %s", e)
            return
        for crash in found.crashed:
            if crash.name not in self.state.children:
                continue  # stopped and forgotten meanwhile
            decision = self.state.record_restart(RecordRestart(agent=crash.name, reason=crash.status),
                                                 workflow.now())
            self._touch()
            try:
                if decision.allowed:
                    if decision.backoff_seconds:
                        await workflow.sleep(timedelta(seconds=decision.backoff_seconds))
                    child = self.state.children.get(crash.name)
                    if child is None or child.status is not ChildStatus.ACTIVE:
                        continue  # stopped meanwhile: nothing to restart
                    seen = child.last_report.seq if child.last_report is not None else 0
                    await workflow.execute_activity(
                        "restart_agent", RestartAgentCall(target=LevelRef.agent(self.state.domain, crash.name),
                                                          silent=crash.status == "SILENT", report_seq=seen),
                        task_queue=queues().for_level(Level.AGENT), start_to_close_timeout=_CALL, retry_policy=_FEW)
                else:
                    await workflow.execute_activity(
                        "record_agent_failure", AgentFailure(
                            agent=f"{self.state.domain}/{crash.name}", supervisor=self.state.name,
                            reason=decision.reason, request_id=f"{self.state.entity_id}/failed/{crash.name}"),
                        task_queue=queues().for_level(Level.MANAGER), start_to_close_timeout=_CALL, retry_policy=_FEW)
            except Exception as e:
                workflow.logger.error("could not recover agent %s: %s", crash.name, e)

    @workflow.update
    def record_agent_failure(self, req: AgentFailure) -> LevelView:
        """A supervisor gave up on an agent: record and report it (managers)."""
        return self._apply(lambda s: s.record_agent_failure(req, workflow.now()))

    def _tag(self) -> None:
        """Tag this entity with its level, domain and supervisor for the UI and list queries."""
        updates = [LEVEL_KEY.value_set(self.state.level.value)]
        if self.state.domain is not None:
            updates.append(DOMAIN_KEY.value_set(self.state.domain))
        if self.state.level is Level.SUPERVISOR:
            updates.append(SUPERVISOR_KEY.value_set(self.state.name))
        workflow.upsert_search_attributes(updates)

    async def _run(self) -> LevelView:
        self._tag()
        await self._loop()
        return self.state.view(workflow.now(), self._run_updates)

    # -- children -----------------------------------------------------------------------------------

    @workflow.update
    def register_child(self, req: RegisterChild) -> RegisterResult:
        """Admit a child with a slice of this level's pool (idempotent on an identical definition)."""
        return self._apply(lambda s: s.register_child(req, workflow.now(), self._cache))

    @register_child.validator
    def _validate_register_child(self, req: RegisterChild) -> None:
        self._try(lambda s: s.register_child(req, workflow.now()))

    @workflow.update
    def register_children(self, req: RegisterChildren) -> RegisterChildrenResult:
        """Admit a batch of agents in one step (all or none, or each on its own)."""
        return self._apply(lambda s: s.register_children(req, workflow.now(), self._cache))

    @register_children.validator
    def _validate_register_children(self, req: RegisterChildren) -> None:
        if req.all_or_nothing:
            self._try(lambda s: s.register_children(req, workflow.now()))

    @workflow.update
    def reconfigure_child(self, req: ReconfigureChild) -> ReconfigureResult:
        """Resize a child's slice or replace its policy."""
        return self._apply(lambda s: s.reconfigure_child(req, workflow.now()))

    @reconfigure_child.validator
    def _validate_reconfigure_child(self, req: ReconfigureChild) -> None:
        self._dry_run(lambda s: s.reconfigure_child(req, workflow.now()))

    @workflow.update
    def begin_child_removal(self, ref: ChildRef) -> ChildView:
        """Mark a child as being removed so nothing new is routed to it."""
        return self._apply(lambda s: s.begin_child_removal(ref, workflow.now()))

    @begin_child_removal.validator
    def _validate_begin_child_removal(self, ref: ChildRef) -> None:
        self._dry_run(lambda s: s.begin_child_removal(ref, workflow.now()))

    @workflow.update
    def cancel_child_removal(self, ref: ChildRef) -> ChildLookup:
        """Compensation: the child is active again."""
        return self._apply(lambda s: s.cancel_child_removal(ref, workflow.now()))

    @workflow.update
    def unregister_child(self, ref: ChildRef) -> UnregisterResult:
        """Forget a child and return its slice to the pool (idempotent)."""
        return self._apply(lambda s: s.unregister_child(ref, workflow.now()))

    @workflow.signal
    def child_report(self, report: LevelSummary) -> None:
        """An upward report from a child."""
        if self.state.apply_report(report):
            self._touch()
            if report.used is not None and self.state.level is Level.SUPERVISOR:
                self._usage_reported = True
        else:
            self._run_updates += 1

    # -- policy -------------------------------------------------------------------------------------

    @workflow.update
    def admit_agents(self, req: AdmitAgents) -> AdmitResult:
        """Judge an operation that adds agents by this level's policy and count them in."""
        return self._apply(lambda s: s.admit_agents(req, workflow.now(), self._cache))

    @admit_agents.validator
    def _validate_admit_agents(self, req: AdmitAgents) -> None:
        self._try(lambda s: s.admit_agents(req, workflow.now()))

    @workflow.update
    def release_agents(self, req: ReleaseAgents) -> AdmitResult:
        """Count agents out (stop, or compensation)."""
        return self._apply(lambda s: s.release_agents(req, workflow.now()))

    @workflow.update
    def set_policy(self, req: SetPolicy) -> Policy:
        """Replace this level's policy (validated against the levels above by the SetPolicy operation)."""
        return self._apply(lambda s: s.set_policy(req, workflow.now()))

    @set_policy.validator
    def _validate_set_policy(self, req: SetPolicy) -> None:
        self._dry_run(lambda s: s.set_policy(req, workflow.now()))

    @workflow.query
    def judge(self, check: PolicyCheck) -> Verdict:
        """This level's verdict on an operation, without doing it (what-if).

        Served from the decision cache like any other decision. The cache lives in this run's memory
        only: a decision is the same cached or not, so only the hit counters depend on query traffic.
        """
        return self.state.judge(check, self._cache)

    # -- resources ----------------------------------------------------------------------------------

    @workflow.update
    def reserve(self, req: Reserve) -> ReserveResult:
        """Take this level's share of an allocation; what it cannot pay is left for its parent."""
        return self._apply(lambda s: s.reserve(req, workflow.now(), self._cache))

    @reserve.validator
    def _validate_reserve(self, req: Reserve) -> None:
        self._try(lambda s: s.reserve(req, workflow.now()))

    @workflow.update
    def release_grants(self, req: ReleaseGrants) -> ReleasedGrants:
        """Return allocations to this level's pool (exactly once)."""
        return self._apply(lambda s: s.release(req, workflow.now()))

    @workflow.update
    def set_reclaiming(self, req: Reclaiming) -> PoolView:
        """Begin or end wanting lent capacity back (lending nothing new meanwhile)."""
        self._apply(lambda s: s.set_reclaiming(req, workflow.now()))
        return self.state.pool_view()

    @workflow.update
    def transfer_capacity(self, req: TransferCapacity) -> ReconfigureResult:
        """Move nominal capacity between two children's slices (balancing)."""
        return self._apply(lambda s: s.transfer_capacity(req, workflow.now()))

    @transfer_capacity.validator
    def _validate_transfer_capacity(self, req: TransferCapacity) -> None:
        self._dry_run(lambda s: s.transfer_capacity(req, workflow.now()))

    @workflow.update
    def mark_quota(self, req: QuotaMark) -> ChildView:
        """Record the quota action taken on an agent."""
        return self._apply(lambda s: s.mark_quota(req, workflow.now()))

    @workflow.query
    def pool(self) -> PoolView:
        """This level's pool: capacity, granted, free, borrowed, lent (cheap: no children listed)."""
        return self.state.pool_view()

    @workflow.query
    def link(self) -> ChainLink:
        """This level as a link of a policy chain: its policy, pool and live agent count."""
        return self.state.link()

    @workflow.query
    def grant(self, ref: ChildRef) -> GrantLookup:
        """This level's share of the allocation whose key is ``ref.name``, if it holds one."""
        return GrantLookup(grant=self.state.grants.get(ref.name))

    @workflow.query
    def dependents(self, ref: ChildRef) -> AgentList:
        """Managers: the agents (``<domain>/<agent>``) that depend on agent ``ref.name`` (a key)."""
        return AgentList(agents=self.state.dependents(ref.name))

    @workflow.query
    def ledger(self) -> LedgerSnapshot:
        """Every share of every allocation at this level, for audits and reclaim."""
        return self.state.snapshot()

    @workflow.query
    def child(self, ref: ChildRef) -> ChildLookup:
        """One child, if it exists (cheap: an agent's allocation without the whole view)."""
        return ChildLookup(child=self.state.view_child(ref.name) if ref.name in self.state.children else None)

    # -- itself -------------------------------------------------------------------------------------

    @workflow.update
    def configure(self, req: ConfigureLevel) -> LevelView:
        """Change this level's own capacity or policy."""
        return self._apply(lambda s: s.configure(req, workflow.now()))

    @configure.validator
    def _validate_configure(self, req: ConfigureLevel) -> None:
        self._dry_run(lambda s: s.configure(req, workflow.now()))

    @workflow.update
    def begin_removal(self, req: BeginRemoval) -> RemovalPlan:
        """Prepare to close: refused while children remain unless draining."""
        return self._apply(lambda s: s.begin_removal(req, workflow.now()))

    @begin_removal.validator
    def _validate_begin_removal(self, req: BeginRemoval) -> None:
        self._dry_run(lambda s: s.begin_removal(req, workflow.now()))

    @workflow.update
    def cancel_removal(self, req: BeginRemoval) -> LevelView:
        """Compensation: the level admits children again."""
        self._apply(lambda s: s.cancel_removal(workflow.now()))
        return self.state.view(workflow.now(), self._run_updates)

    @workflow.update
    def close(self, req: BeginRemoval) -> LevelView:
        """Close this level (it must be removing and empty); the workflow then completes."""
        self._apply(lambda s: s.check_can_close())
        self._closing = True
        return self.state.view(workflow.now(), self._run_updates)

    @close.validator
    def _validate_close(self, req: BeginRemoval) -> None:
        self._dry_run(lambda s: s.check_can_close())

    # -- queries ------------------------------------------------------------------------------------

    @workflow.query
    def describe(self) -> LevelView:
        """The common ManagementLevel face: id, scope, policy, pool, health, children, metrics."""
        return self.state.view(workflow.now(), self._run_updates, self._cache.stats())


_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]


@workflow.defn(name="Orchestrator", failure_exception_types=_FAIL_FAST)
class OrchestratorWorkflow(ManagementEntity):
    """The system-wide level: global pool and policy, the domains (managers)."""

    @workflow.run
    async def run(self, inp: LevelInput) -> LevelView:
        return await self._run()


@workflow.defn(name="Manager", failure_exception_types=_FAIL_FAST)
class ManagerWorkflow(ManagementEntity):
    """One domain (tenant): its pool carved from the global pool, its supervisors."""

    @workflow.run
    async def run(self, inp: LevelInput) -> LevelView:
        return await self._run()


@workflow.defn(name="Supervisor", failure_exception_types=_FAIL_FAST)
class SupervisorWorkflow(ManagementEntity):
    """One supervisor: its pool carved from the domain pool, its agents' lifecycle."""

    @workflow.run
    async def run(self, inp: LevelInput) -> LevelView:
        return await self._run()


#: The run method of each management level's entity workflow (to start one by level).
ENTITY_RUN: dict[Level, Any] = {
    Level.ORCHESTRATOR: OrchestratorWorkflow.run,
    Level.MANAGER: ManagerWorkflow.run,
    Level.SUPERVISOR: SupervisorWorkflow.run,
}
