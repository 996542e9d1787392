"""Malformed input from an untyped client (the ``temporal`` CLI) fails a workflow at once, naming the field.

Workflow inputs are pydantic models; a payload that does not validate must fail the workflow with a
non-retryable error on its first task (``failure_exception_types``), not leave it retrying its
workflow task forever. Plain JSON that does validate works from the same CLI.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from tests.conftest import domain_name
from tetrarch.errors import InvalidRequest
from tetrarch.models import PoolView
from tetrarch.operations import CreateDomainRequest, RemoveDomainRequest
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient, error_from_failure
from tetrarch_cli.server import temporal_binary


async def temporal_cli(env: WorkflowEnvironment, *args: str) -> tuple[int, str, str]:
    """Run the ``temporal`` CLI against the session server without blocking the workers' event loop."""
    proc = await asyncio.create_subprocess_exec(
        str(temporal_binary()), *args, "--address", env.client.service_client.config.target_host,
        "--namespace", env.client.namespace,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_from_cli(env: WorkflowEnvironment, workflow_type: str, task_queue: str,
                         payload: Any) -> str:
    """``temporal workflow start`` with plain JSON input; returns the workflow id."""
    wf_id = f"bad-input/{workflow_type}/{uuid.uuid4().hex[:8]}"
    rc, out, err = await temporal_cli(env, "workflow", "start", "--type", workflow_type,
                                      "--task-queue", task_queue, "--workflow-id", wf_id,
                                      "--input", json.dumps(payload))
    assert rc == 0, f"temporal workflow start failed: {out}\n{err}"
    return wf_id


async def ledger(tc: TetrarchClient) -> list[tuple[str, str, Resources]]:
    """The orchestrator's domains: name, status and slice."""
    return [(c.name, c.status.value, c.resources) for c in await tc.list_domains()]


BAD_INPUTS = [
    pytest.param("CreateDomain", "orchestrator", {"domain": "x", "resources": {"cpu": "lots"}}, "cpu",
                 id="bad-quantity"),
    pytest.param("RemoveDomain", "orchestrator", {"domain": "x", "drain": "maybe"}, "drain",
                 id="wrong-type"),
    pytest.param("CreateSupervisor", "manager", {"domain": "x", "name": ["s1"]}, "name",
                 id="wrong-type-list"),
    pytest.param("CreateDomain", "orchestrator", {"domain": "x", "colour": "red"}, "colour",
                 id="unknown-field"),
    pytest.param("SpawnAgent", "supervisor", {"domain": "x", "supervisor": "s"}, "name",
                 id="missing-field"),
    pytest.param("ScaleSupervisors", "manager", {"domain": "x", "delta": "many"}, "delta",
                 id="wrong-type-int"),
    pytest.param("Manager", "manager", {"level_state": {"level": "boss", "name": "x"}}, "level",
                 id="entity-bad-enum"),
    pytest.param("Agent", "agent", {"agent_state": {"spec": {"domain": "x"}}}, "supervisor",
                 id="entity-missing-field"),
]


@pytest.mark.parametrize(("workflow_type", "level", "payload", "field"), BAD_INPUTS)
async def test_malformed_input_fails_fast(env: WorkflowEnvironment, client: Client, prefix: str,
                                          tc: TetrarchClient, workflow_type: str, level: str, payload: Any,
                                          field: str) -> None:
    """The workflow fails on its first task with a non-retryable error whose message names the field."""
    domains_before = await ledger(tc)
    wf_id = await start_from_cli(env, workflow_type, f"{prefix}{level}", payload)
    handle = client.get_workflow_handle(wf_id)

    # A workflow retrying its task would never finish; the limit only turns that hang into a failure.
    with pytest.raises(WorkflowFailureError) as e:
        await asyncio.wait_for(handle.result(), timeout=20)
    cause = e.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.non_retryable is True
    assert field in cause.message, cause.message
    assert (await handle.describe()).status is WorkflowExecutionStatus.FAILED

    events = [ev.event_type for ev in (await handle.fetch_history()).events]
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in events, "the bad input was retried"
    assert events[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED

    # The project's client reads it as a refused request naming the field.
    err = error_from_failure(e.value)
    assert isinstance(err, InvalidRequest) and field in err.message
    assert await ledger(tc) == domains_before, "bad input changed nothing"


async def test_plain_json_from_the_cli_works(env: WorkflowEnvironment, tc: TetrarchClient, prefix: str) -> None:
    """``temporal workflow execute`` with plain JSON creates a domain, as the typed client would."""
    d = domain_name("cli")
    payload = {"domain": d, "resources": {"cpu": 10, "memory": "10Gi"}}
    rc, out, err = await temporal_cli(env, "workflow", "execute", "--type", "CreateDomain",
                                      "--task-queue", f"{prefix}orchestrator", "--workflow-id", f"cli/{d}",
                                      "--input", json.dumps(payload), "--output", "json")
    assert rc == 0, f"{out}\n{err}"
    assert d in out and "manager/" in out

    ten = Resources.of(cpu=10, memory="10Gi")
    assert (await tc.domain_status(d)).pool == PoolView(capacity=ten, granted=Resources(), free=ten)
    assert any(c.name == d and c.resources == ten for c in await tc.list_domains())
    # The same definition through the typed client is the same domain.
    assert (await tc.create_domain(CreateDomainRequest(domain=d, resources=ten))).created is False
    await tc.remove_domain(RemoveDomainRequest(domain=d))
