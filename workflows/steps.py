"""Typed wrappers that run one activity on the task queue of the level it acts on.

Operation workflows read as a list of steps (``await steps.register_child(...)``) while every call
still goes through ``execute_activity_method`` with a timeout and a retry policy.
"""

from __future__ import annotations

from typing import Any, TypeVar

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.agents import AgentActivities
    from activities.levels import LevelActivities
    from tetrarch.agent import AgentLookup, AgentState, StopAgent
    from tetrarch.bootstrap import CurrentHierarchy
    from tetrarch.calls import (
        AdmitCall,
        ChildCall,
        ConfigureCall,
        DiscardAgentCall,
        JudgeCall,
        ReadHierarchy,
        ReconfigureChildCall,
        RegisterChildCall,
        ReleaseCall,
        RemovalCall,
        SetPolicyCall,
        StopAgentCall,
    )
    from tetrarch.decisions import PolicyCheck, Verdict
    from tetrarch.level import (
        AdmitAgents,
        AdmitResult,
        BeginRemoval,
        ChildLookup,
        ChildRef,
        ConfigureLevel,
        ReconfigureChild,
        ReconfigureResult,
        RegisterChild,
        RegisterResult,
        ReleaseAgents,
        RemovalPlan,
        SetPolicy,
        UnregisterResult,
    )
    from tetrarch.models import ChildView, LevelRef, LevelView
    from tetrarch.names import Level
    from tetrarch.operations import AgentInput, LevelInput
    from tetrarch.policy import Policy

from workflows.common import ENTITY_CALL_RETRY, ENTITY_CALL_TIMEOUT, queues

R = TypeVar("R")


async def _run(method: Any, arg: Any, level: Level) -> Any:
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
