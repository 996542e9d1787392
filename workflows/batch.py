"""BatchSpawnAgents: N agents under one supervisor in one validation pass (the seed's ``batchSpawnAgents``).

Where N single spawns make 4N level calls, a batch makes four: the orchestrator and the domain count
the whole batch in at once, the supervisor registers (and allocates for) every agent in one Update,
and one activity starts every agent entity. Only agents whose supervisor must borrow add a call each.
All or nothing: any refusal undoes the whole batch. Best effort: each agent is spawned or refused on
its own, up to what the levels' agent limits still admit, and whatever a refused agent took is undone.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.agent import AgentSpec, AgentState
    from tetrarch.decisions import PolicyCheck
    from tetrarch.errors import ErrorInfo, InvalidRequest, error_from_info
    from tetrarch.level import (
        AdmitAgents,
        AdmitResult,
        ChildOutcome,
        RegisterChild,
        RegisterChildren,
        RegisterChildrenResult,
    )
    from tetrarch.level import ReleaseAgents as CountOut
    from tetrarch.models import LevelRef
    from tetrarch.operations import AgentInput, BatchAgentOutcome, BatchSpawnRequest, BatchSpawnResult, EntitySettings
    from tetrarch.policy import DEFAULT_AGENT_RESOURCES, OperationType
    from tetrarch.resources import KINDS, Resources, total

from workflows import steps
from workflows.agents import SpawnAgentWorkflow, first_by_precedence, place_in_domain
from workflows.allocation import escalate, return_borrowed
from workflows.common import (
    DOMAIN_KEY,
    OPERATION_KEY,
    SUPERVISOR_KEY,
    Saga,
    error_info,
    gather_all,
    guarded,
    reraise,
    to_application_error,
)
from workflows.level_ops import request_id


def _largest(items: list[Resources]) -> Resources:
    """Component-wise maximum: what the per-agent rules judge a batch by."""
    return Resources(**{k: max(getattr(r, k) for r in items) for k in KINDS})


@workflow.defn(name="BatchSpawnAgents", failure_exception_types=[pydantic.ValidationError])
class BatchSpawnAgentsWorkflow:
    """Spawn a batch of agents; all or nothing, or each on its own."""

    @workflow.run
    async def run(self, req: BatchSpawnRequest) -> BatchSpawnResult:
        workflow.upsert_search_attributes([OPERATION_KEY.value_set("BatchSpawnAgents"),
                                           DOMAIN_KEY.value_set(req.domain)])
        rid = request_id(req.request_id)
        names = [a.name for a in req.agents]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise to_application_error(InvalidRequest(f"a batch names each agent once; repeated: {', '.join(dupes)}",
                                                      level="supervisor"))
        sup_name = req.supervisor or await self._place(req)
        workflow.upsert_search_attributes([SUPERVISOR_KEY.value_set(sup_name)])
        supervisor = LevelRef.supervisor(req.domain, sup_name)
        default = DEFAULT_AGENT_RESOURCES
        if any(a.resources is None for a in req.agents):
            default = await SpawnAgentWorkflow._default_resources(supervisor)
        resources = {a.name: a.resources or default for a in req.agents}
        check = PolicyCheck(operation=OperationType.BATCH_SPAWN, domain=req.domain, supervisor=sup_name,
                            resources=_largest(list(resources.values())), count=len(req.agents))
        keys = {a.name: f"{req.domain}/{a.name}" for a in req.agents}
        orchestrator, manager = LevelRef.orchestrator(), LevelRef.manager(req.domain)
        saga = Saga()

        async def forward() -> BatchSpawnResult:
            count_out = CountOut(request_id=f"{rid}/undo", agents=list(keys.values()), owner=rid)
            for level in (orchestrator, manager):
                saga.add(f"count the batch out at {level.entity_id}",
                         lambda t=level: steps.release_agents(t, count_out))  # type: ignore[misc]
            saga.add("release the batch", lambda: self._unregister(supervisor, list(keys), rid))
            admit = AdmitAgents(request_id=rid, agents=list(keys.values()), check=check,
                                partial=not req.all_or_nothing)
            children = [RegisterChild(request_id=rid, name=a.name, resources=resources[a.name], escalate=True,
                                      priority=a.priority,
                                      check=check.model_copy(update={"operation": OperationType.SPAWN, "count": 1,
                                                                     "agent": a.name}))
                        for a in req.agents]
            outcomes = await asyncio.gather(
                steps.admit_agents(orchestrator, admit), steps.admit_agents(manager, admit),
                steps.register_children(supervisor, RegisterChildren(request_id=rid, children=children,
                                                                     all_or_nothing=req.all_or_nothing)),
                return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise first_by_precedence(failed)
            top, mid, reg = outcomes
            assert isinstance(top, AdmitResult) and isinstance(mid, AdmitResult)
            assert isinstance(reg, RegisterChildrenResult)
            results = {o.name: o for o in reg.outcomes}
            refused: dict[str, ErrorInfo] = {}
            admitted = set(top.added) & set(mid.added)
            for a in req.agents:
                outcome = results[a.name]
                if outcome.error is not None:
                    refused[a.name] = outcome.error
                elif keys[a.name] not in admitted and outcome.result is not None and outcome.result.created:
                    by = "orchestrator" if keys[a.name] not in top.added else "manager"
                    refused[a.name] = ErrorInfo(code="LimitExceeded", level=by, message=(
                        f"the {by} did not count {a.name!r} in: its max_agents leaves no room, or an agent of "
                        "that name is already counted there (it runs under another supervisor)"))
            if refused and req.all_or_nothing:
                raise to_application_error(error_from_info(next(iter(refused.values()))))
            await self._undo_refused(supervisor, keys, refused, rid)
            refused |= await self._escalate(req, sup_name, results, refused, rid, saga)
            return await self._start(req, sup_name, resources, results, refused, rid, saga)

        try:
            return await guarded(saga, forward())
        except BaseException as e:
            reraise(e)

    @staticmethod
    async def _unregister(supervisor: LevelRef, names: list[str], rid: str, tag: str = "undo") -> None:
        """Forget agents this request registered, and give back above what their allocations borrowed."""
        gone = await gather_all(*(steps.unregister_child(supervisor, n, f"{rid}/{tag}", owner=rid) for n in names))
        await return_borrowed(f"{rid}/{tag}", supervisor.domain or "", [g for r in gone for g in r.grants])

    @staticmethod
    async def _undo_refused(supervisor: LevelRef, keys: dict[str, str], refused: dict[str, ErrorInfo],
                            rid: str) -> None:
        """Best effort: give back at every level what the refused agents of the batch took."""
        if not refused:
            return
        gone = CountOut(request_id=f"{rid}/refused", agents=[keys[n] for n in refused], owner=rid)
        domain = supervisor.domain or ""
        await gather_all(steps.release_agents(LevelRef.orchestrator(), gone),
                         steps.release_agents(LevelRef.manager(domain), gone),
                         BatchSpawnAgentsWorkflow._unregister(supervisor, list(refused), rid, "refused"))

    async def _escalate(self, req: BatchSpawnRequest, sup_name: str, results: dict[str, ChildOutcome],
                        refused: dict[str, ErrorInfo], rid: str, saga: Saga) -> dict[str, ErrorInfo]:
        """Borrow above what the supervisor could not pay, agent by agent (in parallel)."""
        more: dict[str, ErrorInfo] = {}

        async def one(name: str) -> None:
            reg = results[name].result
            grant = reg.grant if reg is not None else None
            if grant is None or grant.request_id != rid or grant.borrowed.is_zero():
                return
            mine = Saga() if not req.all_or_nothing else saga
            try:
                await escalate(mine, rid, grant.key, req.domain, sup_name, grant.borrowed, None, grant.priority,
                               spawn=True)
            except Exception as e:
                if req.all_or_nothing:
                    raise
                await mine.compensate()
                info = error_info(e)
                more[name] = info or ErrorInfo(code="Error", level="manager", message=str(e))

        await gather_all(*(one(a.name) for a in req.agents if a.name not in refused))
        if more:
            await self._undo_refused(LevelRef.supervisor(req.domain, sup_name),
                                     {a.name: f"{req.domain}/{a.name}" for a in req.agents}, more, rid)
        return more

    async def _start(self, req: BatchSpawnRequest, sup_name: str, resources: dict[str, Resources],
                     results: dict[str, ChildOutcome], refused: dict[str, ErrorInfo], rid: str,
                     saga: Saga) -> BatchSpawnResult:
        """Start every admitted agent in one activity, and report one outcome per agent."""
        now = workflow.now()
        todo = [a for a in req.agents if a.name not in refused]
        inputs = []
        for a in todo:
            reg = results[a.name].result
            created = bool(reg is not None and reg.created)
            spec = AgentSpec(domain=req.domain, supervisor=sup_name, name=a.name, resources=resources[a.name],
                             image=a.image, labels=a.labels, request_id=rid if created else "")
            inputs.append(AgentInput(agent_state=AgentState(spec=spec, started_at=now, updated_at=now),
                                     settings=req.settings or EntitySettings()))
        for a in todo:
            target = LevelRef.agent(req.domain, a.name)
            saga.add(f"discard {target.entity_id}", lambda t=target: steps.discard_agent(t, rid))  # type: ignore[misc]
        started = await steps.start_agents(inputs) if inputs else None
        by_name = {s.name: s for s in started.agents} if started is not None else {}
        failed: dict[str, ErrorInfo] = {}
        for a in todo:
            got = by_name[a.name]
            if got.error is not None:
                failed[a.name] = got.error
            elif got.state is not None and got.state.spec.supervisor != sup_name:
                failed[a.name] = ErrorInfo(code="Conflict", level="agent", message=(
                    f"agent {req.domain}/{a.name} already runs under supervisor {got.state.spec.supervisor}"))
        if failed and req.all_or_nothing:
            raise to_application_error(error_from_info(next(iter(failed.values()))))
        if failed:  # best effort: what these agents took goes back
            await self._undo_refused(LevelRef.supervisor(req.domain, sup_name),
                                     {a.name: f"{req.domain}/{a.name}" for a in req.agents}, failed, rid)
        refused = refused | failed
        outcomes = []
        for a in req.agents:
            if a.name in refused:
                outcomes.append(BatchAgentOutcome(name=a.name, spawned=False, error=refused[a.name]))
                continue
            reg = results[a.name].result
            outcomes.append(BatchAgentOutcome(name=a.name, spawned=True, created=bool(reg and reg.created),
                                              agent=reg.child if reg is not None else None))
        spawned = sum(o.spawned for o in outcomes)
        return BatchSpawnResult(domain=req.domain, supervisor=sup_name, spawned=spawned,
                                refused=len(outcomes) - spawned, agents=outcomes)

    @staticmethod
    async def _place(req: BatchSpawnRequest) -> str:
        """The domain places the whole batch where its total fits best."""
        need = total([a.resources or DEFAULT_AGENT_RESOURCES for a in req.agents])
        return await place_in_domain(req.domain, need, req.placement, "the batch")
