"""Replay recorded histories against today's workflow code: a change that breaks them is non-deterministic.

The histories under ``tests/histories/`` were recorded from real runs (``tests/histories/record.py``
regenerates them). Each must replay with the workers' own sandbox and data converter and no
replay failure; a deliberately changed workflow must fail, so the guard itself is known to work.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from tetrarch.names import Level
from tetrarch.operations import CreateDomainRequest, DomainResult
from worker.registry import ALL_WORKFLOWS
from worker.run import workflow_runner

HISTORIES = Path(__file__).resolve().parent.parent / "histories"
INDEX: dict[str, dict[str, str]] = json.loads((HISTORIES / "index.json").read_text())


def load(name: str) -> WorkflowHistory:
    """A recorded history with the workflow id it ran under (operations derive child ids from it)."""
    return WorkflowHistory.from_json(INDEX[name]["workflow_id"], (HISTORIES / name).read_text())


def replayer(level: str = "") -> Replayer:
    """A replayer configured like the workers.

    A replayer runs its workflows on the queue ``replay-<build id>``. Operations call entities on
    another level's queue through local activities and their own level's through activities
    (``workflows.steps``), judged by the queue they run on; naming the build id after the level a
    history ran at gives the replay the same view of its queue as the worker had.
    """
    return Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter,
                    workflow_runner=workflow_runner(), build_id=level or None)


def level_of(history: WorkflowHistory) -> str:
    """The level whose queue a recorded workflow ran on (``<prefix><level>``)."""
    queue = history.events[0].workflow_execution_started_event_attributes.task_queue.name
    return next((lv.value for lv in Level if queue.endswith(lv.value)), "")


def test_recorded_histories_are_all_indexed() -> None:
    """Every history file is indexed, and the set covers the kinds this guard promises."""
    files = {p.name for p in HISTORIES.glob("*.json")} - {"index.json"}
    assert files == set(INDEX)
    assert {meta["workflow_type"] for meta in INDEX.values()} >= {"CreateDomain", "RemoveSupervisor", "Manager",
                                                                   "Agent"}
    manager = load("manager_continued_as_new.json")
    assert manager.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    updates = [e for e in manager.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED]
    assert updates, "the manager history holds the Updates it handled"
    drain = load("remove_supervisor_drain.json")
    assert any(e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED for e in drain.events)
    for name in INDEX:  # a supervisor's history grows with its failure-check rounds, hence the margin
        assert len(load(name).events) < 250, f"{name} should stay small"


def _calls(name: str) -> tuple[int, int]:
    """(local activity markers, activities scheduled on another level's queue) in a recorded history."""
    history = load(name)
    own = history.events[0].workflow_execution_started_event_attributes.task_queue.name
    markers = sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
                  and e.marker_recorded_event_attributes.marker_name == "core_local_activity")
    elsewhere = sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                    and e.activity_task_scheduled_event_attributes.task_queue.name != own)
    return markers, elsewhere


@pytest.mark.parametrize("name", ["spawn_agent.json", "allocate_from_global.json", "create_domain.json"])
def test_both_shapes_of_entity_calls_are_recorded(name: str) -> None:
    """Today's operations reach other levels' entities through local activities; the same operation
    recorded before that change scheduled activities on those levels' queues, and both replay (the patch)."""
    markers, elsewhere = _calls(name)
    assert markers > 0 and elsewhere == 0, (name, markers, elsewhere)
    markers, elsewhere = _calls(f"before_local_calls_{name}")
    assert markers == 0 and elsewhere > 0, (name, markers, elsewhere)


@pytest.mark.parametrize("name", sorted(INDEX))
async def test_history_replays(name: str) -> None:
    """Today's code makes the same decisions as the code that recorded the history."""
    history = load(name)
    result = await replayer(level_of(history)).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{name}: {result.replay_failure!r}"


async def test_all_histories_replay_together() -> None:
    """One replayer over every history (as a CI job would run it) reports no failure."""
    by_level: dict[str, list[WorkflowHistory]] = {}
    for name in sorted(INDEX):
        history = load(name)
        by_level.setdefault(level_of(history), []).append(history)

    for level, group in by_level.items():
        async def histories(group: list[WorkflowHistory] = group) -> AsyncIterator[WorkflowHistory]:
            for history in group:
                yield history

        results = await replayer(level).replay_workflows(histories(), raise_on_replay_failure=False)
        assert dict(results.replay_failures) == {}, level


@workflow.defn(name="CreateDomain", sandboxed=False)
class ChangedCreateDomain:
    """CreateDomain as a careless change would leave it: a new first step (a timer) before the old ones."""

    @workflow.run
    async def run(self, req: CreateDomainRequest) -> DomainResult:
        await workflow.sleep(timedelta(seconds=1))
        raise RuntimeError("never reached in replay")


async def test_a_changed_workflow_fails_replay() -> None:
    """The guard works: a CreateDomain that issues other commands than recorded is caught."""
    changed = Replayer(workflows=[ChangedCreateDomain], data_converter=pydantic_data_converter,
                       workflow_runner=UnsandboxedWorkflowRunner())
    result = await changed.replay_workflow(load("create_domain.json"), raise_on_replay_failure=False)
    assert result.replay_failure is not None
