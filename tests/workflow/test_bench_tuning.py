"""The bench's worker-tuning experiments run every configuration end to end (no timings asserted)."""

from __future__ import annotations

from temporalio.client import Client

from tetrarch_cli.bench_tuning import tuning_rows
from tetrarch_cli.client import TetrarchClient

CONFIGS = {
    "sandbox, project modules passed through (chosen)", "sandbox, project modules re-imported per run",
    "no sandbox", "2 pollers per queue", "10 pollers per queue",
}


async def test_every_tuning_experiment_runs_and_reports_its_figures(client: Client, tc: TetrarchClient) -> None:
    rows = {row.name: row for row in await tuning_rows(client, short=True, samples=2)}
    assert {f"tuning: spawn, {c}" for c in CONFIGS} <= set(rows)
    for name in ("tuning: no-op workflow, plain start", "tuning: no-op workflow, eager start",
                 "tuning: workflow with one activity (eager dispatch)", "tuning: workflow with one local activity",
                 "tuning: workflow with one activity (no eager dispatch)"):
        assert name in rows, name
    for row in rows.values():
        assert row.samples == 2 and row.p50_ms is not None and row.p50_ms > 0, row
    assert rows["tuning: no-op workflow, eager start"].per_second
    # every alternative is put beside the chosen setting
    assert "the chosen setting's spawn p50" in rows["tuning: spawn, no sandbox"].ratio
    assert "the activity's" in rows["tuning: workflow with one local activity"].ratio
