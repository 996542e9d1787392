"""The bench command runs on its own server and reports every row beside the ceiling (no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import assert_clean, tetrarch

pytestmark = pytest.mark.e2e

ROWS = {
    "ceiling: no-op workflow, start to result", "ceiling: one Update on an entity", "ceiling: one Query on an entity",
    "ceiling: workflow running one activity, start to result", "ceiling: one signal to an entity (until accepted)",
    "policy check, uncached, in process", "policy check, cached, in process",
    "policy check, cached, through a worker", "policy check, uncached, through a worker",
    "get status (fast path: a Query)", "spawn agent (one at a time)",
    "resource allocation, served by the supervisor", "resource allocation, served by the manager",
    "resource allocation, served by the orchestrator",
}
RATE_ROWS = {
    "resource allocations per second (20 in flight)", "batch spawn (50 agents in one request)",
    "ceiling: no-op workflow starts per second (20 in flight, not awaited)",
    "spawns per second under load (20 in flight)",
    "mixed load, operations per second (20 in flight: 40% status, 30% policy checks, 20% allocations, 10% spawns)",
}


def test_short_bench_reports_every_row_and_writes_json(tmp_path: Path) -> None:
    r = tetrarch("bench", "--short", "--out", tmp_path / "results", timeout=240)
    assert r.rc == 0, str(r)
    assert_clean(r)
    report = r.json
    by_name = {row["name"]: row for row in report["rows"]}
    assert set(by_name) == ROWS | RATE_ROWS
    for name in RATE_ROWS:
        assert by_name[name]["samples"] > 0 and by_name[name]["per_second"] > 0, name
    for name in ROWS:
        row = by_name[name]
        assert row["samples"] > 0, name
        assert row["p50_ms"] is not None and row["p50_ms"] >= 0, name
        assert row["p95_ms"] >= row["p50_ms"], name
    noop = by_name["ceiling: no-op workflow, start to result"]
    assert noop["per_second"] > 0
    assert all(f"{c} in flight" in noop["ratio"] for c in (1, 5, 20, 50)), noop["ratio"]
    assert "goal >= 0.7x" in by_name["batch spawn (50 agents in one request)"]["ratio"]
    assert "goal <= 1.5x" in by_name["spawn agent (one at a time)"]["ratio"]
    assert "goal >= 0.5x" in by_name["spawns per second under load (20 in flight)"]["ratio"]
    assert by_name["policy check, cached, in process"]["per_second"] > 0
    assert "Update's p50" in by_name["policy check, cached, through a worker"]["ratio"]
    for depth in ("supervisor", "manager", "orchestrator"):
        assert "one Update" in by_name[f"resource allocation, served by the {depth}"]["ratio"], depth
    assert report["machine"]["cpus"] >= 1 and report["machine"]["temporalio"]
    assert report["settings"]["embedded_server"] is True
    files = list((tmp_path / "results").glob("bench-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["rows"] == report["rows"]
