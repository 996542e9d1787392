"""Activities that reach the management levels (orchestrator, managers, supervisors).

The three levels share one face, so one class serves them all; each level's worker registers it
on its own task queue, and an operation workflow routes each call to the queue of the level it
acts on, so that level's worker process is the service that does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.calls import domain_error, query, queue_of, uninterrupted, update
from tetrarch.agent import AgentImage, AgentState
from tetrarch.bootstrap import CurrentHierarchy
from tetrarch.calls import (
    AdmitCall,
    CheckAllocation,
    ChildCall,
    ChildQuery,
    ConfigureCall,
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
    SetPolicyCall,
    StartOperation,
    StartQuotaWatch,
    TransferCall,
)
from tetrarch.decisions import ChainLink, PolicyCheck, Verdict, effective, evaluate
from tetrarch.errors import CapacityExceeded, Conflict, NotFound, PolicyDenied, TetrarchError
from tetrarch.image_store import resolve_image
from tetrarch.images import verify_image
from tetrarch.level import (
    AdmitResult,
    AgentFailure,
    AgentList,
    ChildLookup,
    ChildRef,
    GrantLookup,
    ReconfigureResult,
    RegisterChildrenResult,
    RegisterResult,
    ReleasedGrants,
    RemovalPlan,
    ReserveResult,
    UnregisterResult,
)
from tetrarch.models import ChildStatus, ChildView, LevelRef, LevelView, PoolView
from tetrarch.names import Level
from tetrarch.operations import LevelInput
from tetrarch.placement import Candidate, PlacementInfo
from tetrarch.policy import PlacementStrategy, Policy
from tetrarch.pools import LedgerSnapshot
from tetrarch.resource_ops import AllocationCheck
from workflows.agent import AgentWorkflow
from workflows.common import DOMAIN_KEY, LEVEL_KEY, OPERATION_KEY, SUPERVISOR_KEY
from workflows.levels import ENTITY_RUN, ManagementEntity


class LevelActivities:
    """Calls on management entities, with an injected Temporal client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn
    async def start_level(self, inp: LevelInput) -> LevelView:
        """Start a management entity, or find it running; a running one with another pool is a conflict."""
        st = inp.level_state
        target = LevelRef(level=st.level, domain=st.domain, name=st.name)
        attrs = [SearchAttributePair(LEVEL_KEY, st.level.value)]
        if st.domain is not None:
            attrs.append(SearchAttributePair(DOMAIN_KEY, st.domain))
        if st.level is Level.SUPERVISOR:
            attrs.append(SearchAttributePair(SUPERVISOR_KEY, st.name))
        await uninterrupted(self.client.start_workflow(
            ENTITY_RUN[st.level], inp, id=st.entity_id, task_queue=queue_of(st.level),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(attrs)))
        view = await query(self.client, target, ManagementEntity.describe, LevelView)
        if view.pool.capacity != st.capacity:
            raise domain_error(Conflict(
                f"{st.entity_id} is already running with {view.pool.capacity.human()}, "
                f"not {st.capacity.human()}", level=st.level.value, entity=st.entity_id))
        return view

    @activity.defn
    async def describe_level(self, target: LevelRef) -> LevelView:
        """The entity's ManagementLevel face (NotFound if it is not running)."""
        return await query(self.client, target, ManagementEntity.describe, LevelView)

    @activity.defn
    async def register_child(self, call: RegisterChildCall) -> RegisterResult:
        """Admit a child at the target level."""
        return await update(self.client, call.target, ManagementEntity.register_child, call.request,
                            RegisterResult, call.request.request_id)

    @activity.defn
    async def register_children(self, call: RegisterChildrenCall) -> RegisterChildrenResult:
        """Admit a batch of agents at the target supervisor."""
        return await update(self.client, call.target, ManagementEntity.register_children, call.request,
                            RegisterChildrenResult, call.request.request_id)

    @activity.defn
    async def reconfigure_child(self, call: ReconfigureChildCall) -> ReconfigureResult:
        """Resize or re-police a child at the target level."""
        return await update(self.client, call.target, ManagementEntity.reconfigure_child, call.request,
                            ReconfigureResult, call.request.request_id)

    @activity.defn
    async def begin_child_removal(self, call: ChildCall) -> ChildView:
        """Mark a child of the target as being removed."""
        return await update(self.client, call.target, ManagementEntity.begin_child_removal, call.request,
                            ChildView, call.request.request_id)

    @activity.defn
    async def cancel_child_removal(self, call: ChildCall) -> ChildLookup:
        """Compensation: a child of the target is active again."""
        return await update(self.client, call.target, ManagementEntity.cancel_child_removal, call.request,
                            ChildLookup, call.request.request_id)

    @activity.defn
    async def unregister_child(self, call: ChildCall) -> UnregisterResult:
        """Forget a child of the target and return its slice."""
        return await update(self.client, call.target, ManagementEntity.unregister_child, call.request,
                            UnregisterResult, call.request.request_id)

    @activity.defn
    async def configure_level(self, call: ConfigureCall) -> LevelView:
        """Change the target's own capacity or policy."""
        return await update(self.client, call.target, ManagementEntity.configure, call.request,
                            LevelView, call.request.request_id)

    @activity.defn
    async def begin_removal(self, call: RemovalCall) -> RemovalPlan:
        """The target prepares to close (refused while it has children, unless draining)."""
        return await update(self.client, call.target, ManagementEntity.begin_removal, call.request,
                            RemovalPlan, call.request.request_id)

    @activity.defn
    async def cancel_removal(self, call: RemovalCall) -> LevelView:
        """Compensation: the target admits children again."""
        return await update(self.client, call.target, ManagementEntity.cancel_removal, call.request,
                            LevelView, call.request.request_id)

    @activity.defn
    async def close_level(self, call: RemovalCall) -> LevelView:
        """Close the (empty, removing) target; its workflow completes."""
        return await update(self.client, call.target, ManagementEntity.close, call.request,
                            LevelView, call.request.request_id)

    @activity.defn
    async def admit_agents(self, call: AdmitCall) -> AdmitResult:
        """Judge and count agents in at the target level."""
        return await update(self.client, call.target, ManagementEntity.admit_agents, call.request,
                            AdmitResult, call.request.request_id)

    @activity.defn
    async def release_agents(self, call: ReleaseCall) -> AdmitResult:
        """Count agents out at the target level."""
        return await update(self.client, call.target, ManagementEntity.release_agents, call.request,
                            AdmitResult, call.request.request_id)

    @activity.defn
    async def set_policy(self, call: SetPolicyCall) -> Policy:
        """Replace the target level's policy."""
        return await update(self.client, call.target, ManagementEntity.set_policy, call.request,
                            Policy, call.request.request_id)

    @activity.defn
    async def judge(self, call: JudgeCall) -> Verdict:
        """The target level's verdict on an operation (a Query: nothing changes)."""
        return await query(self.client, call.target, ManagementEntity.judge, Verdict, arg=call.check)

    # -- resources ----------------------------------------------------------------------------------

    @activity.defn
    async def reserve(self, call: ReserveCall) -> ReserveResult:
        """Take the target level's share of an allocation."""
        return await update(self.client, call.target, ManagementEntity.reserve, call.request, ReserveResult,
                            call.request.request_id)

    @activity.defn
    async def release_grants(self, call: ReleaseGrantsCall) -> ReleasedGrants:
        """Return allocations to the target level's pool."""
        return await update(self.client, call.target, ManagementEntity.release_grants, call.request,
                            ReleasedGrants, call.request.request_id)

    @activity.defn
    async def set_reclaiming(self, call: ReclaimingCall) -> PoolView:
        """Begin or end a reclaim at the target level."""
        return await update(self.client, call.target, ManagementEntity.set_reclaiming, call.request, PoolView,
                            call.request.request_id)

    @activity.defn
    async def transfer_capacity(self, call: TransferCall) -> ReconfigureResult:
        """Move nominal capacity between two children of the target level."""
        return await update(self.client, call.target, ManagementEntity.transfer_capacity, call.request,
                            ReconfigureResult, call.request.request_id)

    @activity.defn
    async def mark_quota(self, call: QuotaMarkCall) -> ChildView:
        """Record the quota action taken on an agent."""
        return await update(self.client, call.target, ManagementEntity.mark_quota, call.request, ChildView,
                            call.request.request_id)

    @activity.defn
    async def read_pool(self, target: LevelRef) -> PoolView:
        """The target level's pool (a Query)."""
        return await query(self.client, target, ManagementEntity.pool, PoolView)

    @activity.defn
    async def read_ledger(self, target: LevelRef) -> LedgerSnapshot:
        """The target level's allocation ledger (a Query)."""
        return await query(self.client, target, ManagementEntity.ledger, LedgerSnapshot)

    @activity.defn
    async def read_child(self, call: ChildQuery) -> ChildLookup:
        """One child of the target level (a Query)."""
        return await query(self.client, call.target, ManagementEntity.child, ChildLookup,
                           arg=ChildRef(name=call.name))

    @activity.defn
    async def check_allocation(self, call: CheckAllocation) -> AllocationCheck:
        """Find the agent's supervisor and read the policies above it (Queries only, at once).

        The supervisor's reserve then judges the whole chain on the agent's live total, so a policy
        refusal comes before anything is reserved; a request above the whole system is refused here.
        """
        supervisor = call.supervisor
        if supervisor is None:
            state = await query(self.client, LevelRef.agent(call.domain, call.agent), AgentWorkflow.describe,
                                AgentState)
            supervisor = state.spec.supervisor
        chain = [LevelRef.orchestrator(), LevelRef.manager(call.domain)]
        links = list(await asyncio.gather(*(query(self.client, t, ManagementEntity.link, ChainLink) for t in chain)))
        short = call.resources.shortfall(links[0].capacity)
        if short:
            raise domain_error(CapacityExceeded(
                f"agent {call.domain}/{call.agent} asks {call.resources.human()}, more than the whole system has "
                "(" + "; ".join(f"{k} {v}" for k, v in short.items()) + ")",
                level=Level.ORCHESTRATOR.value, entity=chain[0].entity_id,
                problems=[f"{k}: {v}" for k, v in short.items()]))
        return AllocationCheck(supervisor=supervisor, above=links)

    @activity.defn
    async def load_image(self, call: LoadImage) -> AgentImage:
        """Find the image, verify its signature against the signers the three levels' policies trust,
        and judge it by their image rules; the supervisor's step of a spawn (and of an upgrade)."""
        chain = [LevelRef.orchestrator(), LevelRef.manager(call.domain), LevelRef.supervisor(call.domain,
                                                                                           call.supervisor)]
        links = list(await asyncio.gather(*(query(self.client, t, ManagementEntity.link, ChainLink) for t in chain)))
        trusted = effective(links).trusted_signers
        try:
            path = resolve_image(call.image)
            verified = await asyncio.to_thread(verify_image, path, trusted)
        except TetrarchError as e:
            e.level = Level.SUPERVISOR.value
            e.entity = chain[2].entity_id
            raise domain_error(e) from None
        decision = evaluate(PolicyCheck(operation=call.operation, domain=call.domain, supervisor=call.supervisor,
                                        agent=call.agent, image=verified.policy_ref()), links)
        if not decision.allowed:
            raise domain_error(PolicyDenied(decision.reason, level=decision.level, entity=decision.entity,
                                            data={"rule": decision.rule}))
        return AgentImage(ref=str(verified.ref), path=str(path.resolve()), digest=verified.digest,
                          signer=verified.signer, manifest=verified.manifest)

    @activity.defn
    async def record_agent_failure(self, req: AgentFailure) -> LevelView:
        """Tell a manager that one of its supervisors gave up on an agent."""
        domain = req.agent.split("/", 1)[0]
        return await update(self.client, LevelRef.manager(domain), ManagementEntity.record_agent_failure, req,
                            LevelView, req.request_id)

    @activity.defn
    async def read_grant(self, call: ChildQuery) -> GrantLookup:
        """The target level's share of one allocation (by key), if it holds one."""
        return await query(self.client, call.target, ManagementEntity.grant, GrantLookup, arg=ChildRef(name=call.name))

    @activity.defn
    async def read_dependents(self, call: ChildQuery) -> AgentList:
        """The agents that depend on one agent, as its domain's manager records them."""
        return await query(self.client, call.target, ManagementEntity.dependents, AgentList,
                           arg=ChildRef(name=call.name))

    @activity.defn
    async def start_operation(self, call: StartOperation) -> str:
        """Start an operation workflow for an entity (an agent's own request); its id either way."""
        queue = queue_of(call.level)
        # Started by an earlier attempt, or a repeated request: the same operation either way.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await uninterrupted(self.client.start_workflow(
                call.workflow, call.input, id=call.workflow_id, task_queue=queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE))
        return call.workflow_id

    @activity.defn
    async def placement_candidates(self, call: PlacementQuery) -> PlacementInfo:
        """The domain's supervisors with their pools, and its placement strategy (Queries only)."""
        manager = await query(self.client, LevelRef.manager(call.domain), ManagementEntity.describe, LevelView)
        active = [c.name for c in manager.children if c.status is ChildStatus.ACTIVE]
        pools = await asyncio.gather(*(query(self.client, LevelRef.supervisor(call.domain, n), ManagementEntity.pool,
                                             PoolView) for n in active), return_exceptions=True)
        candidates = [Candidate(name=n, pool=p) for n, p in zip(active, pools, strict=True)
                      if isinstance(p, PoolView)]
        return PlacementInfo(candidates=candidates,
                             strategy=manager.policy.resources.placement or PlacementStrategy.SPREAD)

    @activity.defn
    async def start_quota_watch(self, call: StartQuotaWatch) -> bool:
        """Start the EnforceAgentQuotas run for one overuse; False if it was already started."""
        w = call.watch
        wid = f"enforce-quotas/{w.domain}/{w.agent}/{int(w.since.timestamp() * 1000)}"
        try:
            handle: WorkflowHandle[Any, Any] = await self.client.start_workflow(
                "EnforceAgentQuotas", w, id=wid, task_queue=queue_of(Level.SUPERVISOR),
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=TypedSearchAttributes([
                    SearchAttributePair(OPERATION_KEY, "EnforceAgentQuotas"),
                    SearchAttributePair(DOMAIN_KEY, w.domain), SearchAttributePair(SUPERVISOR_KEY, w.supervisor)]))
        except WorkflowAlreadyStartedError:
            return False
        return handle.id == wid

    @activity.defn
    async def read_hierarchy(self, req: ReadHierarchy) -> CurrentHierarchy:
        """The orchestrator's view and the views of the named domains' managers, where they exist."""
        current = CurrentHierarchy()
        try:
            current.orchestrator = await query(self.client, LevelRef.orchestrator(), ManagementEntity.describe,
                                               LevelView)
        except Exception as e:
            if not _is_not_found(e):
                raise
            return current
        existing = {c.name for c in current.orchestrator.children}
        for domain in req.domains:
            if domain in existing:
                current.managers[domain] = await query(self.client, LevelRef.manager(domain),
                                                       ManagementEntity.describe, LevelView)
        return current


def _is_not_found(err: BaseException) -> bool:
    from temporalio.exceptions import ApplicationError

    return isinstance(err, ApplicationError) and err.type == NotFound.code
