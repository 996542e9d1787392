"""The hierarchy seen from the ``temporal`` CLI: search attributes, and operations started with plain JSON.

``up`` registers the project's search attributes and every entity tags itself with its level,
domain and supervisor (agents also with their status), so ``temporal workflow list --query``
slices the hierarchy. Visibility is eventually consistent: every listing is polled.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Up, ok, temporal, wait_for, workflow_ids, workflow_list
from tetrarch.names import SearchAttr

pytestmark = pytest.mark.e2e

RESEARCH_ENTITIES = {
    "manager/research", "supervisor/research/sup-1", "supervisor/research/sup-2",
    "agent/research/sup-1-agent-1", "agent/research/sup-1-agent-2",
    "agent/research/sup-2-agent-1", "agent/research/sup-2-agent-2",
}
ALL_AGENTS = {
    "agent/research/sup-1-agent-1", "agent/research/sup-1-agent-2", "agent/research/sup-2-agent-1",
    "agent/research/sup-2-agent-2", "agent/support/sup-1-agent-1", "agent/support/sup-1-agent-2",
    "agent/support/sup-1-agent-3",
}
ENTITY_PREFIXES = ("orchestrator", "manager/", "supervisor/", "agent/")


def entity_ids(address: str, query: str) -> list[str]:
    """Ids of the entity workflows (not operations) a query lists."""
    return [i for i in workflow_ids(workflow_list(address, query)) if i.startswith(ENTITY_PREFIXES)]


def test_domain_query_lists_the_domains_manager_supervisors_and_agents(up_server: Up) -> None:
    a = up_server.address
    ids = wait_for(lambda: entity_ids(a, "Domain='research'"), lambda i: set(i) >= RESEARCH_ENTITIES,
                   timeout=30, what="Domain='research' listing the research entities")
    assert set(ids) == RESEARCH_ENTITIES, "an entity of another domain is tagged research"
    assert len(ids) == len(set(ids)), f"an entity is listed twice: {sorted(ids)}"

    running = entity_ids(a, "Domain='support' AND Supervisor='sup-1' AND ExecutionStatus='Running'")
    assert set(running) == {"supervisor/support/sup-1", "agent/support/sup-1-agent-1",
                            "agent/support/sup-1-agent-2", "agent/support/sup-1-agent-3"}
    # Operations are tagged too: the spawns that applied the hierarchy file.
    spawns = wait_for(lambda: workflow_list(a, "Operation='SpawnAgent' AND Domain='research'"),
                      lambda e: len(e) >= 4, timeout=30, what="SpawnAgent operations in research")
    assert all(e["status"] == "WORKFLOW_EXECUTION_STATUS_COMPLETED" for e in spawns)


def test_level_and_agent_status_query(up_server: Up) -> None:
    # Unquoted: the attribute's name must not be a reserved word of the list-filter grammar
    # (``Level`` was: the parser rejected ``Level='agent'`` as "invalid search attribute: level").
    level = SearchAttr.LEVEL
    ids = wait_for(lambda: entity_ids(up_server.address, f"{level}='agent' AND AgentStatus='running'"),
                   lambda i: set(i) >= ALL_AGENTS, timeout=30, what=f"running agents by {level}")
    assert sorted(ids) == sorted(ALL_AGENTS)
    managers = entity_ids(up_server.address, f"{level}='manager'")
    assert set(managers) == {"manager/research", "manager/support"}
    supervisors = entity_ids(up_server.address, f"{level}='supervisor' AND Domain='research'")
    assert set(supervisors) == {"supervisor/research/sup-1", "supervisor/research/sup-2"}


def test_readme_example_creates_a_domain_from_the_temporal_cli(up_server: Up) -> None:
    a = up_server.address
    r = temporal("workflow", "execute", "--address", a, "--type", "CreateDomain", "--task-queue", "orchestrator",
                 "--workflow-id", "op/create-domain/demo/1",
                 "--input", '{"domain": "demo", "resources": {"cpu": 10, "memory": "10Gi"}}')
    assert r.rc == 0, str(r)
    assert "COMPLETED" in r.stdout, str(r)
    assert '"created":true' in r.stdout.replace(" ", ""), str(r)

    domains = {d["name"]: d for d in ok("domain", "list", address=a)}
    assert "demo" in domains
    assert domains["demo"]["resources"] == {"cpu_millis": 10000, "memory_mib": 10240, "gpu": 0}
    assert ok("domain", "status", "demo", address=a)["pool"]["capacity"]["cpu_millis"] == 10000
    wait_for(lambda: entity_ids(a, "Domain='demo'"), lambda i: "manager/demo" in i, timeout=30,
             what="the demo manager tagged Domain='demo'")


@pytest.mark.parametrize(("wf_id", "payload", "field"), [
    ("op/create-domain/demo-bad/1", '{"domain": "demo-bad", "resources": {"cpu": "lots", "memory": "10Gi"}}',
     "cpu"),
    ("op/create-domain/demo-bad/2", '{"domain": "demo-bad", "resources": {"cpu": 1}, "bogus": 1}', "bogus"),
], ids=["wrong-type", "unknown-field"])
def test_malformed_json_input_fails_the_operation_naming_the_field(up_server: Up, wf_id: str, payload: str,
                                                                    field: str) -> None:
    a = up_server.address
    r = temporal("workflow", "execute", "--address", a, "--type", "CreateDomain", "--task-queue", "orchestrator",
                 "--workflow-id", wf_id, "--input", payload)
    assert r.rc != 0, str(r)
    assert "FAILED" in r.stdout, str(r)
    assert field in r.stdout, f"the failure does not name {field!r}:\n{r}"
    assert "demo-bad" not in {d["name"] for d in ok("domain", "list", address=a)}
