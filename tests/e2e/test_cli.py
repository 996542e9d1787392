"""The ``tetrarch`` command line end to end: ``up`` in the background, then real commands against it.

One ``up`` serves the module (the default hierarchy: research with sup-1 and sup-2 of 2 agents
each, support with sup-1 of 3 agents). The first test checks that hierarchy exactly; every later
test works in domains of its own and leaves research and support as they were. Refusals are
checked to change nothing by comparing a snapshot of every entity before and after.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    ROOT,
    Up,
    accounting_problems,
    assert_clean,
    ok,
    snapshot,
    status_counts,
    tetrarch,
    two_free_ports,
    wait_for,
)
from tetrarch.bootstrap import DEFAULT_BOOTSTRAP
from tetrarch.resources import Resources
from tetrarch_cli.server import port_in_use

pytestmark = pytest.mark.e2e


def res(cpu: float | str, memory: str) -> dict[str, int]:
    """A resource vector as the JSON output shows it."""
    return Resources.of(cpu=cpu, memory=memory).model_dump()


def names(children: list[dict[str, Any]]) -> list[str]:
    return sorted(c["name"] for c in children)


def assert_refused(r: Any, code: str, exit_code: int = 1) -> dict[str, Any]:
    """A --json refusal: the exit code, the error code, and no traceback."""
    assert r.rc == exit_code, f"expected exit {exit_code}:\n{r}"
    assert_clean(r)
    err: dict[str, Any] = r.error
    assert err["code"] == code, f"expected {code}:\n{r}"
    assert err["message"]
    return err


# -- the default hierarchy ---------------------------------------------------------------------------


def test_up_reports_ready_and_status_settles_on_the_default_hierarchy(up_server: Up) -> None:
    info = up_server.info
    assert set(info) >= {"address", "namespace", "ui", "ui_workflows", "state_dir", "applied", "status"}
    assert info["address"] == f"127.0.0.1:{up_server.port}"
    assert info["namespace"] == "default"
    assert info["ui"] == f"http://127.0.0.1:{up_server.ui_port}"
    assert info["ui_workflows"] == f"http://127.0.0.1:{up_server.ui_port}/namespaces/default/workflows"
    assert Path(info["state_dir"]) == up_server.state_dir
    assert (up_server.state_dir / "temporal.sqlite").exists()
    assert sorted(info["applied"]["created"]) == sorted([
        "orchestrator", "domain research", "domain support",
        "supervisor research/sup-1", "supervisor research/sup-2", "supervisor support/sup-1",
        "agent research/sup-1-agent-1", "agent research/sup-1-agent-2",
        "agent research/sup-2-agent-1", "agent research/sup-2-agent-2",
        "agent support/sup-1-agent-1", "agent support/sup-1-agent-2", "agent support/sup-1-agent-3"])
    assert info["applied"]["unchanged"] == []

    # Reports flow upward asynchronously: poll until the orchestrator has them all.
    st = wait_for(lambda: ok("status", address=up_server.address),
                  lambda s: s["domains"] == 2 and s["supervisors"] == 3 and s["agents_by_status"] == {"running": 7},
                  timeout=15, what="system status 2 domains / 3 supervisors / 7 running agents")
    assert st["agents_total"] == 7
    by_domain = {c["name"]: c["last_report"] for c in st["orchestrator"]["children"]}
    assert by_domain["research"]["agents_by_status"] == {"running": 4}
    assert by_domain["research"]["supervisors"] == 2
    assert by_domain["support"]["agents_by_status"] == {"running": 3}
    assert by_domain["support"]["supervisors"] == 1
    pool = st["orchestrator"]["pool"]
    assert pool["capacity"] == res(1000, "1Ti")
    assert pool["granted"] == res(200, "200Gi")
    assert pool["free"] == res(800, "824Gi")

    snap = snapshot(up_server.address)
    assert accounting_problems(snap) == []
    assert sorted(snap["supervisors"]) == ["research/sup-1", "research/sup-2", "support/sup-1"]
    assert sorted(snap["agents"]) == sorted([
        "research/sup-1-agent-1", "research/sup-1-agent-2", "research/sup-2-agent-1",
        "research/sup-2-agent-2", "support/sup-1-agent-1", "support/sup-1-agent-2",
        "support/sup-1-agent-3"])
    assert {a["status"] for a in snap["agents"].values()} == {"running"}
    assert all(a["resources"] == res(1, "1Gi") for a in snap["agents"].values())


def test_human_status_and_domain_status_print_tables(up_server: Up) -> None:
    r = tetrarch("status", address=up_server.address, as_json=False)
    assert r.rc == 0, str(r)
    assert_clean(r)
    lines = r.stdout.splitlines()
    assert re.search(r"^system: 2 domain\(s\), 3 supervisor\(s\), 7 agent\(s\) \(7 running\)", r.stdout, re.M), r.stdout
    head = next(i for i, line in enumerate(lines) if re.match(r"^domain\s+status\s", line))
    assert re.match(r"^-+(\s+-+)+$", lines[head + 1]), r.stdout
    rows = {line.split()[0]: line for line in lines[head + 2:] if line.strip()}
    assert set(rows) == {"research", "support"}
    assert "4 running" in rows["research"] and "active" in rows["research"]
    assert "3 running" in rows["support"]
    assert re.search(r"^level\s+capacity\s", r.stdout, re.M), r.stdout

    r = tetrarch("domain", "status", "research", address=up_server.address, as_json=False)
    assert r.rc == 0, str(r)
    assert_clean(r)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("manager manager/research"), r.stdout
    assert re.search(r"capacity 100 CPU / 100Gi", r.stdout), r.stdout
    head = next(i for i, line in enumerate(lines) if re.match(r"^supervisor\s+status\s", line))
    assert re.match(r"^-+(\s+-+)+$", lines[head + 1]), r.stdout
    rows = {line.split()[0]: line for line in lines[head + 2:] if line.strip()}
    assert set(rows) == {"sup-1", "sup-2"}
    assert all("2 running" in row for row in rows.values()), r.stdout


def test_domain_list(up_server: Up) -> None:
    domains = ok("domain", "list", address=up_server.address)
    by_name = {d["name"]: d for d in domains}
    assert {"research", "support"} <= set(by_name)
    for name in ("research", "support"):
        assert by_name[name]["entity_id"] == f"manager/{name}"
        assert by_name[name]["status"] == "active"
        assert by_name[name]["resources"] == res(100, "100Gi")


# -- creating, idempotently ----------------------------------------------------------------------------


def test_domain_create_is_idempotent_and_a_different_definition_conflicts(up_server: Up) -> None:
    a = up_server.address
    first = ok("domain", "create", "cli-idem", "--cpu", "20", "--memory", "20Gi", address=a)
    assert first["created"] is True
    assert first["domain"]["name"] == "cli-idem"
    assert first["domain"]["resources"] == res(20, "20Gi")

    again = ok("domain", "create", "cli-idem", "--cpu", "20", "--memory", "20Gi", address=a)
    assert again["created"] is False
    assert again["domain"]["resources"] == res(20, "20Gi")
    # A domain from the hierarchy file, created identically: also unchanged.
    assert ok("domain", "create", "research", "--cpu", "100", "--memory", "100Gi", address=a)["created"] is False

    before = snapshot(a)
    err = assert_refused(tetrarch("domain", "create", "cli-idem", "--cpu", "30", "--memory", "20Gi", address=a),
                         "Conflict")
    assert "cli-idem" in err["message"]
    assert err["level"] == "orchestrator"
    err = assert_refused(tetrarch("domain", "create", "research", "--cpu", "50", address=a), "Conflict")
    assert "research" in err["message"]
    assert snapshot(a) == before

    assert "cli-idem" in names(ok("domain", "list", address=a))
    assert ok("domain", "status", "cli-idem", address=a)["pool"]["capacity"] == res(20, "20Gi")
    removed = ok("domain", "remove", "cli-idem", address=a)
    assert removed["entity_id"] == "manager/cli-idem"
    assert removed["released"] == res(20, "20Gi")
    assert "cli-idem" not in names(ok("domain", "list", address=a))


# -- supervisors and agents: the whole lifecycle --------------------------------------------------------


def test_supervisor_and_agent_lifecycle(up_server: Up) -> None:
    a = up_server.address
    d = "cli-life"
    assert ok("domain", "create", d, "--cpu", "40", "--memory", "40Gi", address=a)["created"] is True
    _create_supervisor_and_agent(a, d)
    _scale_up_and_down(a, d)
    _refused_removal_then_agent_stop(a, d)
    _drain_supervisor_then_domain(a, d)
    # Everything else is as it was.
    wait_for(lambda: status_counts(a), lambda c: c == (2, 3, {"running": 7}), timeout=15,
             what="status back to the default hierarchy")
    assert accounting_problems(snapshot(a)) == []


def _create_supervisor_and_agent(a: str, d: str) -> None:
    sup = ok("supervisor", "create", d, "s1", "--cpu", "4", "--memory", "4Gi", address=a)
    assert sup["created"] is True
    assert sup["supervisor"]["entity_id"] == f"supervisor/{d}/s1"
    assert sup["supervisor"]["resources"] == res(4, "4Gi")
    assert ok("supervisor", "create", d, "s1", "--cpu", "4", "--memory", "4Gi", address=a)["created"] is False
    assert names(ok("supervisor", "list", d, address=a)) == ["s1"]

    spawned = ok("agent", "spawn", d, "s1", "a1", "--cpu", "500m", "--memory", "512Mi", address=a)
    assert spawned["created"] is True
    assert spawned["agent"]["entity_id"] == f"agent/{d}/a1"
    assert spawned["agent"]["resources"] == res("500m", "512Mi")
    agent = ok("agent", "status", d, "a1", address=a)
    assert agent["status"] == "running"
    assert agent["spec"]["domain"] == d and agent["spec"]["supervisor"] == "s1" and agent["spec"]["name"] == "a1"
    assert agent["spec"]["resources"] == res("500m", "512Mi")
    assert ok("status", f"agent:{d}/a1", address=a)["status"] == "running"
    assert names(ok("agent", "list", d, "s1", address=a)) == ["a1"]


def _scale_up_and_down(a: str, d: str) -> None:
    # Scale up by two: named after the prefix, each with the default 10 CPU / 10Gi.
    scaled = ok("supervisor", "scale", d, "2", address=a)
    assert scaled == {"domain": d, "added": ["sup-1", "sup-2"], "removed": []}
    assert names(ok("supervisor", "list", d, address=a)) == ["s1", "sup-1", "sup-2"]
    view = ok("domain", "status", d, address=a)
    assert view["pool"]["granted"] == res(24, "24Gi")
    assert ok("supervisor", "status", d, "sup-2", address=a)["pool"]["capacity"] == res(10, "10Gi")

    # Scale down by one: an empty supervisor goes (emptiest first, then by name), never s1 with its agent.
    scaled = ok("supervisor", "scale", d, "--", "-1", address=a)
    assert scaled == {"domain": d, "added": [], "removed": ["sup-1"]}
    assert names(ok("supervisor", "list", d, address=a)) == ["s1", "sup-2"]
    assert ok("domain", "status", d, address=a)["pool"]["granted"] == res(14, "14Gi")


def _refused_removal_then_agent_stop(a: str, d: str) -> None:
    # Removing a supervisor that has agents is refused, and changes nothing.
    before = snapshot(a)
    err = assert_refused(tetrarch("supervisor", "remove", d, "s1", address=a), "HasChildren")
    assert "a1" in err["message"]
    assert snapshot(a) == before
    assert ok("agent", "status", d, "a1", address=a)["status"] == "running"

    # Spawn and stop a second agent: its slice goes back to the supervisor.
    ok("agent", "spawn", d, "s1", "a2", address=a)
    assert ok("supervisor", "status", d, "s1", address=a)["pool"]["granted"] == res("1500m", "1536Mi")
    stopped = ok("agent", "stop", d, "a2", address=a)
    assert stopped["entity_id"] == f"agent/{d}/a2"
    assert stopped["released"] == res(1, "1Gi")
    assert names(ok("agent", "list", d, "s1", address=a)) == ["a1"]
    assert ok("supervisor", "status", d, "s1", address=a)["pool"]["granted"] == res("500m", "512Mi")
    assert_refused(tetrarch("agent", "status", d, "a2", address=a), "NotFound")

    snap = snapshot(a)
    assert accounting_problems(snap) == []
    assert sorted(k for k in snap["supervisors"] if k.startswith(f"{d}/")) == [f"{d}/s1", f"{d}/sup-2"]
    assert sorted(k for k in snap["agents"] if k.startswith(f"{d}/")) == [f"{d}/a1"]


def _drain_supervisor_then_domain(a: str, d: str) -> None:
    # With --drain the supervisor stops its agents first.
    removed = ok("supervisor", "remove", d, "s1", "--drain", address=a)
    assert removed["drained"] == ["a1"]
    assert removed["released"] == res(4, "4Gi")
    assert_refused(tetrarch("agent", "status", d, "a1", address=a), "NotFound")
    assert names(ok("supervisor", "list", d, address=a)) == ["sup-2"]

    # A domain with supervisors is refused without --drain, removed with it.
    ok("agent", "spawn", d, "sup-2", "a3", address=a)
    before = snapshot(a)
    err = assert_refused(tetrarch("domain", "remove", d, address=a), "HasChildren")
    assert "sup-2" in err["message"]
    assert snapshot(a) == before
    removed = ok("domain", "remove", d, "--drain", address=a)
    assert removed["drained"] == ["sup-2"]
    assert removed["released"] == res(40, "40Gi")
    assert d not in names(ok("domain", "list", address=a))
    assert_refused(tetrarch("agent", "status", d, "a3", address=a), "NotFound")
    assert_refused(tetrarch("supervisor", "status", d, "sup-2", address=a), "NotFound")


def test_scale_that_does_not_fit_is_refused_whole(up_server: Up) -> None:
    a = up_server.address
    d = "cli-cap"
    ok("domain", "create", d, "--cpu", "20", "--memory", "20Gi", address=a)
    ok("supervisor", "create", d, "s1", "--cpu", "4", "--memory", "4Gi", address=a)
    before = snapshot(a)
    # 16 CPU free: one more 10-CPU supervisor fits, two do not. Nothing may be left half-done.
    err = assert_refused(tetrarch("supervisor", "scale", d, "2", address=a), "CapacityExceeded")
    assert d in err["message"]
    after = snapshot(a)
    assert after == before
    assert names(ok("supervisor", "list", d, address=a)) == ["s1"]
    assert ok("supervisor", "scale", d, "1", address=a)["added"] == ["sup-1"]
    assert ok("domain", "remove", d, "--drain", address=a)["drained"] == ["s1", "sup-1"]


# -- unknown names ---------------------------------------------------------------------------------------

#: Every command that names a domain, supervisor or agent, with an unknown one; and the name
#: the error must mention.
UNKNOWN = [
    (["status", "ghost-d"], "ghost-d"),
    (["status", "research/ghost-s"], "ghost-s"),
    (["status", "agent:research/ghost-a"], "ghost-a"),
    (["domain", "status", "ghost-d"], "ghost-d"),
    (["domain", "configure", "ghost-d", "--cpu", "5"], "ghost-d"),
    (["domain", "configure", "ghost-d", "--max-supervisors", "3"], "ghost-d"),
    (["domain", "remove", "ghost-d"], "ghost-d"),
    (["domain", "remove", "ghost-d", "--drain"], "ghost-d"),
    (["supervisor", "create", "ghost-d", "s1"], "ghost-d"),
    (["supervisor", "configure", "research", "ghost-s", "--max-agents", "2"], "ghost-s"),
    (["supervisor", "configure", "research", "ghost-s", "--cpu", "2"], "ghost-s"),
    (["supervisor", "configure", "ghost-d", "sup-1", "--max-agents", "2"], "ghost-d"),
    (["supervisor", "list", "ghost-d"], "ghost-d"),
    (["supervisor", "status", "research", "ghost-s"], "ghost-s"),
    (["supervisor", "status", "ghost-d", "sup-1"], "ghost-d"),
    (["supervisor", "remove", "research", "ghost-s"], "ghost-s"),
    (["supervisor", "remove", "research", "ghost-s", "--drain"], "ghost-s"),
    (["supervisor", "remove", "ghost-d", "sup-1"], "ghost-d"),
    (["supervisor", "scale", "ghost-d", "2"], "ghost-d"),
    (["supervisor", "scale", "ghost-d", "--", "-1"], "ghost-d"),
    (["agent", "spawn", "ghost-d", "sup-1", "a1"], "ghost-d"),
    (["agent", "spawn", "research", "ghost-s", "a1"], "ghost-s"),
    (["agent", "stop", "research", "ghost-a"], "ghost-a"),
    (["agent", "stop", "ghost-d", "a1"], "ghost-d"),
    (["agent", "list", "research", "ghost-s"], "ghost-s"),
    (["agent", "list", "ghost-d", "sup-1"], "ghost-d"),
    (["agent", "status", "research", "ghost-a"], "ghost-a"),
    (["agent", "status", "ghost-d", "a1"], "ghost-d"),
]


def test_unknown_names_are_not_found_and_change_nothing(up_server: Up) -> None:
    a = up_server.address
    before = snapshot(a)
    counts = status_counts(a)
    problems: list[str] = []
    for args, name in UNKNOWN:
        r = tetrarch(*args, address=a)
        try:
            assert r.rc == 1, "exit code is not 1"
            assert_clean(r)
            err = r.error
            assert err["code"] == "NotFound", f"code {err['code']}"
            assert name in err["message"], f"message does not name {name!r}"
        except AssertionError as e:
            problems.append(f"{' '.join(args)}: {e}\n{r}")
    assert not problems, "\n\n".join(problems)
    assert snapshot(a) == before
    assert status_counts(a) == counts


# -- hierarchy files -------------------------------------------------------------------------------------

#: Malformed hierarchy files: each would create a domain (bad-*) if anything were applied, and
#: each problem path the error must list.
BAD_FILES: dict[str, tuple[str, list[str]]] = {
    "bad-yaml": (
        "version: 1\ndomains:\n  - name: bad-yaml\n    resources: {cpu: 5\n",
        ["line 4"],
    ),
    "negative-cpu": (
        """\
