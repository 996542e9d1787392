"""Typed wrappers that run one step of an operation: one activity, with a timeout and a retry policy.

Operation workflows read as a list of steps (``await steps.register_child(...)``). A step that only
calls another level's entity runs as a local activity in this workflow's worker (``LOCAL_CALLS``);
any other step is an activity on the task queue of the level it acts on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.agents import AgentActivities
    from activities.levels import LevelActivities
    from tetrarch.agent import (
        AgentImage,
        AgentLookup,
        AgentState,
        Checkpoint,
        StopAgent,
        SwitchImage,
        TakeCheckpoint,
        TaskResult,
    )
    from tetrarch.bootstrap import CurrentHierarchy
    from tetrarch.calls import (
        AdmitCall,
        CheckAllocation,
        CheckpointCall,
        ChildCall,
        ChildQuery,
        ConfigureCall,
        DiscardAgentCall,
        JudgeCall,
        LoadImage,
        PlacementQuery,
        QuotaMarkCall,
        ReadHierarchy,
        ReclaimingCall,
        ReconfigureChildCall,
        RegisterChildCall,
        RegisterChildrenCall,
        ReleaseCall,
        ReleaseGrantsCall,
        RemovalCall,
        ReserveCall,
        RunTask,
        SetPolicyCall,
        StartAgents,
        StartedAgents,
        StateHook,
        StopAgentCall,
        SwitchImageCall,
        ThrottleCall,
        TransferCall,
    )
    from tetrarch.decisions import PolicyCheck, Verdict
    from tetrarch.level import (
        AdmitAgents,
        AdmitResult,
        AgentList,
        BeginRemoval,
        ChildLookup,
        ChildRef,
        ConfigureLevel,
        GrantLookup,
        QuotaMark,
        Reclaiming,
        ReconfigureChild,
        ReconfigureResult,
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
    from tetrarch.models import ChildView, LevelRef, LevelView, PoolView
    from tetrarch.names import Level
    from tetrarch.operations import AgentInput, LevelInput
    from tetrarch.placement import PlacementInfo
    from tetrarch.policy import Policy
    from tetrarch.pools import LedgerSnapshot
    from tetrarch.resource_ops import AllocationCheck

from workflows.common import ENTITY_CALL_RETRY, ENTITY_CALL_TIMEOUT, current_level, gather_all, queues

R = TypeVar("R")


#: The patch that made entity calls local activities; runs recorded before it keep their
#: activities on the level queues when they replay.
LOCAL_ENTITY_CALLS = "local-entity-calls"

#: Activities that only reach an entity through the client (an Update, a Query, or starting its
#: workflow): they need no queue of their own, so they run as local activities in the calling
#: workflow's worker. That saves the two server round trips of a scheduled activity (about 10 ms
#: here) per step; measured by ``tetrarch bench`` (README, Performance). The entity itself still
#: runs on its level's worker. Steps that do real work (verifying an image, running agent code,
#: restarting an agent from its history) stay regular activities on the level's queue.
LOCAL_CALLS: frozenset[Any] = frozenset({
    LevelActivities.start_level, LevelActivities.describe_level, LevelActivities.register_child,
    LevelActivities.register_children, LevelActivities.reconfigure_child, LevelActivities.begin_child_removal,
    LevelActivities.cancel_child_removal, LevelActivities.unregister_child, LevelActivities.configure_level,
    LevelActivities.begin_removal, LevelActivities.cancel_removal, LevelActivities.close_level,
    LevelActivities.read_hierarchy, LevelActivities.admit_agents, LevelActivities.release_agents,
    LevelActivities.set_policy, LevelActivities.judge, LevelActivities.reserve, LevelActivities.release_grants,
    LevelActivities.set_reclaiming, LevelActivities.transfer_capacity, LevelActivities.mark_quota,
    LevelActivities.read_pool, LevelActivities.read_ledger, LevelActivities.read_child,
    LevelActivities.check_allocation, LevelActivities.placement_candidates, LevelActivities.start_quota_watch,
    LevelActivities.record_agent_failure, LevelActivities.read_dependents, LevelActivities.start_operation,
    LevelActivities.read_grant,
    AgentActivities.start_agent, AgentActivities.start_agents, AgentActivities.find_agent,
    AgentActivities.stop_agent, AgentActivities.discard_agent, AgentActivities.throttle_agent,
    AgentActivities.checkpoint_agent, AgentActivities.switch_agent_image,
})


async def gather(*calls: Awaitable[R]) -> list[R]:
    """Run steps at once and return their results; if any failed, raise the first failure once every
    step has ended.

    A workflow must not end while one of its local activities is still out: the SDK then records
    that activity's result after the workflow's last command and the server refuses the task (seen:
    "FailWorkflowExecution must be the last command", the workflow stuck retrying). Runs recorded
    before local calls keep the plain gather they were recorded with.
    """
    if workflow.patched(LOCAL_ENTITY_CALLS):
        return await gather_all(*calls)
    return list(await asyncio.gather(*calls))


async def _run(method: Any, arg: Any, level: Level) -> Any:
    # Only calls to another level's entities run locally. A local activity holds its workflow's task
    # slot while it runs; an entity on this same queue needs a slot of this same worker to answer, so
    # enough operations calling it at once took every slot and waited on each other (seen: a drain of
    # 160 agents, every StopAgent stuck). Same-queue calls are activities, dispatched eagerly.
    if method in LOCAL_CALLS and level is not current_level() and workflow.patched(LOCAL_ENTITY_CALLS):
        # Not waited for when cancelled: an operation's own cancellation never reaches its steps
        # (common.guarded), and waiting raced the SDK (a call ending as its cancellation arrived left
        # the workflow waiting forever). A cancelled call still finishes what it sent (calls.uninterrupted).
        return await workflow.execute_local_activity_method(
            method, arg, start_to_close_timeout=ENTITY_CALL_TIMEOUT, retry_policy=ENTITY_CALL_RETRY)
    return await workflow.execute_activity_method(
        method, arg, task_queue=queues().for_level(level), start_to_close_timeout=ENTITY_CALL_TIMEOUT,
        retry_policy=ENTITY_CALL_RETRY)


async def start_level(inp: LevelInput) -> LevelView:
    """Start (or find) a management entity; runs on that entity's own queue."""
    result: LevelView = await _run(LevelActivities.start_level, inp, inp.level_state.level)
    return result


