"""The Python client: every management operation and status read, as typed calls.

Operations run as workflows on the task queue of the level where they start, with ids that say
what they are (``op/create-domain/<domain>/<request>``) so they are easy to find in the Web UI.
Status reads are Queries on the entities (the fast path: no workflow, no policy round trip).
A refused operation raises the typed :class:`~tetrarch.errors.TetrarchError` the refusing level
raised, with its code, level, message and problems.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import QueryRejectCondition, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from tetrarch.agent import AgentState, Checkpoint, TaskInput, TaskResult, UsageReport
from tetrarch.bootstrap import HierarchySpec
from tetrarch.decisions import Decision, PolicyCheck, Verdict
from tetrarch.errors import ErrorInfo, InvalidRequest, NotFound, TetrarchError, error_from_info
from tetrarch.level import ChildLookup, ChildRef
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
from tetrarch.models import ChildView, LevelRef, LevelView, PoolView
from tetrarch.names import Level, TaskQueues
from tetrarch.operations import (
    AgentResult,
    ApplyResult,
    BatchSpawnRequest,
    BatchSpawnResult,
    ConfigureDomainRequest,
    ConfigureSupervisorRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    DomainResult,
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
    SystemStatus,
)
from tetrarch.pools import AuditReport, LedgerSnapshot, audit
from tetrarch.resource_ops import (
    AllocateRequest,
    AllocationResult,
    AllocationsView,
    BalanceRequest,
    BalanceResult,
    PoolsView,
    ReclaimRequest,
    ReclaimResult,
    ReleaseRequest,
    ReleaseResult,
)
from tetrarch.resources import Resources
from workflows.agent import AgentWorkflow
from workflows.agents import SpawnAgentWorkflow, StopAgentWorkflow
from workflows.batch import BatchSpawnAgentsWorkflow
from workflows.bootstrap import ApplyHierarchyWorkflow
from workflows.coordination import CoordinateAgentOperationsWorkflow
from workflows.domains import ConfigureDomainWorkflow, CreateDomainWorkflow, RemoveDomainWorkflow
from workflows.levels import ManagementEntity
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
    ReclaimResourcesWorkflow,
    ReleaseResourcesWorkflow,
)
from workflows.supervisors import (
    ConfigureSupervisorWorkflow,
    CreateSupervisorWorkflow,
    RemoveSupervisorWorkflow,
    ScaleSupervisorsWorkflow,
)

R = TypeVar("R", bound=BaseModel)


def error_from_failure(err: WorkflowFailureError) -> TetrarchError:
    """The domain error behind a failed operation workflow."""
    cause: BaseException | None = err.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = cause.__cause__ or getattr(cause, "cause", None)
    if isinstance(cause, ApplicationError):
        if cause.details:
            detail = cause.details[0]
            try:
                return error_from_info(detail if isinstance(detail, ErrorInfo)
                                       else ErrorInfo.model_validate(detail))
            except Exception:  # details of another shape: fall through to the message
                pass
        if cause.type == "ValidationError":
            return InvalidRequest(cause.message, level="workflow")
        generic = TetrarchError(cause.message, level="workflow")
        generic.code = cause.type or "Error"
        return generic
    return TetrarchError(str(err.cause or err), level="workflow")


class TetrarchClient:
    """Typed access to the hierarchy for programs, the CLI and tests."""

    def __init__(self, client: Client, prefix: str = "") -> None:
        self.client = client
        self.queues = TaskQueues(prefix)

    # -- plumbing -----------------------------------------------------------------------------------

    async def _execute(self, run: Any, req: BaseModel, level: Level, kind: str, target: str,
                       result_type: type[R]) -> R:
        rid = getattr(req, "request_id", "") or uuid.uuid4().hex[:12]
        if hasattr(req, "request_id"):
            req = req.model_copy(update={"request_id": rid})
        return await self._once(run, req, f"op/{kind}/{target}/{rid}", level, result_type)

    async def _once(self, run: Any, req: BaseModel, wf_id: str, level: Level, result_type: type[R]) -> R:
        """Run an operation exactly once per workflow id: a repeated request id gets the first outcome.

        A request still running is joined; one that already finished is not run again (the id may
        not be reused) and its recorded result or failure is returned instead.
        """
        try:
            handle = await self.client.start_workflow(
                run, req, id=wf_id, task_queue=self.queues.for_level(level), result_type=result_type,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
        except WorkflowAlreadyStartedError:
            handle = self.client.get_workflow_handle(wf_id, result_type=result_type)
        try:
            return await handle.result()  # type: ignore[no-any-return]
        except WorkflowFailureError as e:
            raise error_from_failure(e) from None

    async def _query(self, target: LevelRef, method: Any, result_type: type[R]) -> R:
        handle: WorkflowHandle[Any, Any] = self.client.get_workflow_handle(target.entity_id)
        missing = NotFound(f"{target.describe()} does not exist (no running {target.entity_id})",
                           level="client", entity=target.entity_id)
        try:  # one round trip: the server refuses the query if the entity is closed
            return await handle.query(  # type: ignore[no-any-return]
                method, result_type=result_type, reject_condition=QueryRejectCondition.NOT_OPEN)
        except WorkflowQueryRejectedError:
            raise missing from None
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise missing from None
            raise

    # -- hierarchy ----------------------------------------------------------------------------------

    async def apply(self, spec: HierarchySpec, request_id: str = "") -> ApplyResult:
        """Apply a hierarchy file (idempotent)."""
        rid = request_id or uuid.uuid4().hex[:12]
        return await self._once(ApplyHierarchyWorkflow.run, spec, f"op/apply-hierarchy/{rid}", Level.ORCHESTRATOR,
                                ApplyResult)

    async def create_domain(self, req: CreateDomainRequest) -> DomainResult:
        """Create a domain (a manager) with a pool carved from the global pool."""
        return await self._execute(CreateDomainWorkflow.run, req, Level.ORCHESTRATOR, "create-domain",
                                   req.domain, DomainResult)

    async def configure_domain(self, req: ConfigureDomainRequest) -> DomainResult:
        """Resize a domain or replace its policy."""
        return await self._execute(ConfigureDomainWorkflow.run, req, Level.ORCHESTRATOR, "configure-domain",
                                   req.domain, DomainResult)

    async def remove_domain(self, req: RemoveDomainRequest) -> RemovalResult:
        """Remove a domain (drain to remove its supervisors and agents first)."""
        return await self._execute(RemoveDomainWorkflow.run, req, Level.ORCHESTRATOR, "remove-domain",
                                   req.domain, RemovalResult)

    async def create_supervisor(self, req: CreateSupervisorRequest) -> SupervisorResult:
        """Create a supervisor in a domain."""
        return await self._execute(CreateSupervisorWorkflow.run, req, Level.MANAGER, "create-supervisor",
                                   f"{req.domain}/{req.name}", SupervisorResult)

    async def configure_supervisor(self, req: ConfigureSupervisorRequest) -> SupervisorResult:
        """Resize a supervisor or replace its policy."""
        return await self._execute(ConfigureSupervisorWorkflow.run, req, Level.MANAGER,
                                   "configure-supervisor", f"{req.domain}/{req.name}", SupervisorResult)

    async def remove_supervisor(self, req: RemoveSupervisorRequest) -> RemovalResult:
        """Remove a supervisor (drain to stop its agents first)."""
        return await self._execute(RemoveSupervisorWorkflow.run, req, Level.MANAGER, "remove-supervisor",
                                   f"{req.domain}/{req.name}", RemovalResult)

    async def scale_supervisors(self, req: ScaleSupervisorsRequest) -> ScaleResult:
        """Add or remove N supervisors in a domain."""
        return await self._execute(ScaleSupervisorsWorkflow.run, req, Level.MANAGER, "scale-supervisors",
                                   req.domain, ScaleResult)

    async def spawn_agent(self, req: SpawnAgentRequest) -> AgentResult:
        """Spawn an agent under a supervisor."""
        return await self._execute(SpawnAgentWorkflow.run, req, Level.SUPERVISOR, "spawn-agent",
                                   f"{req.domain}/{req.name}", AgentResult)

    async def batch_spawn(self, req: BatchSpawnRequest) -> BatchSpawnResult:
        """Spawn N agents under one supervisor in one validation pass (all or nothing, or best effort)."""
        return await self._execute(BatchSpawnAgentsWorkflow.run, req, Level.SUPERVISOR, "batch-spawn",
                                   req.domain, BatchSpawnResult)

    async def checkpoint_agent(self, req: CheckpointRequest) -> Checkpoint:
        """Checkpoint a running agent (its image, parameters and working state)."""
        return await self._execute(CheckpointAgentWorkflow.run, req, Level.SUPERVISOR, "checkpoint",
                                   f"{req.domain}/{req.name}", Checkpoint)

    async def restore_agent(self, req: RestoreRequest) -> LifecycleResult:
        """Start an agent from a checkpoint (of itself once stopped, or of another agent)."""
        return await self._execute(RestoreAgentWorkflow.run, req, Level.SUPERVISOR, "restore",
                                   f"{req.domain}/{req.name}", LifecycleResult)

    async def clone_agent(self, req: CloneRequest) -> LifecycleResult:
        """A new agent with a copy of a running agent's state and image."""
        return await self._execute(CloneAgentWorkflow.run, req, Level.SUPERVISOR, "clone",
                                   f"{req.domain}/{req.name}", LifecycleResult)

    async def upgrade_agent(self, req: UpgradeRequest) -> LifecycleResult:
        """Switch a running agent to a newer signed version of its image, tried first."""
        return await self._execute(UpgradeAgentWorkflow.run, req, Level.SUPERVISOR, "upgrade",
                                   f"{req.domain}/{req.name}", LifecycleResult)

    async def specialize_agent(self, req: SpecializeRequest) -> LifecycleResult:
        """Narrow a running agent's intents and parameters within its image."""
        return await self._execute(SpecializeAgentWorkflow.run, req, Level.SUPERVISOR, "specialize",
                                   f"{req.domain}/{req.name}", LifecycleResult)

    async def merge_agents(self, req: MergeRequest) -> LifecycleResult:
        """Merge running agents of one domain into a new one; the originals stop once it runs."""
        return await self._execute(MergeAgentsWorkflow.run, req, Level.SUPERVISOR, "merge",
                                   f"{req.domain}/{req.name}", LifecycleResult)

    async def split_agent(self, req: SplitRequest) -> LifecycleResult:
        """Split a running agent into N; the original stops once they run."""
        return await self._execute(SplitAgentWorkflow.run, req, Level.SUPERVISOR, "split",
                                   f"{req.domain}/{req.name}", LifecycleResult)

    async def coordinate(self, req: CoordinateRequest) -> CoordinateResult:
        """Apply operations on one supervisor's agents as one saga, in dependency order, all or none."""
        return await self._execute(CoordinateAgentOperationsWorkflow.run, req, Level.SUPERVISOR, "coordinate",
                                   f"{req.domain}/{req.supervisor}", CoordinateResult)

    async def stop_agent(self, req: StopAgentRequest) -> RemovalResult:
        """Stop an agent cleanly and release its resources."""
        return await self._execute(StopAgentWorkflow.run, req, Level.SUPERVISOR, "stop-agent",
                                   f"{req.domain}/{req.name}", RemovalResult)

    # -- policy -------------------------------------------------------------------------------------

    async def set_policy(self, req: SetPolicyRequest) -> PolicyChangeResult:
        """Set (or dry-run) the policy of the global level, a domain or a supervisor."""
        level = Level.SUPERVISOR if req.supervisor else Level.MANAGER if req.domain else Level.ORCHESTRATOR
        target = "/".join(p for p in (req.domain, req.supervisor) if p) or "global"
        return await self._execute(SetPolicyWorkflow.run, req, level, "set-policy", target, PolicyChangeResult)

    async def check(self, check: PolicyCheck) -> Decision:
        """What-if: every level's verdict on an operation, without doing it (Queries, in parallel).

        The chain runs from the orchestrator down to the check's domain and supervisor; the highest
        level that denies decides, as when the operation runs.
        """
        chain = [LevelRef.orchestrator()]
        if check.domain is not None:
            chain.append(LevelRef.manager(check.domain))
            if check.supervisor is not None:
                chain.append(LevelRef.supervisor(check.domain, check.supervisor))
        verdicts = await asyncio.gather(*(self._query_arg(ref, ManagementEntity.judge, check, Verdict)
                                          for ref in chain))
        for v in verdicts:
            if not v.allowed:
                return Decision(allowed=False, level=v.level, entity=v.entity, rule=v.rule, reason=v.reason,
                                verdicts=list(verdicts))
        return Decision(allowed=True, verdicts=list(verdicts))

    async def _query_arg(self, target: LevelRef, method: Any, arg: Any, result_type: type[R]) -> R:
        handle: WorkflowHandle[Any, Any] = self.client.get_workflow_handle(target.entity_id)
        try:
            return await handle.query(  # type: ignore[no-any-return]
                method, arg, result_type=result_type, reject_condition=QueryRejectCondition.NOT_OPEN)
        except WorkflowQueryRejectedError:
            raise NotFound(f"{target.describe()} does not exist (no running {target.entity_id})",
                           level="client", entity=target.entity_id) from None
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise NotFound(f"{target.describe()} does not exist (no running {target.entity_id})",
                               level="client", entity=target.entity_id) from None
            raise

    async def _agent_update(self, domain: str, agent: str, method: Any, arg: BaseModel,
                            update_id: str | None = None) -> Any:
        """An Update on a running agent; a refusal raises the typed error the agent raised."""
        target = LevelRef.agent(domain, agent)
        await self._query(target, AgentWorkflow.describe, AgentState)  # NotFound if it is not running
        handle: WorkflowHandle[Any, Any] = self.client.get_workflow_handle(target.entity_id)
        try:
            return await handle.execute_update(method, arg, id=update_id)
        except WorkflowUpdateFailedError as e:
            cause = e.cause
            if isinstance(cause, ApplicationError) and cause.details:
                detail = cause.details[0]
                raise error_from_info(detail if isinstance(detail, ErrorInfo)
                                      else ErrorInfo.model_validate(detail)) from None
            raise

    async def execute_task(self, domain: str, agent: str, task: TaskInput) -> TaskResult:
        """Run a task on an agent (an Update on it: the result comes back when the task has run).

        A task refused before running (unknown intent, input not matching the intent's schema, an agent
        that runs no image) raises the typed error; a task that ran and failed returns ``ok=False``.
        """
        rid = task.request_id or uuid.uuid4().hex[:12]
        result: TaskResult = await self._agent_update(
            domain, agent, AgentWorkflow.execute_task, task.model_copy(update={"request_id": rid}), f"task/{rid}")
        return result

    async def request_operation(self, domain: str, agent: str, req: SelfRequest) -> SelfRequestResult:
        """An agent asks its supervisor for an operation on itself; the operation's workflow id comes back."""
        result: SelfRequestResult = await self._agent_update(domain, agent, AgentWorkflow.request_operation, req)
        return result

    async def operation_result(self, workflow_id: str, result_type: type[R]) -> R:
        """Wait for an operation started elsewhere (an agent's own request) and return its result."""
        handle = self.client.get_workflow_handle(workflow_id, result_type=result_type)
        try:
            return await handle.result()  # type: ignore[no-any-return]
        except WorkflowFailureError as e:
            raise error_from_failure(e) from None

    # -- resources ----------------------------------------------------------------------------------

    async def allocate(self, req: AllocateRequest) -> AllocationResult:
        """More resources for an agent: its supervisor's pool, else borrowed from its domain, else global."""
        return await self._execute(AllocateResourcesWorkflow.run, req, Level.SUPERVISOR, "allocate",
                                   f"{req.domain}/{req.agent}", AllocationResult)

    async def release(self, req: ReleaseRequest) -> ReleaseResult:
        """Give an allocation (or every extra allocation) of an agent back, each part where it came from."""
        return await self._execute(ReleaseResourcesWorkflow.run, req, Level.SUPERVISOR, "release",
                                   f"{req.domain}/{req.agent}", ReleaseResult)

    async def balance(self, req: BalanceRequest) -> BalanceResult:
        """Move free nominal capacity between a domain's supervisors toward those that borrow."""
        return await self._execute(BalanceSupervisorLoadWorkflow.run, req, Level.MANAGER, "balance", req.domain,
                                   BalanceResult)

    async def reclaim(self, req: ReclaimRequest) -> ReclaimResult:
        """A level (a domain, or global) asks back capacity it lent out."""
        level = Level.MANAGER if req.domain else Level.ORCHESTRATOR
        return await self._execute(ReclaimResourcesWorkflow.run, req, level, "reclaim", req.domain or "global",
                                   ReclaimResult)

    async def report_usage(self, domain: str, agent: str, used: Resources) -> AgentState:
        """Report what an agent uses (what its runtime measured); its supervisor checks it against its quota."""
        state: AgentState = await self._agent_update(domain, agent, AgentWorkflow.report_usage,
                                                     UsageReport(used=used))
        return state

    async def allocations(self, domain: str, agent: str) -> AllocationsView:
        """An agent's allocations, each with what its supervisor paid and borrowed."""
        state = await self.agent_status(domain, agent)
        sup = LevelRef.supervisor(domain, state.spec.supervisor)
        ledger = await self._query(sup, ManagementEntity.ledger, LedgerSnapshot)
        found = await self._query_arg(sup, ManagementEntity.child, ChildRef(name=agent), ChildLookup)
        if found.child is None:
            raise NotFound(f"supervisor {domain}/{state.spec.supervisor} holds no agent {agent!r}",
                           level="supervisor", entity=sup.entity_id)
        return AllocationsView(domain=domain, supervisor=state.spec.supervisor, agent=found.child,
                               grants=[g for g in ledger.grants if g.child == agent])

    async def ledgers(self, domains: list[str] | None = None) -> list[LedgerSnapshot]:
        """Every level's allocation ledger (orchestrator, managers, supervisors), read at once."""
        orch = await self.describe(LevelRef.orchestrator())
        names = [c.name for c in orch.children if domains is None or c.name in domains]
        refs = [LevelRef.orchestrator(), *(LevelRef.manager(d) for d in names)]
        managers = await asyncio.gather(*(self.describe(LevelRef.manager(d)) for d in names))
        for d, view in zip(names, managers, strict=True):
            refs += [LevelRef.supervisor(d, c.name) for c in view.children]
        return list(await asyncio.gather(*(self._query(r, ManagementEntity.ledger, LedgerSnapshot) for r in refs)))

    async def pools(self, domains: list[str] | None = None) -> PoolsView:
        """Every level's pool: capacity, granted, borrowed, lent, free."""
        refs = [LevelRef.orchestrator()]
        orch = await self.describe(LevelRef.orchestrator())
        names = [c.name for c in orch.children if domains is None or c.name in domains]
        managers = await asyncio.gather(*(self.describe(LevelRef.manager(d)) for d in names))
        for d, view in zip(names, managers, strict=True):
            refs += [LevelRef.manager(d), *(LevelRef.supervisor(d, c.name) for c in view.children)]
        pools = await asyncio.gather(*(self._query(r, ManagementEntity.pool, PoolView) for r in refs))
        return PoolsView(pools={r.entity_id: p for r, p in zip(refs, pools, strict=True)})

    async def audit(self, domains: list[str] | None = None) -> AuditReport:
        """Check conservation across every ledger (meaningful when no operation is running)."""
        return audit(await self.ledgers(domains))

    # -- status (fast path: queries) ------------------------------------------------------------------

    async def describe(self, target: LevelRef) -> LevelView:
        """Any management level's common face."""
        return await self._query(target, ManagementEntity.describe, LevelView)

    async def system_status(self) -> SystemStatus:
        """System-wide counts and resources, as the orchestrator has them from its domains' reports."""
        view = await self.describe(LevelRef.orchestrator())
        agents = view.metrics.agents_by_status
        return SystemStatus(orchestrator=view, domains=len(view.children), supervisors=view.metrics.supervisors,
                            agents_by_status=agents, agents_total=sum(agents.values()))

    async def domain_status(self, domain: str) -> LevelView:
        """A domain's manager view."""
        return await self.describe(LevelRef.manager(domain))

    async def supervisor_status(self, domain: str, name: str) -> LevelView:
        """A supervisor's view."""
        return await self.describe(LevelRef.supervisor(domain, name))

    async def agent_status(self, domain: str, name: str) -> AgentState:
        """An agent's state."""
        return await self._query(LevelRef.agent(domain, name), AgentWorkflow.describe, AgentState)

    async def list_domains(self) -> list[ChildView]:
        """Domains as the orchestrator records them."""
        return (await self.describe(LevelRef.orchestrator())).children

    async def list_supervisors(self, domain: str) -> list[ChildView]:
        """Supervisors of a domain as its manager records them."""
        return (await self.domain_status(domain)).children

    async def list_agents(self, domain: str, supervisor: str) -> list[ChildView]:
        """Agents of a supervisor as it records them."""
        return (await self.supervisor_status(domain, supervisor)).children
