"""Durability: stop ``up`` and start it again on the same SQLite state; the hierarchy is all still there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    Up,
    accounting_problems,
    assert_clean,
    ok,
    snapshot,
    start_up,
    status_counts,
    tetrarch,
    two_free_ports,
    wait_for,
)
from tetrarch.bootstrap import DEFAULT_BOOTSTRAP
from tetrarch_cli.server import port_in_use

pytestmark = pytest.mark.e2e


def test_hierarchy_survives_a_server_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port, ui_port = two_free_ports()
    first = start_up(state, port, ui_port, log_name="up-1.log")
    try:
        assert len(first.info["applied"]["created"]) == 13
        before = _add_beyond_the_file(first.address)
    finally:
        _stop(first)

    second = start_up(state, port, ui_port, log_name="up-2.log")
    try:
        assert second.info["applied"]["created"] == []
        assert {"orchestrator", "domain research", "domain support"} <= set(second.info["applied"]["unchanged"])
        assert second.info["status"]["domains"] == 3
        assert snapshot(second.address) == before
        _check_after_restart(second.address)
        # Resize a domain the default file also defines: the next up must refuse the file, cleanly.
        ok("domain", "configure", "support", "--cpu", "60", address=second.address)
    finally:
        _stop(second)

    # Without --file, a restart keeps the existing hierarchy (resized domain included) as it is.
    r = tetrarch("up", "--state-dir", state, "--port", port, "--ui-port", ui_port, "--exit-after-apply", timeout=90)
    assert r.rc == 0, str(r)
    assert_clean(r)
    info = r.json
    support = [d for d in info["status"]["orchestrator"]["children"] if d["name"] == "support"]
    assert support[0]["resources"]["cpu_millis"] == 60_000
    assert info["applied"]["created"] == []

    # A file given explicitly that conflicts with what exists is refused whole; up stops its workers
    # and its server and exits 1 (it used to hang: workers cannot shut down once the server is gone).
    r = tetrarch("up", "--state-dir", state, "--port", port, "--ui-port", ui_port, "--exit-after-apply",
                 "--file", str(DEFAULT_BOOTSTRAP), timeout=90)
    assert r.rc == 1, str(r)
    assert_clean(r)
    assert r.error["code"] == "Conflict"
    assert any(p.startswith("domains[1].resources") and "support" in p for p in r.error["problems"]), str(r)
    assert not port_in_use("127.0.0.1", port), "the server outlived up"


def _stop(up: Up) -> None:
    rc = up.stop()
    assert rc == 0, f"up did not stop cleanly ({rc}):\n{up.proc.stderr()[-3000:]}"
    assert not port_in_use("127.0.0.1", up.port), "the server outlived up"
    assert not port_in_use("127.0.0.1", up.ui_port), "the Web UI outlived up"


def _add_beyond_the_file(a: str) -> dict[str, Any]:
    """A domain (then resized), a supervisor and agents of odd sizes; returns the whole snapshot."""
    ok("domain", "create", "keep", "--cpu", "30", "--memory", "30Gi", address=a)
    ok("domain", "configure", "keep", "--cpu", "25", address=a)
    ok("supervisor", "create", "keep", "keeper", "--cpu", "3", "--memory", "3Gi", "--max-agents", "4", address=a)
    ok("agent", "spawn", "keep", "keeper", "k1", "--cpu", "250m", "--memory", "256Mi", address=a)
    # An agent that was stopped stays stopped.
    ok("agent", "spawn", "keep", "keeper", "k0", address=a)
    ok("agent", "stop", "keep", "k0", address=a)
    wait_for(lambda: status_counts(a), lambda c: c == (3, 4, {"running": 8}), timeout=15,
             what="status with the extra entities")
    snap = snapshot(a)
    assert accounting_problems(snap) == []
    return snap


def _check_after_restart(a: str) -> None:
    keep = ok("domain", "status", "keep", address=a)
    assert keep["pool"]["capacity"] == {"cpu_millis": 25000, "memory_mib": 30720, "gpu": 0}
    keeper = ok("supervisor", "status", "keep", "keeper", address=a)
    assert keeper["pool"]["capacity"] == {"cpu_millis": 3000, "memory_mib": 3072, "gpu": 0}
    assert keeper["policy"]["max_children"] == 4
    k1 = ok("agent", "status", "keep", "k1", address=a)
    assert k1["status"] == "running"
    assert k1["spec"]["resources"] == {"cpu_millis": 250, "memory_mib": 256, "gpu": 0}
    r = tetrarch("agent", "status", "keep", "k0", address=a)
    assert r.rc == 1 and r.error["code"] == "NotFound", str(r)
    assert_clean(r)
    wait_for(lambda: status_counts(a), lambda c: c == (3, 4, {"running": 8}), timeout=15,
             what="status after the restart")

    # The restarted workers serve the old entities: operations on them still work.
    assert ok("agent", "spawn", "keep", "keeper", "k2", address=a)["created"] is True
    assert ok("agent", "stop", "support", "sup-1-agent-3", address=a)["released"] is not None
    assert ok("supervisor", "status", "keep", "keeper", address=a)["pool"]["granted"] == {
        "cpu_millis": 1250, "memory_mib": 1280, "gpu": 0}
    assert accounting_problems(snapshot(a)) == []
