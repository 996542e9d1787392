"""The resource commands end to end: request, show, pools, release, audit, balance, reclaim, batch spawn.

Works in a domain of its own on the module's ``up`` server, and leaves the default hierarchy as it was.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Up, assert_clean, ok, tetrarch

pytestmark = pytest.mark.e2e


def test_resource_commands(up_server: Up) -> None:
    a = up_server.address
    d = "res-cli"
    ok("domain", "create", d, "--cpu", "8", "--memory", "8Gi", address=a)
    ok("supervisor", "create", d, "s1", "--cpu", "2", "--memory", "2Gi", address=a)
    ok("supervisor", "create", d, "s2", "--cpu", "4", "--memory", "4Gi", address=a)
    spawned = ok("agent", "spawn", d, "s1", "a1", "--cpu", "1", "--memory", "1Gi", address=a)
    assert spawned["supervisor"] == "s1"

    got = ok("resources", "request", d, "a1", "--cpu", "3", "--request-id", "grow", address=a)
    assert got["served_by"] == "manager" and got["allocation_id"] == "grow"
    assert got["parts"]["supervisor"]["cpu_millis"] == 1000 and got["parts"]["manager"]["cpu_millis"] == 2000
    again = ok("resources", "request", d, "a1", "--cpu", "3", "--request-id", "grow", address=a)
    assert again == got, "a retried request id allocates once"
    shown = ok("resources", "show", d, "a1", address=a)
    assert shown["agent"]["resources"]["cpu_millis"] == 4000
    assert sorted((g["spawn"], g["key"].split("#")[1].startswith("spawn/")) for g in shown["grants"]) == [
        (False, False), (True, True)], "the spawn allocation and the extra one"
    pools = ok("resources", "pools", d, address=a)["pools"]
    assert pools[f"supervisor/{d}/s1"]["borrowed"]["cpu_millis"] == 2000
    assert pools[f"manager/{d}"]["lent"]["cpu_millis"] == 2000

    # Human output names every level; bad input is a usage error (exit 2) naming the problem.
    human = tetrarch("resources", "pools", d, address=a, as_json=False)
    assert human.rc == 0 and f"supervisor/{d}/s1" in human.stdout and "borrowed" in human.stdout
    bad = tetrarch("resources", "request", d, "a1", "--cpu", "lots", address=a, as_json=False)
    assert bad.rc == 2 and "lots" in bad.stderr
    refused = tetrarch("resources", "request", d, "nobody", "--cpu", "1", address=a)
    assert refused.rc == 1 and refused.error["code"] == "NotFound"
    assert_clean(refused)

    planned = ok("resources", "balance", d, "--dry-run", address=a)
    assert planned["planned"] and planned["done"] == []
    assert ok("resources", "audit", address=a)["ok"] is True

    released = ok("resources", "release", d, "a1", "grow", address=a)
    assert released["returned"]["manager"]["cpu_millis"] == 2000
    assert ok("resources", "release", d, "a1", "grow", address=a)["released"] == []

    batch = ok("agent", "batch", d, "s2", "3", "--cpu", "1", "--memory", "1Gi", address=a)
    assert batch["spawned"] == 3 and [o["name"] for o in batch["agents"]] == ["agent-1", "agent-2", "agent-3"]
    # agent-1..3 exist with another size: best effort spawns agent-4 and agent-5 and refuses those three.
    partly = tetrarch("agent", "batch", d, "s2", "5", "--cpu", "2", "--memory", "1Gi", "--best-effort", address=a)
    assert partly.rc == 1, "a partly refused batch exits 1"
    outcome = {o["name"]: (o["spawned"], o["error"]["code"] if o["error"] else None) for o in partly.json["agents"]}
    assert outcome == {"agent-1": (False, "Conflict"), "agent-2": (False, "Conflict"), "agent-3": (False, "Conflict"),
                       "agent-4": (True, None), "agent-5": (True, None)}
    assert ok("resources", "audit", d, address=a)["ok"] is True
    absurd = tetrarch("resources", "reclaim", d, "--cpu", "100", address=a)
    assert absurd.rc == 1 and absurd.error["code"] == "InvalidRequest", "more than the domain's capacity"
    # The domain lent all it had free to agent-4 and agent-5's spawns (not idle): in refuse mode it lends
    # nothing new until enough comes back, and the command exits 1.
    short = tetrarch("resources", "reclaim", d, "--cpu", "1", address=a)
    assert short.rc == 1 and short.json["satisfied"] is False and short.json["refusing_new_loans"] is True
    assert ok("resources", "pools", d, address=a)["pools"][f"manager/{d}"]["reclaiming"]["cpu_millis"] == 1000
    ok("domain", "remove", d, "--drain", address=a)
    assert ok("resources", "audit", address=a)["ok"] is True