version: 1
domains:
  - name: bad-neg
    resources: {cpu: -3, memory: 10Gi}
    supervisors:
      - {name: s1, resources: {cpu: 1, memory: 1Gi}, agent_resources: {cpu: -1, memory: 1Gi}}
  - name: bad-neg-2
    resources: {cpu: 5, memory: 5Gi, gpu: -1}
""",
        ["domains[0].resources", "domains[0].supervisors[0].agent_resources", "domains[1].resources"],
    ),
    "child-larger-than-parent": (
        """\
version: 1
global:
  resources: {cpu: 1000, memory: 1Ti}
domains:
  - name: bad-big
    resources: {cpu: 10, memory: 10Gi}
    supervisors:
      - {name: huge, resources: {cpu: 20, memory: 1Gi}}
      - {name: s2, resources: {cpu: 1, memory: 1Gi}, agents: 5}
  - name: bad-big-2
    resources: {cpu: 2000, memory: 10Gi}
""",
        ["domains[0].supervisors[0].resources", "domains[0].supervisors[1].agents",
         "domains[1].resources"],
    ),
}


def _check_bad_file_error(r: Any, paths: list[str]) -> None:
    assert r.rc == 2, f"expected exit 2:\n{r}"
    assert_clean(r)
    err = r.error
    assert err["code"] == "InvalidBootstrap", str(r)
    text = "\n".join(err["problems"])
    missing = [p for p in paths if not any(line.startswith(p) or p in line for line in err["problems"])]
    assert not missing, f"problems do not list {missing}:\n{text}"


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_apply_malformed_file_lists_every_problem_and_applies_nothing(up_server: Up, tmp_path: Path,
                                                                      kind: str) -> None:
    text, paths = BAD_FILES[kind]
    f = tmp_path / f"{kind}.yaml"
    f.write_text(text)
    before = snapshot(up_server.address)
    r = tetrarch("apply", f, address=up_server.address)
    _check_bad_file_error(r, paths)
    assert snapshot(up_server.address) == before
    assert not any(n.startswith("bad-") for n in names(ok("domain", "list", address=up_server.address)))


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_up_with_malformed_file_exits_2_and_starts_nothing(tmp_path: Path, kind: str) -> None:
    text, paths = BAD_FILES[kind]
    f = tmp_path / f"{kind}.yaml"
    f.write_text(text)
    port, ui_port = two_free_ports()
    state = tmp_path / "state"
    r = tetrarch("up", "--file", f, "--state-dir", state, "--port", port, "--ui-port", ui_port, timeout=60)
    _check_bad_file_error(r, paths)
    assert not port_in_use("127.0.0.1", port), "a server was started for a malformed file"
    assert not (state / "temporal.sqlite").exists()


def test_file_with_shape_and_arithmetic_problems_lists_both(tmp_path: Path) -> None:
    f = tmp_path / "both.yaml"
    f.write_text("""\
