"""Activities that reach the management levels (orchestrator, managers, supervisors).

The three levels share one face, so one class serves them all; each level's worker registers it
on its own task queue, and an operation workflow routes each call to the queue of the level it
acts on, so that level's worker process is the service that does the work.
"""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy

from activities.calls import domain_error, query, update
from tetrarch.bootstrap import CurrentHierarchy
from tetrarch.calls import (
    AdmitCall,
    ChildCall,
    ConfigureCall,
    JudgeCall,
    ReadHierarchy,
    ReconfigureChildCall,
    RegisterChildCall,
    ReleaseCall,
    RemovalCall,
    SetPolicyCall,
)
from tetrarch.decisions import Verdict
from tetrarch.errors import Conflict, NotFound
from tetrarch.level import AdmitResult, ChildLookup, ReconfigureResult, RegisterResult, RemovalPlan, UnregisterResult
from tetrarch.models import ChildView, LevelRef, LevelView
from tetrarch.names import Level
from tetrarch.operations import LevelInput
from tetrarch.policy import Policy
from workflows.common import DOMAIN_KEY, LEVEL_KEY, SUPERVISOR_KEY
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
        await self.client.start_workflow(
            ENTITY_RUN[st.level], inp, id=st.entity_id, task_queue=activity.info().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(attrs))
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