async def describe_level(target: LevelRef) -> LevelView:
    """Read a management entity's view."""
    result: LevelView = await _run(LevelActivities.describe_level, target, target.level)
    return result


async def register_child(target: LevelRef, req: RegisterChild) -> RegisterResult:
    """Admit a child at ``target``."""
    result: RegisterResult = await _run(LevelActivities.register_child,
                                        RegisterChildCall(target=target, request=req), target.level)
    return result


async def reconfigure_child(target: LevelRef, req: ReconfigureChild) -> ReconfigureResult:
    """Resize or re-police a child at ``target``."""
    result: ReconfigureResult = await _run(LevelActivities.reconfigure_child,
                                           ReconfigureChildCall(target=target, request=req), target.level)
    return result


async def begin_child_removal(target: LevelRef, name: str, request_id: str) -> ChildView:
    """Mark child ``name`` of ``target`` as being removed."""
    result: ChildView = await _run(LevelActivities.begin_child_removal,
                                   ChildCall(target=target, request=ChildRef(request_id=request_id, name=name)),
                                   target.level)
    return result


async def cancel_child_removal(target: LevelRef, name: str, request_id: str) -> ChildLookup:
    """Compensation of :func:`begin_child_removal`."""
    result: ChildLookup = await _run(LevelActivities.cancel_child_removal,
                                     ChildCall(target=target, request=ChildRef(request_id=request_id, name=name)),
                                     target.level)
    return result


async def unregister_child(target: LevelRef, name: str, request_id: str, owner: str | None = None) -> UnregisterResult:
    """Forget child ``name`` of ``target`` and return its slice (with ``owner``: only if that request made it)."""
    result: UnregisterResult = await _run(
        LevelActivities.unregister_child,
        ChildCall(target=target, request=ChildRef(request_id=request_id, name=name, owner=owner)), target.level)
    return result


async def configure_level(target: LevelRef, req: ConfigureLevel) -> LevelView:
    """Change ``target``'s own capacity or policy."""
    result: LevelView = await _run(LevelActivities.configure_level, ConfigureCall(target=target, request=req),
                                   target.level)
    return result