version: 1
domains:
  - name: bad-both
    resources: {cpu: -3, memory: 10Gi}
  - name: bad-both-2
    resources: {cpu: 10, memory: 10Gi}
    supervisors:
      - {name: huge, resources: {cpu: 20, memory: 1Gi}}
""")
    r = tetrarch("apply", "--check", f)
    _check_bad_file_error(r, ["domains[0].resources", "domains[1].supervisors[0].resources"])


def test_apply_is_idempotent(up_server: Up, tmp_path: Path) -> None:
    a = up_server.address
    # The default file (already applied by up): nothing to create, twice.
    for _ in range(2):
        result = ok("apply", DEFAULT_BOOTSTRAP, address=a)
        assert result["created"] == []
        assert {"orchestrator", "domain research", "domain support", "supervisor research/sup-1",
                "supervisor research/sup-2", "supervisor support/sup-1"} <= set(result["unchanged"])
    # A file with something new: created once, then nothing.
    f = tmp_path / "more.yaml"
    demo_key = (ROOT / "images" / "demo-key.pub").read_text().strip()
    f.write_text(f"""\
version: 1
global:
  resources: {{cpu: 1000, memory: 1Ti}}
  policy: {{max_children: 10, images: {{trusted_signers: ['{demo_key}']}}}}
