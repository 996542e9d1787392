"""Which workflows and activities each level's worker runs (DESIGN.md decision 4).

A level's entity workflow and the operations that start at that level run on its task queue;
the activities that reach a level run there too, so a level's worker process is its service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tetrarch.names import Level
from workflows.agent import AgentWorkflow
from workflows.agents import SpawnAgentWorkflow, StopAgentWorkflow
from workflows.batch import BatchSpawnAgentsWorkflow
from workflows.bootstrap import ApplyHierarchyWorkflow
from workflows.coordination import CoordinateAgentOperationsWorkflow
from workflows.domains import ConfigureDomainWorkflow, CreateDomainWorkflow, RemoveDomainWorkflow
from workflows.levels import ManagerWorkflow, OrchestratorWorkflow, SupervisorWorkflow
from workflows.lifecycle import (
    CheckpointAgentWorkflow,
    CloneAgentWorkflow,
    MergeAgentsWorkflow,
    RestoreAgentWorkflow,
    SpecializeAgentWorkflow,
    SplitAgentWorkflow,
    UpgradeAgentWorkflow,
)
from workflows.policies import SetPolicyWorkflow
from workflows.resources import (
    AllocateResourcesWorkflow,
    BalanceSupervisorLoadWorkflow,
    EnforceAgentQuotasWorkflow,
    ReclaimResourcesWorkflow,
    ReleaseResourcesWorkflow,
)
from workflows.supervisors import (
    ConfigureSupervisorWorkflow,
    CreateSupervisorWorkflow,
    RemoveSupervisorWorkflow,
    ScaleSupervisorsWorkflow,
)

WORKFLOWS_BY_LEVEL: dict[Level, Sequence[type]] = {
    Level.ORCHESTRATOR: (OrchestratorWorkflow, ApplyHierarchyWorkflow, CreateDomainWorkflow,
                         ConfigureDomainWorkflow, RemoveDomainWorkflow, SetPolicyWorkflow, ReclaimResourcesWorkflow),
    Level.MANAGER: (ManagerWorkflow, CreateSupervisorWorkflow, ConfigureSupervisorWorkflow,
                    RemoveSupervisorWorkflow, ScaleSupervisorsWorkflow, SetPolicyWorkflow,
                    BalanceSupervisorLoadWorkflow, ReclaimResourcesWorkflow),
    Level.SUPERVISOR: (SupervisorWorkflow, SpawnAgentWorkflow, StopAgentWorkflow, SetPolicyWorkflow,
                       AllocateResourcesWorkflow, ReleaseResourcesWorkflow, EnforceAgentQuotasWorkflow,
                       BatchSpawnAgentsWorkflow, CheckpointAgentWorkflow, RestoreAgentWorkflow, CloneAgentWorkflow,
                       UpgradeAgentWorkflow, SpecializeAgentWorkflow, MergeAgentsWorkflow, SplitAgentWorkflow,
                       CoordinateAgentOperationsWorkflow),
    Level.AGENT: (AgentWorkflow,),
}

ALL_WORKFLOWS: list[type] = list(dict.fromkeys(wf for wfs in WORKFLOWS_BY_LEVEL.values() for wf in wfs))


def activities_for(level: Level, client: Any) -> list[Callable[..., Any]]:
    """The bound activity methods a level's worker registers.

    Each level runs the activities that act on it, plus every entity call (``steps.LOCAL_CALLS``):
    those run as local activities in whichever worker runs the calling workflow.
    """
    from activities.agents import AgentActivities
    from activities.levels import LevelActivities
    from workflows.steps import LOCAL_CALLS

    a, lv = AgentActivities(client), LevelActivities(client)
    own: list[Callable[..., Any]]
    if level is Level.AGENT:
        own = [a.start_agent, a.start_agents, a.find_agent, a.stop_agent, a.discard_agent, a.throttle_agent,
               a.run_task, a.checkpoint_agent, a.switch_agent_image, a.agent_liveness, a.restart_agent,
               a.run_state_hook]
    else:
        own = [lv.start_level, lv.describe_level, lv.register_child, lv.register_children, lv.reconfigure_child,
               lv.begin_child_removal, lv.cancel_child_removal, lv.unregister_child, lv.configure_level,
               lv.begin_removal, lv.cancel_removal, lv.close_level, lv.read_hierarchy, lv.admit_agents,
               lv.release_agents, lv.set_policy, lv.judge, lv.reserve, lv.release_grants, lv.set_reclaiming,
               lv.transfer_capacity, lv.mark_quota, lv.read_pool, lv.read_ledger, lv.read_child,
               lv.check_allocation, lv.placement_candidates, lv.start_quota_watch, lv.load_image,
               lv.record_agent_failure, lv.read_dependents, lv.start_operation, lv.read_grant]
    names = {fn.__name__ for fn in own}
    local = [getattr(a if hasattr(a, fn.__name__) else lv, fn.__name__) for fn in LOCAL_CALLS]
    return own + sorted((fn for fn in local if fn.__name__ not in names), key=lambda fn: fn.__name__)
