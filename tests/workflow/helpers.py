"""Helpers shared by the workflow tests: resources, waiting on eventually consistent reads, visibility."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.client import Client

from tetrarch.models import LevelView
from tetrarch.resources import Resources
from workflows.common import LEVEL_KEY, OPERATION_KEY

T = TypeVar("T")


def res(cpu: int, gib: int | None = None) -> Resources:
    """``cpu`` cores and ``gib`` GiB (default: as many GiB as cores)."""
    return Resources.of(cpu=cpu, memory=f"{cpu if gib is None else gib}Gi")


def shape(view: LevelView) -> dict[str, Any]:
    """What a refusal must leave unchanged: status, policy, pool and the children's ledger."""
    return {"status": view.status, "policy": view.policy, "pool": view.pool,
            "children": [(c.name, c.status, c.resources) for c in view.children]}


async def eventually(read: Callable[[], Awaitable[T]], ok: Callable[[T], bool], within: float = 10.0) -> T:
    """Read until ``ok`` holds or the timeout passes; return the last value read (the caller asserts)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await read()
        if ok(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.1)


async def running_in_domain(client: Client, domain: str) -> dict[str, tuple[str | None, str | None]]:
    """Running workflows tagged with ``domain``: id -> (Level, Operation) search attributes."""
    out: dict[str, tuple[str | None, str | None]] = {}
    async for wf in client.list_workflows(f"ExecutionStatus='Running' AND Domain='{domain}'"):
        sa = wf.typed_search_attributes
        out[wf.id] = (sa.get(LEVEL_KEY), sa.get(OPERATION_KEY))
    return out


async def assert_only_entities_running(client: Client, domain: str, entities: set[str]) -> None:
    """Visibility shows exactly these entity workflows running in ``domain``, no operation left over."""
    running = await eventually(lambda: running_in_domain(client, domain), lambda r: set(r) == entities)
    assert set(running) == entities, f"running in {domain}: {running}"
    for wf_id, (level, operation) in running.items():
        assert operation is None, f"operation workflow {wf_id} ({operation}) is still running"
        assert level is not None, f"{wf_id} is running without a Level tag"