domains:
  - name: cli-apply
    resources: {{cpu: 30, memory: 30Gi}}
    supervisors:
      - {{name: s1, resources: {{cpu: 5, memory: 5Gi}}, agents: 2, agent_resources: {{cpu: 1, memory: 1Gi}}}}
""")
    first = ok("apply", f, address=a)
    assert sorted(first["created"]) == sorted(["domain cli-apply", "supervisor cli-apply/s1",
                                               "agent cli-apply/s1-agent-1", "agent cli-apply/s1-agent-2"])
    snap = snapshot(a)
    second = ok("apply", f, address=a)
    assert second["created"] == []
    assert snapshot(a) == snap
    assert accounting_problems(snap) == []
    assert snap["agents"]["cli-apply/s1-agent-1"]["status"] == "running"
    assert ok("domain", "remove", "cli-apply", "--drain", address=a)["drained"] == ["s1"]


# -- schemas ---------------------------------------------------------------------------------------------


def test_schema_out_writes_one_file_per_entry_and_an_index(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    index = ok("schema", "--out", out)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == index
    workflows = {e["name"]: e for e in index if e["kind"] == "workflow"}
    assert {"ApplyHierarchy", "CreateDomain", "ConfigureDomain", "RemoveDomain", "CreateSupervisor",
            "ConfigureSupervisor", "RemoveSupervisor", "ScaleSupervisors", "SpawnAgent", "StopAgent",
            "Orchestrator", "Manager", "Supervisor", "Agent"} <= set(workflows)
    assert workflows["CreateDomain"]["on"] == "orchestrator"
    assert workflows["SpawnAgent"]["on"] == "supervisor"
    assert any(e["kind"] == "update" for e in index) and any(e["kind"] == "query" for e in index)
    for entry in index:
        assert (out / entry["file"]).exists(), entry
    files = {p.name for p in out.iterdir()} - {"index.json"}
    assert files == {e["file"] for e in index}
    create = json.loads((out / workflows["CreateDomain"]["file"]).read_text())
    assert create["name"] == "CreateDomain"
    assert "domain" in create["input"]["properties"]
    assert "domain" in create["input"].get("required", [])
    assert create["output"] is not None
