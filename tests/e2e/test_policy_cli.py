"""``tetrarch policy`` end to end: show, set, validate, dry-run, templates and what-if checks.

One ``tetrarch up`` of its own serves the module (the default hierarchy: research with sup-1 and
sup-2 of 2 agents each, support with sup-1 of 3 agents), so that the global policy can be changed
here without touching any other test's orchestrator. Tests run in file order and build on one
another: the global examples come last. Every refusal is checked to change nothing by comparing
``policy show`` and a snapshot of every entity before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Result, Up, accounting_problems, assert_clean, ok, snapshot, tetrarch

pytestmark = pytest.mark.e2e

#: One problem of each kind, each with the path the error must name.
MALFORMED = """\
max_agent: 3
max_agents: -1
agent:
  max_share: {cpu_pct: 150}
denied_operations: [kill, explode]
"""
MALFORMED_PATHS = {
    "max_agent": "Extra inputs are not permitted",
    "max_agents": "greater than or equal to 0",
    "agent.max_share.cpu_pct": "less than or equal to 100",
    "denied_operations.1": "Input should be 'spawn'",
}

#: The domain's rules for support, and a supervisor policy that loosens them three ways.
SUPPORT_POLICY = """\
max_agents: 10
agent:
  max_resources: {cpu: 2, memory: 2Gi}
denied_operations: [evolve]
"""
LOOSER_SUPERVISOR = """\
max_agents: 20
agent:
  max_resources: {cpu: 4, memory: 2Gi}
