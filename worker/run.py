"""Run the worker of one level, or of all four, until told to stop.

``python -m worker --level manager`` is the manager level's service: it polls the ``manager``
task queue (with the optional prefix) for manager entities, the operations that start at the
manager, and the activities that reach managers. Several processes of the same level can run at
once; Temporal spreads the tasks between them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from tetrarch.names import Level, TaskQueues
from worker.connect import with_project_failures
from worker.registry import WORKFLOWS_BY_LEVEL, activities_for

#: Modules the workflow sandbox passes through instead of re-importing per workflow run: they are
#: deterministic (pure logic and models), and re-importing them per run costs CPU for nothing.
PASSTHROUGH_MODULES = ("tetrarch", "pydantic", "pydantic_core", "annotated_types", "yaml", "runtime",
                       "jsonschema", "jsonschema_specifications", "referencing", "rpds", "attrs", "attr",
                       "cryptography")

#: The project's own workflow and activity modules. Passed through too, a new workflow run no longer
#: re-imports them: its first workflow task took about 20 ms re-importing them and 6 ms without (the
#: agent's, measured from its history), and spawn went from about 75 to 55 ms. They hold no module
#: state that changes, and determinism is proven by the replay tests rather than by the sandbox's
#: import-time checks. ``tetrarch bench`` measures both ways.
PROJECT_MODULES = ("workflows", "activities")


def workflow_runner(pass_project_modules: bool = True) -> SandboxedWorkflowRunner:
    """The sandboxed runner with the project's pure modules (and, by default, its own) passed through."""
    modules = PASSTHROUGH_MODULES + (PROJECT_MODULES if pass_project_modules else ())
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*modules))


def parse_levels(level: str) -> list[Level]:
    """``all`` or one level name."""
    if level == "all":
        return list(Level)
    return [Level(level)]


def build_workers(client: Client, levels: Sequence[Level], prefix: str = "",
                  max_concurrent_activities: int = 200, **options: Any) -> list[Worker]:
    """One worker per level, each on its own task queue.

    The workers use the project's failure converter whatever client they are given, so bad input
    fails workflows and activities for good (see :class:`~worker.connect.ValidationFailureConverter`).
    ``options`` go to every :class:`Worker` (the bench tries other runners and poller counts with them).
    """
    options.setdefault("workflow_runner", workflow_runner())
    queues = TaskQueues(prefix)
    converter = with_project_failures(client.data_converter)
    if converter is not client.data_converter:
        config = client.config()
        config["data_converter"] = converter
        client = Client(**config)
    return [
        Worker(client, task_queue=queues.for_level(level), workflows=list(WORKFLOWS_BY_LEVEL[level]),
               activities=activities_for(level, client), max_concurrent_activities=max_concurrent_activities,
               **options)
        for level in levels
    ]


async def run_workers(client: Client, levels: Sequence[Level], prefix: str = "",
                      stop: asyncio.Event | None = None, **options: Any) -> None:
    """Run the workers until ``stop`` is set (or forever); shut them down cleanly."""
    workers = build_workers(client, levels, prefix, **options)
    async with contextlib.AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
