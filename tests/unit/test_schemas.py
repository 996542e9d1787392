"""The JSON Schema export covers the whole public API, and agrees with the workflows that serve it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio import workflow

from tetrarch.names import Level
from tetrarch_cli.schemas import PUBLIC_API, export_schemas, file_name
from worker.registry import ALL_WORKFLOWS, WORKFLOWS_BY_LEVEL


def definition(cls: type) -> Any:
    """The Temporal definition that ``@workflow.defn`` attached to a workflow class."""
    defn = getattr(cls, "__temporal_workflow_definition")
    assert isinstance(defn, workflow._Definition)
    return defn


ENTITY_CLASSES = {definition(cls).name: cls for cls in ALL_WORKFLOWS}


@pytest.fixture(scope="module")
def exported() -> list[dict[str, Any]]:
    return export_schemas()


def test_definition_lookup_agrees_with_the_sdk():
    for cls in ALL_WORKFLOWS:
        assert definition(cls) is workflow._Definition.from_class(cls)


def test_every_registered_workflow_is_exported_on_its_level(exported):
    registered: dict[str, set[str]] = {}
    for level, classes in WORKFLOWS_BY_LEVEL.items():
        for cls in classes:
            registered.setdefault(definition(cls).name, set()).add(level.value)
    exported_workflows = {e["name"]: set(e["on"].split(", ")) for e in exported if e["kind"] == "workflow"}
    assert len(registered) == len(ALL_WORKFLOWS) == 29
    assert exported_workflows == registered


def test_every_level_has_a_worker_and_an_entity(exported):
    assert set(WORKFLOWS_BY_LEVEL) == set(Level)
    names = {e["name"] for e in exported if e["kind"] == "workflow"}
    assert {"Orchestrator", "Manager", "Supervisor", "Agent"} <= names


def test_every_entry_has_a_schema(exported):
    assert len(exported) == len(PUBLIC_API)
    for e in exported:
        assert e["kind"] in {"workflow", "update", "query", "signal"}
        assert e["input"] is not None or e["output"] is not None, e["name"]
        assert e["summary"]
        for side in ("input", "output"):
            if e[side] is not None:
                assert e[side]["type"] == "object"
                assert "properties" in e[side]
        json.dumps(e)  # every entry is plain JSON


def test_file_names_are_unique(exported):
    names = [file_name(e) for e in exported]
    assert len(set(names)) == len(names)
    assert "workflow.CreateDomain.json" in names
    assert "update.Agent.stop.json" in names
    assert "update.entity.register_child.json" in names
    assert all(n.endswith(".json") and "/" not in n for n in names)


def _handlers(cls: type) -> dict[tuple[str, str], Any]:
    d = definition(cls)
    out: dict[tuple[str, str], Any] = {}
    for kind, table in (("update", d.updates), ("query", d.queries), ("signal", d.signals)):
        for name, handler in table.items():
            if name is not None:
                out[(kind, name)] = handler
    return out


def _one_arg(arg_types: list[type] | None) -> type | None:
    assert arg_types is not None
    assert len(arg_types) <= 1
    return arg_types[0] if arg_types else None


def test_workflow_inputs_and_outputs_match_the_code():
    for entry in (e for e in PUBLIC_API if e.kind == "workflow"):
        d = definition(ENTITY_CLASSES[entry.name])
        assert _one_arg(d.arg_types) is entry.input, entry.name
        assert d.ret_type is entry.output, entry.name


def test_handlers_are_exported_and_match_the_code():
    """Each handler entry names the entity workflows it lives on, with their exact input and output models."""
    exported: set[tuple[str, str, str]] = set()
    for entry in (e for e in PUBLIC_API if e.kind != "workflow"):
        on = [name.strip() for name in entry.on.split(",")]
        for wf_name in on:
            handler = _handlers(ENTITY_CLASSES[wf_name]).get((entry.kind, entry.name))
            assert handler is not None, f"{entry.kind} {entry.name} is not on {wf_name}"
            assert _one_arg(handler.arg_types) is entry.input, (wf_name, entry.name)
            ret = getattr(handler, "ret_type", None)  # signals return nothing
            assert (None if ret is type(None) else ret) is entry.output, (wf_name, entry.name)
            exported.add((wf_name, entry.kind, entry.name))
    # and nothing a workflow handles is left out of the export
    for wf_name, cls in ENTITY_CLASSES.items():
        for kind, name in _handlers(cls):
            assert (wf_name, kind, name) in exported, f"{wf_name} {kind} {name} is not exported"


def test_input_schemas_validate_like_the_models(exported):
    by_name = {(e["kind"], e["on"], e["name"]): e for e in exported}
    create = by_name[("workflow", "orchestrator", "CreateDomain")]["input"]
    assert "domain" in create["required"]
    assert create.get("additionalProperties") is False
    register = by_name[("update", "Orchestrator, Manager, Supervisor", "register_child")]["input"]
    assert set(register["required"]) == {"request_id", "name"}


def test_every_model_is_a_pydantic_model():
    for entry in PUBLIC_API:
        for model in (entry.input, entry.output):
            assert model is None or issubclass(model, BaseModel)
