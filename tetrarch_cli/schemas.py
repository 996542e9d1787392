"""The public API as JSON Schema: every workflow, Update, Query and signal with its input and output.

``tetrarch schema`` prints these (or writes one file per entry), so that programs in any language,
and people using the ``temporal`` CLI with ``--input '{...}'``, know exactly what each takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter

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
from tetrarch.bootstrap import HierarchySpec
from tetrarch.decisions import ChainLink, PolicyCheck, Verdict
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
from tetrarch.lifecycle_ops import (
    CheckpointRequest,
    CloneRequest,
    CoordinateRequest,
    CoordinateResult,
    LifecycleResult,
    MergeRequest,
    RestoreRequest,
    SelfRequest,
    SelfRequestResult,
    SpecializeRequest,
    SplitRequest,
    UpgradeRequest,
)
from tetrarch.models import ChildView, LevelSummary, LevelView, PoolView
from tetrarch.operations import (
    AgentInput,
    AgentResult,
    ApplyResult,
    BatchSpawnRequest,
    BatchSpawnResult,
    ConfigureDomainRequest,
    ConfigureSupervisorRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    DomainResult,
    LevelInput,
    PolicyChangeResult,
    RemovalResult,
    RemoveDomainRequest,
    RemoveSupervisorRequest,
    ScaleResult,
    ScaleSupervisorsRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
    StopAgentRequest,
    SupervisorResult,
)
from tetrarch.policy import Policy
from tetrarch.pools import LedgerSnapshot
from tetrarch.resource_ops import (
    AllocateRequest,
    AllocationResult,
    BalanceRequest,
    BalanceResult,
    QuotaOutcome,
    QuotaWatch,
    ReclaimRequest,
    ReclaimResult,
    ReleaseRequest,
    ReleaseResult,
)


@dataclass(frozen=True)
class ApiEntry:
    """One public workflow, Update, Query or signal."""

    kind: str  # workflow | update | query | signal
    name: str
    on: str  # the task queue (workflows) or the entity workflow types (handlers)
    input: type[BaseModel] | None
    output: type[BaseModel] | None
    summary: str


_ENTITIES = "Orchestrator, Manager, Supervisor"

PUBLIC_API: tuple[ApiEntry, ...] = (
    ApiEntry("workflow", "ApplyHierarchy", "orchestrator", HierarchySpec, ApplyResult,
             "Apply a hierarchy file (idempotent)."),
    ApiEntry("workflow", "CreateDomain", "orchestrator", CreateDomainRequest, DomainResult,
             "Create a domain (a manager) with a pool carved from the global pool."),
    ApiEntry("workflow", "ConfigureDomain", "orchestrator", ConfigureDomainRequest, DomainResult,
             "Resize a domain's pool or replace its policy."),
    ApiEntry("workflow", "RemoveDomain", "orchestrator", RemoveDomainRequest, RemovalResult,
             "Remove a domain; refused while it has supervisors unless drain is set."),
    ApiEntry("workflow", "CreateSupervisor", "manager", CreateSupervisorRequest, SupervisorResult,
             "Create a supervisor in a domain."),
    ApiEntry("workflow", "ConfigureSupervisor", "manager", ConfigureSupervisorRequest, SupervisorResult,
             "Resize a supervisor's pool or replace its policy."),
    ApiEntry("workflow", "RemoveSupervisor", "manager", RemoveSupervisorRequest, RemovalResult,
             "Remove a supervisor; refused while it has agents unless drain is set."),
    ApiEntry("workflow", "ScaleSupervisors", "manager", ScaleSupervisorsRequest, ScaleResult,
             "Add (delta > 0) or remove (delta < 0) supervisors in a domain."),
    ApiEntry("workflow", "SpawnAgent", "supervisor", SpawnAgentRequest, AgentResult,
             "Spawn an agent under a supervisor."),
    ApiEntry("workflow", "BatchSpawnAgents", "supervisor", BatchSpawnRequest, BatchSpawnResult,
             "Spawn N agents under one supervisor in one validation pass (all or nothing, or best effort)."),
    ApiEntry("workflow", "CheckpointAgent", "supervisor", CheckpointRequest, Checkpoint,
             "Checkpoint a running agent (image, parameters, working state)."),
    ApiEntry("workflow", "RestoreAgent", "supervisor", RestoreRequest, LifecycleResult,
             "Start an agent from a checkpoint, also of a stopped agent, also on another supervisor."),
    ApiEntry("workflow", "CloneAgent", "supervisor", CloneRequest, LifecycleResult,
             "A new agent with a copy of a running agent's state and image."),
    ApiEntry("workflow", "UpgradeAgent", "supervisor", UpgradeRequest, LifecycleResult,
             "Switch to a newer signed version, verified and tried first; else the old one keeps running."),
    ApiEntry("workflow", "SpecializeAgent", "supervisor", SpecializeRequest, LifecycleResult,
             "Narrow an agent's intents and parameters within its image (never wider)."),
    ApiEntry("workflow", "MergeAgents", "supervisor", MergeRequest, LifecycleResult,
             "Merge running agents of one domain into one (states combined, allocations summed)."),
    ApiEntry("workflow", "SplitAgent", "supervisor", SplitRequest, LifecycleResult,
             "Split a running agent into N (state dealt out, allocation divided)."),
    ApiEntry("workflow", "CoordinateAgentOperations", "supervisor", CoordinateRequest, CoordinateResult,
             "Operations on one supervisor's agents as one saga, in dependency order, all or none."),
    ApiEntry("workflow", "StopAgent", "supervisor", StopAgentRequest, RemovalResult,
             "Stop an agent cleanly and release its resources."),
    ApiEntry("workflow", "SetPolicy", "orchestrator, manager, supervisor", SetPolicyRequest,
             PolicyChangeResult,
             "Set or dry-run the policy of global, a domain or a supervisor (on the target level's queue)."),
    ApiEntry("workflow", "AllocateResources", "supervisor", AllocateRequest, AllocationResult,
             "More resources for an agent: its supervisor's pool, else borrowed from its domain, else global."),
    ApiEntry("workflow", "ReleaseResources", "supervisor", ReleaseRequest, ReleaseResult,
             "Give an allocation back; each part returns to the level it came from, exactly once."),
    ApiEntry("workflow", "BalanceSupervisorLoad", "manager", BalanceRequest, BalanceResult,
             "Move free nominal capacity between a domain's supervisors toward those that borrow."),
    ApiEntry("workflow", "ReclaimResources", "orchestrator, manager", ReclaimRequest, ReclaimResult,
             "A level asks back capacity it lent out: idle borrowers first, then refuse or preempt."),
    ApiEntry("workflow", "EnforceAgentQuotas", "supervisor", QuotaWatch, QuotaOutcome,
             "Act on one agent's overuse after the grace (started by its supervisor)."),
    ApiEntry("workflow", "Orchestrator", "orchestrator", LevelInput, LevelView,
             "The orchestrator entity (id 'orchestrator')."),
    ApiEntry("workflow", "Manager", "manager", LevelInput, LevelView, "A manager entity (id 'manager/<domain>')."),
    ApiEntry("workflow", "Supervisor", "supervisor", LevelInput, LevelView,
             "A supervisor entity (id 'supervisor/<domain>/<name>')."),
    ApiEntry("workflow", "Agent", "agent", AgentInput, AgentState, "An agent entity (id 'agent/<domain>/<name>')."),
    ApiEntry("update", "register_child", _ENTITIES, RegisterChild, RegisterResult, "Admit a child."),
    ApiEntry("update", "register_children", _ENTITIES, RegisterChildren, RegisterChildrenResult,
             "Admit a batch of agents in one step."),
    ApiEntry("update", "reconfigure_child", _ENTITIES, ReconfigureChild, ReconfigureResult,
             "Resize or re-police a child."),
    ApiEntry("update", "begin_child_removal", _ENTITIES, ChildRef, ChildView, "Mark a child as being removed."),
    ApiEntry("update", "cancel_child_removal", _ENTITIES, ChildRef, ChildLookup, "Undo begin_child_removal."),
    ApiEntry("update", "unregister_child", _ENTITIES, ChildRef, UnregisterResult, "Forget a child, return its slice."),
    ApiEntry("update", "configure", _ENTITIES, ConfigureLevel, LevelView, "Change own capacity or policy."),
    ApiEntry("update", "begin_removal", _ENTITIES, BeginRemoval, RemovalPlan, "Prepare to close."),
    ApiEntry("update", "cancel_removal", _ENTITIES, BeginRemoval, LevelView, "Undo begin_removal."),
    ApiEntry("update", "close", _ENTITIES, BeginRemoval, LevelView, "Close an empty, removing level."),
    ApiEntry("update", "admit_agents", _ENTITIES, AdmitAgents, AdmitResult,
             "Judge an operation that adds agents by this level's policy and count them in."),
    ApiEntry("update", "release_agents", _ENTITIES, ReleaseAgents, AdmitResult, "Count agents out."),
    ApiEntry("update", "set_policy", _ENTITIES, SetPolicy, Policy, "Replace this level's policy (version + 1)."),
    ApiEntry("update", "reserve", _ENTITIES, Reserve, ReserveResult,
             "Take this level's share of an allocation; the rest is left to borrow from the parent."),
    ApiEntry("update", "release_grants", _ENTITIES, ReleaseGrants, ReleasedGrants,
             "Return allocations to this level's pool (exactly once)."),
    ApiEntry("update", "set_reclaiming", _ENTITIES, Reclaiming, PoolView,
             "Begin or end wanting lent capacity back (no new loans meanwhile)."),
    ApiEntry("update", "transfer_capacity", _ENTITIES, TransferCapacity, ReconfigureResult,
             "Move nominal capacity between two children's slices."),
    ApiEntry("update", "mark_quota", _ENTITIES, QuotaMark, ChildView, "Record the quota action taken on an agent."),
    ApiEntry("update", "record_agent_failure", _ENTITIES, AgentFailure, LevelView,
             "Managers: record an agent its supervisor gave up on (restarts exhausted)."),
    ApiEntry("query", "grant", _ENTITIES, ChildRef, GrantLookup, "This level's share of one allocation (by key)."),
    ApiEntry("query", "dependents", _ENTITIES, ChildRef, AgentList,
             "Managers: the agents that depend on an agent (its key as the name)."),
    ApiEntry("query", "pool", _ENTITIES, None, PoolView, "This level's pool."),
    ApiEntry("query", "link", _ENTITIES, None, ChainLink, "This level as a link of a policy chain."),
    ApiEntry("query", "ledger", _ENTITIES, None, LedgerSnapshot, "Every allocation share at this level."),
    ApiEntry("query", "child", _ENTITIES, ChildRef, ChildLookup, "One child by name."),
    ApiEntry("query", "judge", _ENTITIES, PolicyCheck, Verdict, "This level's verdict on an operation (what-if)."),
    ApiEntry("signal", "child_report", _ENTITIES, LevelSummary, None, "An upward report from a child."),
    ApiEntry("query", "describe", _ENTITIES, None, LevelView, "The common ManagementLevel face."),
    ApiEntry("update", "stop", "Agent", StopAgent, AgentState, "Stop the agent cleanly."),
    ApiEntry("query", "describe", "Agent", None, AgentState, "The agent's state."),
    ApiEntry("update", "report_usage", "Agent", UsageReport, AgentState,
             "What the runtime measured the agent using; its supervisor checks it against the allocation."),
    ApiEntry("update", "throttle", "Agent", Throttle, AgentState, "Throttle the agent (quota enforcement)."),
    ApiEntry("update", "checkpoint", "Agent", TakeCheckpoint, Checkpoint, "A checkpoint of the agent as it is."),
    ApiEntry("update", "switch_image", "Agent", SwitchImage, AgentState,
             "Run another verified image (upgrade, specialize)."),
    ApiEntry("update", "request_operation", "Agent", SelfRequest, SelfRequestResult,
             "The agent asks its supervisor to checkpoint, clone, split or stop it (requestLifecycleOperation)."),
    ApiEntry("update", "execute_task", "Agent", TaskInput, TaskResult,
             "Run a task of the agent's image in a child process under its allocation (executeTask)."),
)


def _schema(model: type[BaseModel] | None, mode: str) -> dict[str, Any] | None:
    if model is None:
        return None
    return TypeAdapter(model).json_schema(mode="validation" if mode == "input" else "serialization")


def export_schemas() -> list[dict[str, Any]]:
    """Every public entry with the JSON Schema of its input and output."""
    return [{"kind": e.kind, "name": e.name, "on": e.on, "summary": e.summary,
             "input": _schema(e.input, "input"), "output": _schema(e.output, "output")}
            for e in PUBLIC_API]


def file_name(entry: dict[str, Any]) -> str:
    """A file name for one entry: ``workflow.CreateDomain.json``, ``update.Agent.stop.json``."""
    on = "entity" if "," in entry["on"] else entry["on"]
    if entry["kind"] == "workflow":
        return f"workflow.{entry['name']}.json"
    return f"{entry['kind']}.{on}.{entry['name']}.json"
