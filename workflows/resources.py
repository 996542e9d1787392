"""Resource operations: AllocateResources, ReleaseResources, BalanceSupervisorLoad, ReclaimResources
and EnforceAgentQuotas (the seed's resource flow, example 3, and the supervisor's quota enforcement).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.calls import CheckAllocation
    from tetrarch.decisions import ChainLink, PolicyCheck, effective
    from tetrarch.errors import InvalidRequest, NotFound
    from tetrarch.level import (
        ConfigureLevel,
        QuotaMark,
        Reclaiming,
        ReleaseGrants,
        Reserve,
        ReserveResult,
        TransferCapacity,
    )
    from tetrarch.models import AgentStatus, LevelRef, LevelView, PoolView
    from tetrarch.names import Level
    from tetrarch.operations import StopAgentRequest
    from tetrarch.placement import plan_balance
    from tetrarch.policy import DEFAULT_PREEMPT_GRACE_SECONDS, OperationType, QuotaAction, ReclaimMode
    from tetrarch.pools import Grant, allocation_key, key_agent, priority_order
    from tetrarch.resource_ops import (
        AllocateRequest,
        AllocationResult,
        BalanceRequest,
        BalanceResult,
        CapacityMove,
        QuotaOutcome,
        QuotaWatch,
        ReclaimRequest,
        ReclaimResult,
        ReleaseRequest,
        ReleaseResult,
    )
    from tetrarch.resources import Resources

from workflows import steps
from workflows.agents import StopAgentWorkflow
from workflows.allocation import escalate, return_borrowed
from workflows.common import (
    DOMAIN_KEY,
    OPERATION_KEY,
    SUPERVISOR_KEY,
    Saga,
    error_info,
    guarded,
    queues,
    reraise,
    to_application_error,
)
from workflows.level_ops import request_id

_FAIL_FAST: list[type[BaseException]] = [pydantic.ValidationError]
_ORDER = [Level.ORCHESTRATOR.value, Level.MANAGER.value, Level.SUPERVISOR.value]


@workflow.defn(name="AllocateResources", failure_exception_types=_FAIL_FAST)
class AllocateResourcesWorkflow:
    """An agent gets more resources: from its supervisor, else borrowed from its domain, else from global."""

    @workflow.run
    async def run(self, req: AllocateRequest) -> AllocationResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("AllocateResources"),
                                           DOMAIN_KEY.value_set(req.domain)])
        rid = request_id(req.request_id)
        if req.resources.is_zero():
            raise to_application_error(InvalidRequest(
                f"an allocation for agent {req.domain}/{req.agent} must ask for some cpu, memory or gpu",
                level=Level.SUPERVISOR.value))
        checked = await steps.check_allocation(CheckAllocation(domain=req.domain, agent=req.agent,
                                                               resources=req.resources, supervisor=req.supervisor))
        sup_name = checked.supervisor
        workflow.upsert_search_attributes([SUPERVISOR_KEY.value_set(sup_name)])
        supervisor = LevelRef.supervisor(req.domain, sup_name)
        key = allocation_key(req.domain, req.agent, rid)
        check = PolicyCheck(operation=OperationType.ALLOCATE, domain=req.domain, supervisor=sup_name,
                            agent=req.agent, resources=req.resources)
        saga = Saga()

        async def forward() -> tuple[ReserveResult, dict[str, Resources]]:
            undo = ReleaseGrants(request_id=f"{rid}/undo", keys=[key], owner=rid)
            saga.add(f"return {key} to {supervisor.entity_id}", lambda: steps.release_grants(supervisor, undo))
            # The supervisor judges the three levels' policies on the agent's live total, then pays its share.
            first = await steps.reserve(supervisor, Reserve(request_id=rid, key=key, child=req.agent,
                                                            resources=req.resources, check=check,
                                                            above=checked.above))
            above = check.model_copy(update={"resources": first.agent_total})
            parts = {Level.SUPERVISOR.value: first.grant.own}
            parts |= await escalate(saga, rid, key, req.domain, sup_name, first.remainder, above,
                                    first.grant.priority)
            return first, parts

        try:
            first, parts = await guarded(saga, forward())
        except BaseException as e:
            reraise(e)
        served_by = next((lv for lv in _ORDER if not parts.get(lv, Resources()).is_zero()), Level.SUPERVISOR.value)
        return AllocationResult(allocation_id=rid, key=key, domain=req.domain, supervisor=sup_name, agent=req.agent,
                                resources=req.resources, parts=parts, served_by=served_by,
                                agent_total=first.agent_total, created=first.created)


async def release_at(domain: str, supervisor: str, rid: str, req: ReleaseGrants) -> ReleaseResult:
    """Release at the supervisor, then return what those grants borrowed to the domain and global pools."""
    got = await steps.release_grants(LevelRef.supervisor(domain, supervisor), req)
    returned = await return_borrowed(rid, domain, got.released)
    agent = req.agent.split("/", 1)[1] if req.agent else (key_agent(req.keys[0]).split("/", 1)[1] if req.keys else "")
    return ReleaseResult(domain=domain, agent=agent, released=got.keys, returned=returned)


@workflow.defn(name="ReleaseResources", failure_exception_types=_FAIL_FAST)
class ReleaseResourcesWorkflow:
    """Give an allocation back; each part returns to the level it came from, exactly once."""

    @workflow.run
    async def run(self, req: ReleaseRequest) -> ReleaseResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("ReleaseResources"),
                                           DOMAIN_KEY.value_set(req.domain)])
        rid = request_id(req.request_id)
        found = await steps.find_agent(LevelRef.agent(req.domain, req.agent))
        sup = found.state.spec.supervisor
        if req.allocation_id is not None:
            grants = ReleaseGrants(request_id=rid, keys=[allocation_key(req.domain, req.agent, req.allocation_id)])
        else:
            grants = ReleaseGrants(request_id=rid, agent=f"{req.domain}/{req.agent}", keep_spawn=not req.include_spawn)
        result = await release_at(req.domain, sup, rid, grants)
        result.agent = req.agent
        return result


@workflow.defn(name="BalanceSupervisorLoad", failure_exception_types=_FAIL_FAST)
class BalanceSupervisorLoadWorkflow:
    """Move free nominal capacity between a domain's supervisors toward those that borrow.

    Each move shrinks the donor first (the donor refuses to go below what it has granted), then moves
    the slice in the domain's ledger, then grows the recipient; a failed move is undone and skipped. At
    no moment does a supervisor hold more capacity than its domain has carved for it.
    """

    @workflow.run
    async def run(self, req: BalanceRequest) -> BalanceResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("BalanceSupervisorLoad"),
                                           DOMAIN_KEY.value_set(req.domain)])
        rid = request_id(req.request_id)
        manager = await steps.describe_level(LevelRef.manager(req.domain))
        names = [c.name for c in manager.children if c.status.value == "active"]
        pools = await steps.gather(*(steps.read_pool(LevelRef.supervisor(req.domain, n)) for n in names))
        by_name: dict[str, PoolView] = dict(zip(names, pools, strict=True))
        result = BalanceResult(domain=req.domain, planned=plan_balance(by_name))
        if req.dry_run:
            return result
        for i, move in enumerate(result.planned):
            try:
                await self._move(req.domain, f"{rid}/{i}", move, by_name)
                result.done.append(move)
            except Exception as e:
                info = error_info(e)
                result.skipped.append(f"{move.source} -> {move.target}: {info.message if info else e}")
        return result

    @staticmethod
    async def _move(domain: str, rid: str, move: CapacityMove, pools: dict[str, PoolView]) -> None:
        source, target = LevelRef.supervisor(domain, move.source), LevelRef.supervisor(domain, move.target)
        manager = LevelRef.manager(domain)
        src_cap, dst_cap = pools[move.source].capacity, pools[move.target].capacity
        saga = Saga()

        async def forward() -> None:
            saga.add(f"restore {move.source}", lambda: steps.configure_level(
                source, ConfigureLevel(request_id=f"{rid}/undo-src", resources=src_cap)))
            await steps.configure_level(source, ConfigureLevel(request_id=f"{rid}/src",
                                                               resources=src_cap.minus(move.resources)))
            saga.add("move the slice back", lambda: steps.transfer_capacity(manager, TransferCapacity(
                request_id=f"{rid}/undo-move", source=move.target, target=move.source, resources=move.resources)))
            await steps.transfer_capacity(manager, TransferCapacity(request_id=f"{rid}/move", source=move.source,
                                                                    target=move.target, resources=move.resources))
            await steps.configure_level(target, ConfigureLevel(request_id=f"{rid}/dst",
                                                               resources=dst_cap + move.resources))

        await guarded(saga, forward())
        pools[move.source] = pools[move.source].model_copy(update={"capacity": src_cap.minus(move.resources)})
        pools[move.target] = pools[move.target].model_copy(update={"capacity": dst_cap + move.resources})


@workflow.defn(name="ReclaimResources", failure_exception_types=_FAIL_FAST)
class ReclaimResourcesWorkflow:
    """A level wants back capacity it lent out.

    It lends nothing new meanwhile. First, idle borrowers give back: extra allocations their agents'
    reported use does not need (or agents no longer running). If that is not enough, the level's
    policy decides: ``refuse`` (the default) keeps new loans refused until enough comes back, and
    ``preempt`` waits out a grace period and then stops the lowest-priority borrowers.
    """

    @workflow.run
    async def run(self, req: ReclaimRequest) -> ReclaimResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("ReclaimResources")]
                                          + ([DOMAIN_KEY.value_set(req.domain)] if req.domain else []))
        rid = request_id(req.request_id)
        if req.resources.is_zero():
            raise to_application_error(InvalidRequest("a reclaim must ask for some cpu, memory or gpu",
                                                      level=Level.MANAGER.value if req.domain else "orchestrator"))
        target = LevelRef.manager(req.domain) if req.domain else LevelRef.orchestrator()
        view = await steps.describe_level(target)
        if not req.resources.fits_in(view.pool.capacity):
            raise to_application_error(InvalidRequest(
                f"{target.describe()} cannot want {req.resources.human()} free: its capacity is "
                f"{view.pool.capacity.human()}", level=target.level.value, entity=target.entity_id))
        result = ReclaimResult(target=target.entity_id, wanted=req.resources, satisfied=False, free=view.pool.free)
        if req.resources.fits_in(view.pool.free):
            result.satisfied = True
            return result
        await steps.set_reclaiming(target, Reclaiming(request_id=f"{rid}/begin", resources=req.resources))
        try:
            return await self._reclaim(req, rid, target, view, result)
        except BaseException:
            # A reclaim that cannot finish must not leave its level refusing loans for good.
            await asyncio.shield(asyncio.ensure_future(
                steps.set_reclaiming(target, Reclaiming(request_id=f"{rid}/abort"))))
            raise

    async def _reclaim(self, req: ReclaimRequest, rid: str, target: LevelRef, view: LevelView,
                       result: ReclaimResult) -> ReclaimResult:
        loans = [g for g in (await steps.read_ledger(target)).grants if not g.own.is_zero()]
        for grant in loans:
            if await self._is_idle(target, grant):
                result.released += await self._give_back(target, grant, rid)
                if await self._satisfied(target, req.resources, result):
                    return result
        mode = view.policy.resources.reclaim or ReclaimMode.REFUSE
        if mode is ReclaimMode.REFUSE:
            result.refusing_new_loans = not await self._satisfied(target, req.resources, result)
            return result
        grace = view.policy.resources.preempt_grace_seconds
        await workflow.sleep(timedelta(seconds=DEFAULT_PREEMPT_GRACE_SECONDS if grace is None else grace))
        remaining = [g for g in (await steps.read_ledger(target)).grants if not g.own.is_zero()]
        for grant in priority_order(remaining):
            if await self._satisfied(target, req.resources, result):
                return result
            domain, agent = key_agent(grant.key).split("/", 1)
            if agent in result.preempted:
                continue
            try:
                await workflow.execute_child_workflow(
                    StopAgentWorkflow.run, StopAgentRequest(request_id=f"{rid}/preempt/{agent}", domain=domain,
                                                            name=agent,
                                                            reason=f"preempted: {target.entity_id} reclaims"),
                    id=f"op/preempt/{domain}/{agent}/{rid}", task_queue=queues().for_level(Level.SUPERVISOR),
                    parent_close_policy=ParentClosePolicy.ABANDON)
            except Exception as e:  # its kill refused by policy, or it is gone: try the next borrower
                info = error_info(e)
                result.problems.append(f"could not preempt {domain}/{agent}: {info.message if info else e}")
                continue
            result.preempted.append(agent)
        await self._satisfied(target, req.resources, result)
        return result

    @staticmethod
    async def _satisfied(target: LevelRef, wanted: Resources, result: ReclaimResult) -> bool:
        pool = await steps.read_pool(target)
        result.free = pool.free
        result.satisfied = wanted.fits_in(pool.free)
        result.refusing_new_loans = pool.reclaiming is not None
        return result.satisfied

    @staticmethod
    async def _holder(target: LevelRef, grant: Grant) -> tuple[str, str]:
        """The domain and supervisor of the agent behind a loan."""
        domain = grant.child if target.level is Level.ORCHESTRATOR else (target.domain or "")
        if target.level is Level.MANAGER:
            return domain, grant.child
        mid = await steps.read_ledger(LevelRef.manager(domain))
        match = next((g for g in mid.grants if g.key == grant.key), None)
        return domain, match.child if match is not None else ""

    async def _is_idle(self, target: LevelRef, grant: Grant) -> bool:
        """A borrower is idle when its agent no longer runs, or its reported use fits without this allocation."""
        if grant.spawn:
            return False
        domain, supervisor = await self._holder(target, grant)
        if not supervisor:
            return False
        agent = key_agent(grant.key).split("/", 1)[1]
        holder = LevelRef.supervisor(domain, supervisor)
        found = (await steps.read_child(holder, agent)).child
        if found is None or found.used is None:
            return False
        status = found.last_report.status if found.last_report is not None else AgentStatus.RUNNING.value
        if status in (AgentStatus.STOPPED.value, AgentStatus.FAILED.value):
            return True
        # The whole allocation (as its supervisor holds it), not only the lender's share of it.
        whole = next((g.size for g in (await steps.read_ledger(holder)).grants if g.key == grant.key), None)
        if whole is None or not whole.fits_in(found.resources):
            return False
        return found.used.fits_in(found.resources.minus(whole))

    async def _give_back(self, target: LevelRef, grant: Grant, rid: str) -> list[str]:
        domain, supervisor = await self._holder(target, grant)
        out = await release_at(domain, supervisor, f"{rid}/idle", ReleaseGrants(request_id=f"{rid}/idle",
                                                                                 keys=[grant.key]))
        return out.released


@workflow.defn(name="EnforceAgentQuotas", failure_exception_types=_FAIL_FAST)
class EnforceAgentQuotasWorkflow:
    """One overuse of one agent (``enforceAgentQuotas``): wait out the grace, then act if it lasts.

    The supervisor starts one run per overuse when an agent reports using more than it was allocated.
    The action and the grace are the strictest of the chain's policies (flag, throttle or stop).
    """

    @workflow.run
    async def run(self, watch: QuotaWatch) -> QuotaOutcome:
        rid = request_id(watch.request_id)
        refs = [LevelRef.orchestrator(), LevelRef.manager(watch.domain), LevelRef.supervisor(watch.domain,
                                                                                             watch.supervisor)]
        views: list[LevelView] = list(await steps.gather(*(steps.describe_level(r) for r in refs)))
        eff = effective([ChainLink(level=v.level.value, entity=v.id, policy=v.policy, capacity=v.pool.capacity,
                                   agents=v.agents) for v in views])
        deadline = watch.since + timedelta(seconds=eff.quota_grace_seconds)
        wait = (deadline - workflow.now()).total_seconds()
        if wait > 0:
            await workflow.sleep(timedelta(seconds=wait))
        supervisor = refs[2]
        found = (await steps.read_child(supervisor, watch.agent)).child
        if found is None or found.over_quota_since != watch.since:
            return QuotaOutcome(agent=watch.agent)  # it stopped, or came back within its allocation
        action = eff.quota_action
        outcome = QuotaOutcome(agent=watch.agent, action=action, used=found.used, allocated=found.resources,
                               decided_by=eff.decided_by.get("resources.quota_action"))
        reason = (f"uses {found.used.human() if found.used else '?'}, allocated {found.resources.human()}, "
                  f"for over {eff.quota_grace_seconds:g}s")
        await steps.mark_quota(supervisor, QuotaMark(request_id=rid, agent=watch.agent, action=action,
                                                     since=watch.since))
        if action is QuotaAction.THROTTLE:
            await steps.throttle_agent(LevelRef.agent(watch.domain, watch.agent), True, f"throttled: {reason}")
        elif action is QuotaAction.STOP:
            try:
                await workflow.execute_child_workflow(
                    StopAgentWorkflow.run, StopAgentRequest(request_id=f"{rid}/stop", domain=watch.domain,
                                                            name=watch.agent, reason=f"over quota: {reason}"),
                    id=f"op/quota-stop/{watch.domain}/{watch.agent}/{rid}",
                    task_queue=queues().for_level(Level.SUPERVISOR))
            except Exception as e:
                info = error_info(e)
                if info is None or info.code != NotFound.code:
                    reraise(e)
        return outcome