async def begin_removal(target: LevelRef, req: BeginRemoval) -> RemovalPlan:
    """``target`` prepares to close."""
    result: RemovalPlan = await _run(LevelActivities.begin_removal, RemovalCall(target=target, request=req),
                                     target.level)
    return result


async def cancel_removal(target: LevelRef, req: BeginRemoval) -> LevelView:
    """Compensation of :func:`begin_removal`."""
    result: LevelView = await _run(LevelActivities.cancel_removal, RemovalCall(target=target, request=req),
                                   target.level)
    return result


async def close_level(target: LevelRef, req: BeginRemoval) -> LevelView:
    """Close ``target``; its workflow completes."""
    result: LevelView = await _run(LevelActivities.close_level, RemovalCall(target=target, request=req),
                                   target.level)
    return result


async def read_hierarchy(domains: list[str]) -> CurrentHierarchy:
    """What exists of the orchestrator and these domains."""
    result: CurrentHierarchy = await _run(LevelActivities.read_hierarchy, ReadHierarchy(domains=domains),
                                          Level.ORCHESTRATOR)
    return result


async def start_agent(inp: AgentInput) -> AgentState:
    """Start (or find) an agent entity."""
    result: AgentState = await _run(AgentActivities.start_agent, inp, Level.AGENT)
    return result


async def find_agent(target: LevelRef) -> AgentLookup:
    """An agent's last state, running or not (NotFound only if it never existed)."""
    result: AgentLookup = await _run(AgentActivities.find_agent, target, Level.AGENT)
    return result


async def stop_agent(target: LevelRef, req: StopAgent) -> AgentState:
    """Stop an agent cleanly."""
    result: AgentState = await _run(AgentActivities.stop_agent, StopAgentCall(target=target, request=req),
                                    Level.AGENT)
    return result


async def admit_agents(target: LevelRef, req: AdmitAgents) -> AdmitResult:
    """Judge and count agents in at ``target``."""
    result: AdmitResult = await _run(LevelActivities.admit_agents, AdmitCall(target=target, request=req),
                                     target.level)
    return result


async def release_agents(target: LevelRef, req: ReleaseAgents) -> AdmitResult:
    """Count agents out at ``target``."""
    result: AdmitResult = await _run(LevelActivities.release_agents, ReleaseCall(target=target, request=req),
                                     target.level)
    return result


async def set_policy(target: LevelRef, req: SetPolicy) -> Policy:
    """Replace ``target``'s policy."""
    result: Policy = await _run(LevelActivities.set_policy, SetPolicyCall(target=target, request=req),
                                target.level)
    return result


async def judge(target: LevelRef, check: PolicyCheck) -> Verdict:
    """``target``'s verdict on an operation (nothing changes)."""
    result: Verdict = await _run(LevelActivities.judge, JudgeCall(target=target, check=check), target.level)
    return result


async def discard_agent(target: LevelRef, owner: str) -> AgentLookup | None:
    """Compensation of a start: stop the agent only if request ``owner`` started it."""
    result: AgentLookup | None = await _run(AgentActivities.discard_agent,
                                            DiscardAgentCall(target=target, owner=owner), Level.AGENT)
    return result


# -- resources ----------------------------------------------------------------------------------------


async def reserve(target: LevelRef, req: Reserve) -> ReserveResult:
    """Take ``target``'s share of an allocation."""
    result: ReserveResult = await _run(LevelActivities.reserve, ReserveCall(target=target, request=req),
                                       target.level)
    return result


async def release_grants(target: LevelRef, req: ReleaseGrants) -> ReleasedGrants:
    """Return allocations to ``target``'s pool (exactly once)."""
    result: ReleasedGrants = await _run(LevelActivities.release_grants,
                                        ReleaseGrantsCall(target=target, request=req), target.level)
    return result


async def set_reclaiming(target: LevelRef, req: Reclaiming) -> PoolView:
    """Begin or end a reclaim at ``target``."""
    result: PoolView = await _run(LevelActivities.set_reclaiming, ReclaimingCall(target=target, request=req),
                                  target.level)
    return result


async def transfer_capacity(target: LevelRef, req: TransferCapacity) -> ReconfigureResult:
    """Move nominal capacity between two children of ``target``."""
    result: ReconfigureResult = await _run(LevelActivities.transfer_capacity,
                                           TransferCall(target=target, request=req), target.level)
    return result


