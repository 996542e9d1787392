"""detectAgentFailure on a real server: a crashed agent is restarted from its last checkpoint by its
supervisor, at most ``intensity`` times per period; past that it is given up on and its manager reports it."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import eventually, res
from tetrarch.agent import TaskInput
from tetrarch.image_store import DEFAULT_IMAGE_DIR
from tetrarch.lifecycle_ops import CheckpointRequest
from tetrarch.models import AgentStatus, Health
from tetrarch.operations import (
    AgentInput,
    CreateDomainRequest,
    CreateSupervisorRequest,
    EntitySettings,
    RemoveDomainRequest,
    SpawnAgentRequest,
)
from tetrarch.policy import ImagePolicy, Policy, RestartPolicy
from tetrarch_cli.client import TetrarchClient
from workflows.agent import AgentWorkflow

DEMO_KEY = (DEFAULT_IMAGE_DIR / "demo-key.pub").read_text().strip()
TEXT = "Durable workflows survive crashes. Lunch was at noon. Workflows replay their history after crashes."


async def domain(tc: TetrarchClient, tag: str, restart: RestartPolicy) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10), policy=Policy(
        images=ImagePolicy(trusted_signers=frozenset({DEMO_KEY})))))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s", resources=res(4),
                                                       policy=Policy(restart=restart),
                                                       settings=EntitySettings(failure_check_seconds=0.5)))
    return d


async def crash(client: Client, d: str, name: str) -> str:
    handle = client.get_workflow_handle(f"agent/{d}/{name}")
    run = (await handle.describe()).run_id or ""
    await handle.terminate("simulated crash")
    return run


async def test_a_crashed_agent_is_restarted_from_its_last_checkpoint(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "crash", RestartPolicy(intensity=3, period_seconds=60, backoff_seconds=0.1))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", image="summarizer"))
    ok = await tc.execute_task(d, "a", TaskInput(intent="summarize", input={"text": TEXT, "document_id": "d1"}))
    assert ok.ok
    await tc.checkpoint_agent(CheckpointRequest(domain=d, name="a"))
    await tc.execute_task(d, "a", TaskInput(intent="summarize", input={"text": TEXT, "document_id": "d2"}))
    old_run = await crash(client, d, "a")

    async def current_run() -> str:
        return (await client.get_workflow_handle(f"agent/{d}/a").describe()).run_id or ""

    new_run = await eventually(current_run, lambda r: r != old_run, within=20)
    assert new_run != old_run, "the supervisor started the agent again"
    state = await eventually(lambda: tc.agent_status(d, "a"), lambda s: s.status is AgentStatus.RUNNING)
    assert state.status is AgentStatus.RUNNING and state.status_reason == "restarted after a crash"
    assert state.memory == {"work_items": ["d1"]}, "from its last checkpoint (d2 came after it)"
    sup = await tc.supervisor_status(d, "s")
    assert sup.children[0].restarts == 1 and sup.children[0].failed is None
    again = await tc.execute_task(d, "a", TaskInput(intent="summarize", input={"text": TEXT}))
    assert again.ok
    report = await tc.audit([d])
    assert report.ok, report.problems
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_past_its_intensity_an_agent_is_given_up_on_and_reported(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "crashes", RestartPolicy(intensity=1, period_seconds=600, backoff_seconds=0))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", image="calculator"))
    first = await crash(client, d, "a")

    async def run_id() -> str:
        return (await client.get_workflow_handle(f"agent/{d}/a").describe()).run_id or ""

    restarted = await eventually(run_id, lambda r: r != first, within=20)
    assert restarted != first
    await eventually(lambda: tc.agent_status(d, "a"), lambda s: s.status is AgentStatus.RUNNING)
    await crash(client, d, "a")
    dom = await eventually(lambda: tc.domain_status(d), lambda v: bool(v.agent_failures), within=20)
    assert list(dom.agent_failures) == [f"{d}/a"] and "intensity 1" in dom.agent_failures[f"{d}/a"]
    assert dom.health is Health.DEGRADED
    sup = await tc.supervisor_status(d, "s")
    assert sup.children[0].failed is not None and sup.health is Health.DEGRADED
    # Given up on, it is not restarted again; stopping it releases what it held.
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_a_silent_agent_is_restarted(tc: TetrarchClient, client: Client) -> None:
    """An agent whose run no longer makes progress (here: a run on a queue no worker polls, so it never
    reports) is silent; past ``silence_seconds`` its supervisor terminates it and starts it again."""
    d = domain_name("silent")
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10)))
    await tc.create_supervisor(CreateSupervisorRequest(
        domain=d, name="s", resources=res(4), policy=Policy(restart=RestartPolicy(backoff_seconds=0)),
        settings=EntitySettings(failure_check_seconds=0.5, silence_seconds=3)))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", resources=res(1),
                                           settings=EntitySettings(heartbeat_seconds=0.5)))
    await asyncio.sleep(2)
    assert (await tc.supervisor_status(d, "s")).children[0].restarts == 0, "heartbeats keep it alive"

    handle = client.get_workflow_handle(f"agent/{d}/a")
    state = await tc.agent_status(d, "a")
    await handle.terminate("replaced by a hung run")
    hung = await client.start_workflow(AgentWorkflow.run, AgentInput(agent_state=state), id=f"agent/{d}/a",
                                       task_queue="nobody-polls-this-queue")

    async def run_id() -> str:
        return (await handle.describe()).run_id or ""

    restarted = await eventually(run_id, lambda r: r != hung.result_run_id, within=20)
    assert restarted != hung.result_run_id
    back = await eventually(lambda: tc.agent_status(d, "a"), lambda s: s.status is AgentStatus.RUNNING, within=10)
    assert back.status is AgentStatus.RUNNING
    # Restarted once, and then heard from again: its new run keeps its heartbeat and reports after what
    # the supervisor already has, so it is not taken for silent again.
    await asyncio.sleep(5)
    sup = await tc.supervisor_status(d, "s")
    assert sup.children[0].failed is None
    assert sup.children[0].restarts in (1, 2), "one restart (two if the terminate was first seen as a crash)"
    assert (await tc.agent_status(d, "a")).status is AgentStatus.RUNNING
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