allowed_operations: [spawn, kill, evolve]
"""


def refused(r: Result, code: str, exit_code: int = 1) -> dict[str, Any]:
    """A --json refusal with this exit code and error code, and no traceback."""
    assert r.rc == exit_code, f"expected exit {exit_code}:\n{r}"
    assert_clean(r)
    err: dict[str, Any] = r.error
    assert err["code"] == code, f"expected {code}:\n{r}"
    return err


def write(tmp_path: Path, name: str, text: str) -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def chain(decision: dict[str, Any]) -> list[tuple[str, bool, str]]:
    return [(v["level"], v["allowed"], v["rule"]) for v in decision["verdicts"]]


def test_show_template_and_check_on_a_supervisor(up_server: Up) -> None:
    """The seed's supervisor example: `standard` caps one agent at 5% of the supervisor's 10 CPU."""
    a = up_server.address
    glob = ok("policy", "show", "global", address=a)
    assert glob["target"] == "orchestrator"
    assert glob["policy"]["max_children"] == 10 and glob["policy"]["version"] == 1
    assert glob["cache"]["ttl_seconds"] == pytest.approx(0.1) and {"hits", "misses", "hit_rate"} <= set(glob["cache"])
    sup = ok("policy", "show", "research/sup-1", address=a)
    assert sup["target"] == "supervisor/research/sup-1" and sup["policy"]["version"] == 1
    assert sup["policy"]["agent"] == {"max_resources": None, "max_share": None}
    human = tetrarch("policy", "show", "research", address=a, as_json=False)
    assert human.rc == 0 and "target: manager/research" in human.stdout, str(human)

    assert ok("policy", "check", "spawn", "research/sup-1", "--cpu", "1", address=a)["allowed"] is True

    applied = ok("policy", "template", "standard", "research/sup-1", address=a)
    assert applied["applied"] is True and applied["dry_run"] is False and applied["conflicts"] == []
    assert applied["target"] == "supervisor/research/sup-1" and applied["previous_version"] == 1
    assert applied["policy"]["template"] == "standard" and applied["policy"]["version"] == 2
    assert applied["policy"]["agent"]["max_share"]["cpu_pct"] == 5
    # The two running 1-CPU agents are above the new 0.5 CPU cap: reported, not evicted.
    assert sorted(x.split(":")[0] for x in applied["agents_refused"]) == ["research/sup-1-agent-1",
                                                                          "research/sup-1-agent-2"]
    assert ok("agent", "status", "research", "sup-1-agent-1", address=a)["status"] == "running"
    assert ok("policy", "show", "research/sup-1", address=a)["policy"] == applied["policy"]

    # What-if: 1 CPU is refused by the supervisor, every level's verdict shown; exit 1.
    r = tetrarch("policy", "check", "spawn", "research/sup-1", "--cpu", "1", address=a)
    assert r.rc == 1, str(r)
    assert_clean(r)
    d = r.json
    assert d["allowed"] is False and (d["level"], d["rule"]) == ("supervisor", "agent.max_share")
    assert chain(d) == [("orchestrator", True, ""), ("manager", True, ""), ("supervisor", False, "agent.max_share")]
    human = tetrarch("policy", "check", "spawn", "research/sup-1", "--cpu", "1", address=a, as_json=False)
    assert human.rc == 1, str(human)
    lines = human.stdout.splitlines()
    assert lines[0].startswith("DENIED by supervisor (agent.max_share):") and "500m CPU" in lines[0], str(human)
    rows = [line.split() for line in lines[1:] if line.strip() and not set(line.strip()) <= {"-", " "}]
    assert [row[:3] for row in rows[1:]] == [["orchestrator", "orchestrator", "allow"],
                                             ["manager", "manager/research", "allow"],
                                             ["supervisor", "supervisor/research/sup-1", "deny"]], str(human)
    ok_check = tetrarch("policy", "check", "spawn", "research/sup-1", "--cpu", "500m", address=a, as_json=False)
    assert ok_check.rc == 0 and ok_check.stdout.startswith("allowed"), str(ok_check)

    # The real spawn is refused by the same level and leaves nothing behind.
    before = snapshot(a)
    err = refused(tetrarch("agent", "spawn", "research", "sup-1", "big", "--cpu", "1", "--memory", "1Gi",
                           address=a), "PolicyDenied")
    assert err["level"] == "supervisor" and err["data"]["rule"] == "agent.max_share"
    assert err["entity"] == "supervisor/research/sup-1"
    assert snapshot(a) == before
    refused(tetrarch("agent", "status", "research", "big", address=a), "NotFound")
    spawned = ok("agent", "spawn", "research", "sup-1", "small", "--cpu", "500m", "--memory", "512Mi", address=a)
    assert spawned["created"] is True
    assert accounting_problems(snapshot(a)) == []


@pytest.mark.parametrize("command", ["set", "validate", "set --dry-run"])
def test_malformed_policy_file_lists_every_error_and_keeps_the_old_policy(up_server: Up, tmp_path: Path,
                                                                          command: str) -> None:
    a = up_server.address
    f = write(tmp_path, "bad.yaml", MALFORMED)
    before = ok("policy", "show", "research/sup-2", address=a)
    err = refused(tetrarch("policy", *command.split(), "research/sup-2", "--file", f, address=a),
                  "InvalidPolicy", exit_code=2)
    assert len(err["problems"]) == len(MALFORMED_PATHS), err["problems"]
    for path, message in MALFORMED_PATHS.items():
        assert any(p.startswith(f"{path}: ") and message in p for p in err["problems"]), (path, err["problems"])
    assert str(f) in err["message"]
    assert ok("policy", "show", "research/sup-2", address=a) == before


def test_malformed_policy_file_in_human_output(up_server: Up, tmp_path: Path) -> None:
    a = up_server.address
    f = write(tmp_path, "bad.json", '{"max_agents": -1, "agent": {"max_share": {"cpu_pct": 101}}, "nope": 1}')
    before = ok("policy", "show", "research", address=a)
    r = tetrarch("policy", "set", "research", "--file", f, address=a, as_json=False)
    assert r.rc == 2, str(r)
    assert_clean(r)
    assert "error [InvalidPolicy]" in r.stderr and "3 problem(s)" in r.stderr, str(r)
    for path in ("max_agents", "agent.max_share.cpu_pct", "nope"):
        assert f"  - {path}: " in r.stderr, str(r)
    missing = refused(tetrarch("policy", "set", "research", "--file", tmp_path / "absent.yaml", address=a),
                      "InvalidPolicy", exit_code=2)
    assert "absent.yaml" in missing["message"]
    assert ok("policy", "show", "research", address=a) == before


def test_conflicting_child_policy_is_refused_listing_every_conflict(up_server: Up, tmp_path: Path) -> None:
    a = up_server.address
    dom = ok("policy", "set", "support", "--file", write(tmp_path, "support.yaml", SUPPORT_POLICY), address=a)
    assert dom["applied"] is True and dom["policy"]["version"] == 2
    assert dom["children_in_conflict"] == [] and dom["agents_refused"] == []
    looser = write(tmp_path, "looser.yaml", LOOSER_SUPERVISOR)
    before_show = ok("policy", "show", "support/sup-1", address=a)
    before = snapshot(a)

    # validate: a dry run, exit 1 with the conflicts listed.
    r = tetrarch("policy", "validate", "support/sup-1", "--file", looser, address=a)
    assert r.rc == 1, str(r)
    v = r.json
    assert v["dry_run"] is True and v["applied"] is False and len(v["conflicts"]) == 3, v
    human = tetrarch("policy", "validate", "support/sup-1", "--file", looser, address=a, as_json=False)
    assert human.rc == 1 and "dry run, nothing changed" in human.stdout, str(human)
    assert "conflicts with the levels above:" in human.stdout
    assert sum(line.startswith("    - ") for line in human.stdout.splitlines()) == 3, str(human)

    # set: refused with every conflict, nothing changed.
    err = refused(tetrarch("policy", "set", "support/sup-1", "--file", looser, address=a), "PolicyConflict")
    assert err["level"] == "supervisor" and sorted(err["problems"]) == sorted(v["conflicts"])
    text = "\n".join(err["problems"])
    assert "max_agents: 20" in text and "cpu" in text and "evolve" in text, text
    assert ok("policy", "show", "support/sup-1", address=a) == before_show
    assert snapshot(a) == before

    # A policy that only tightens validates cleanly (exit 0) and validating changes nothing either.
    tighter = write(tmp_path, "tighter.yaml", "max_agents: 5\nagent:\n  max_resources: {cpu: 1, memory: 1Gi}\n")
    t = ok("policy", "validate", "support/sup-1", "--file", tighter, address=a)
    assert t["conflicts"] == [] and t["applied"] is False
    assert ok("policy", "show", "support/sup-1", address=a) == before_show


def test_dry_run_shows_the_agents_it_would_refuse_and_changes_nothing(up_server: Up, tmp_path: Path) -> None:
    a = up_server.address
    f = write(tmp_path, "strict.yaml", "max_agents: 2\nagent:\n  max_resources: {cpu: 500m, memory: 2Gi}\n")
    before_show = ok("policy", "show", "support", address=a)
    before = snapshot(a)
    r = ok("policy", "set", "support", "--file", f, "--dry-run", address=a)
    assert r["dry_run"] is True and r["applied"] is False and r["conflicts"] == []
    refused_agents = [x.split(":")[0] for x in r["agents_refused"]]
    # All three hold 1 CPU (above 500m); the third is also beyond max_agents 2.
    assert sorted(refused_agents) == sorted(["support/sup-1-agent-1", "support/sup-1-agent-2",
                                             "support/sup-1-agent-3", "support/sup-1-agent-3"]), r["agents_refused"]
    human = tetrarch("policy", "set", "support", "--file", f, "--dry-run", address=a, as_json=False)
    assert human.rc == 0 and "running agents it would refuse:" in human.stdout, str(human)
    assert ok("policy", "show", "support", address=a) == before_show
    assert snapshot(a) == before


def test_unknown_targets_are_not_found(up_server: Up, tmp_path: Path) -> None:
    a = up_server.address
    f = write(tmp_path, "ok.yaml", "max_agents: 1\n")
    before = snapshot(a)
    for args, name in ((("policy", "show", "nowhere"), "nowhere"),
                       (("policy", "set", "nowhere", "--file", f), "nowhere"),
                       (("policy", "set", "research/ghost", "--file", f), "research/ghost"),
                       (("policy", "validate", "research/ghost", "--file", f), "research/ghost"),
                       (("policy", "template", "locked-down", "nowhere/sup-1"), "nowhere"),
                       (("policy", "check", "spawn", "research/ghost", "--cpu", "1"), "research/ghost")):
        err = refused(tetrarch(*args, address=a), "NotFound")
        assert name in err["message"], (args, err)
    assert snapshot(a) == before


def test_global_policy_decides_for_every_domain(up_server: Up, tmp_path: Path) -> None:
    """The seed's global examples: no agent may have more than 50% of system CPU; an absolute cap and a denied
    operation at the global level; the orchestrator decides even where the levels below would allow."""
    a = up_server.address
    std = ok("policy", "template", "standard", "global", address=a)
    assert std["applied"] is True and std["target"] == "orchestrator"
    assert std["policy"]["agent"]["max_share"]["cpu_pct"] == 50 and std["policy"]["version"] == 2

    # 600 of 1000 CPU: the orchestrator refuses (the manager's 2 CPU cap too, but the higher level is named).
    d = tetrarch("policy", "check", "spawn", "support/sup-1", "--cpu", "600", address=a)
    assert d.rc == 1, str(d)
    assert (d.json["level"], d.json["rule"]) == ("orchestrator", "agent.max_share")
    assert chain(d.json) == [("orchestrator", False, "agent.max_share"), ("manager", False, "agent.max_resources"),
                             ("supervisor", True, "")]
    before = snapshot(a)
    err = refused(tetrarch("agent", "spawn", "support", "sup-1", "huge", "--cpu", "600", "--memory", "1Gi",
                           address=a), "PolicyDenied")
    assert (err["level"], err["entity"], err["data"]["rule"]) == ("orchestrator", "orchestrator", "agent.max_share")
    assert "500 CPU" in err["message"], err
    assert snapshot(a) == before

    # An absolute cap and a denied operation, globally.
    g = write(tmp_path, "global.yaml", "max_children: 10\nagent:\n  max_resources: {cpu: 1, memory: 4Gi}\n"
                                       "denied_operations: [kill]\n")
    r = ok("policy", "set", "global", "--file", g, address=a)
    assert r["applied"] is True and r["policy"]["version"] == 3
    assert r["children_in_conflict"] == ["support"], "support's own 2 CPU cap now loosens the global 1 CPU"
    assert ok("policy", "show", "global", address=a)["policy"] == r["policy"]

    before = snapshot(a)
    # research and sup-2 have no rules of their own: only the orchestrator refuses.
    err = refused(tetrarch("agent", "spawn", "research", "sup-2", "wide", "--cpu", "1500m", "--memory", "1Gi",
                           address=a), "PolicyDenied")
    assert (err["level"], err["data"]["rule"]) == ("orchestrator", "agent.max_resources"), err
    human = tetrarch("policy", "check", "spawn", "research/sup-2", "--cpu", "1500m", address=a, as_json=False)
    assert human.rc == 1 and human.stdout.startswith("DENIED by orchestrator (agent.max_resources)"), str(human)

    err = refused(tetrarch("agent", "stop", "research", "sup-2-agent-1", address=a), "PolicyDenied")
    assert (err["level"], err["data"]["rule"]) == ("orchestrator", "denied_operations"), err
    assert ok("agent", "status", "research", "sup-2-agent-1", address=a)["status"] == "running"
    kill = tetrarch("policy", "check", "kill", "research/sup-2", address=a)
    assert kill.rc == 1 and (kill.json["level"], kill.json["rule"]) == ("orchestrator", "denied_operations")
    assert snapshot(a) == before

    # Within every level's rules the spawn goes through.
    assert ok("agent", "spawn", "research", "sup-2", "fits", "--cpu", "1", "--memory", "1Gi", address=a)["created"]
    assert accounting_problems(snapshot(a)) == []