async def mark_quota(target: LevelRef, req: QuotaMark) -> ChildView:
    """Record a quota action on an agent of ``target``."""
    result: ChildView = await _run(LevelActivities.mark_quota, QuotaMarkCall(target=target, request=req),
                                   target.level)
    return result


async def read_pool(target: LevelRef) -> PoolView:
    """``target``'s pool."""
    result: PoolView = await _run(LevelActivities.read_pool, target, target.level)
    return result


async def read_ledger(target: LevelRef) -> LedgerSnapshot:
    """``target``'s allocation ledger."""
    result: LedgerSnapshot = await _run(LevelActivities.read_ledger, target, target.level)
    return result


async def read_child(target: LevelRef, name: str) -> ChildLookup:
    """One child of ``target``."""
    result: ChildLookup = await _run(LevelActivities.read_child, ChildQuery(target=target, name=name),
                                     target.level)
    return result


async def check_allocation(call: CheckAllocation) -> AllocationCheck:
    """The agent's supervisor, holdings and its three levels' verdicts on an allocation."""
    result: AllocationCheck = await _run(LevelActivities.check_allocation, call, Level.SUPERVISOR)
    return result


async def placement_candidates(domain: str) -> PlacementInfo:
    """A domain's supervisors with their pools, and its placement strategy."""
    result: PlacementInfo = await _run(LevelActivities.placement_candidates, PlacementQuery(domain=domain),
                                       Level.MANAGER)
    return result


async def throttle_agent(target: LevelRef, throttled: bool, reason: str) -> AgentState:
    """Tell an agent it is (or is no longer) throttled."""
    result: AgentState = await _run(AgentActivities.throttle_agent,
                                    ThrottleCall(target=target, throttled=throttled, reason=reason), Level.AGENT)
    return result


async def register_children(target: LevelRef, req: RegisterChildren) -> RegisterChildrenResult:
    """Admit a batch of agents at the supervisor ``target``."""
    result: RegisterChildrenResult = await _run(LevelActivities.register_children,
                                                RegisterChildrenCall(target=target, request=req), target.level)
    return result


async def start_agents(inputs: list[AgentInput]) -> StartedAgents:
    """Start (or find) many agent entities in one activity."""
    result: StartedAgents = await _run(AgentActivities.start_agents, StartAgents(inputs=inputs), Level.AGENT)
    return result


async def load_image(req: LoadImage) -> AgentImage:
    """The supervisor loads and verifies an agent's image against its levels' policies."""
    result: AgentImage = await _run(LevelActivities.load_image, req, Level.SUPERVISOR)
    return result



async def checkpoint_agent(target: LevelRef, req: TakeCheckpoint) -> Checkpoint:
    """A checkpoint of a running agent."""
    result: Checkpoint = await _run(AgentActivities.checkpoint_agent, CheckpointCall(target=target, request=req),
                                    Level.AGENT)
    return result


async def switch_agent_image(target: LevelRef, req: SwitchImage) -> AgentState:
    """Switch a running agent to another verified image."""
    result: AgentState = await _run(AgentActivities.switch_agent_image, SwitchImageCall(target=target, request=req),
                                    Level.AGENT)
    return result


async def run_task_attempt(call: RunTask) -> TaskResult:
    """One attempt of a task on the agent level's workers (an upgrade trying its new version)."""
    result: TaskResult = await workflow.execute_activity_method(
        AgentActivities.run_task, call, task_queue=queues().for_level(Level.AGENT),
        start_to_close_timeout=timedelta(seconds=call.task.timeout_seconds + 60), retry_policy=ENTITY_CALL_RETRY)
    return result


async def read_dependents(domain: str, agent: str) -> AgentList:
    """The agents of ``domain`` that depend on ``agent``."""
    result: AgentList = await _run(LevelActivities.read_dependents,
                                   ChildQuery(target=LevelRef.manager(domain), name=f"{domain}/{agent}"), Level.MANAGER)
    return result


async def read_grant(target: LevelRef, key: str) -> GrantLookup:
    """``target``'s share of allocation ``key``, if it holds one."""
    result: GrantLookup = await _run(LevelActivities.read_grant, ChildQuery(target=target, name=key), target.level)
    return result


async def run_state_hook(call: StateHook) -> Any:
    """An image's merge or split hook, run on the agent level's workers."""
    return await _run(AgentActivities.run_state_hook, call, Level.AGENT)
