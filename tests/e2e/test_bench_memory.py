"""The memory bench measures the server and the four level workers at each step (no sizes or timings asserted).

It runs in a child process, like every e2e test here: the test process never opens a Temporal client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import PYTHON, assert_clean, run
from tetrarch_cli.bench_memory import PROCESSES, MemoryReport, render_memory, write_memory_report

pytestmark = pytest.mark.e2e

_PROGRAM = r'''
import asyncio, os, sys
from pathlib import Path

from tetrarch_cli.bench_memory import measure_memory

report = asyncio.run(measure_memory(steps=[0, 50], state_root=Path(sys.argv[1])))
print(report.model_dump_json())
sys.stdout.flush()
os._exit(0)
'''


def test_memory_bench_measures_every_process_at_every_step(tmp_path: Path) -> None:
    r = run([PYTHON, "-c", _PROGRAM, str(tmp_path / "state")], timeout=180)
    assert r.rc == 0, str(r)
    assert_clean(r)
    report = MemoryReport.model_validate_json(r.stdout)

    assert [s.agents for s in report.steps] == [0, 50]
    for step in report.steps:
        assert set(step.rss_bytes) == set(PROCESSES), step
        assert all(v > 0 for v in step.rss_bytes.values()), step
        assert all(step.peak_rss_bytes[n] >= step.rss_bytes[n] > 0 for n in PROCESSES), step
    assert report.steps[1].agents_running == 50
    assert len(report.growth_per_agent) == 1
    g = report.growth_per_agent[0]
    assert (g.from_agents, g.to_agents) == (0, 50)
    assert set(PROCESSES) <= set(g.bytes_per_agent) and "total" in g.bytes_per_agent
    assert report.settings["agent_heartbeat_seconds"] > 0 and report.settings["max_cached_workflows"]
    assert report.machine["cpus"] >= 1

    # Round trip through JSON, in memory and through the written file.
    assert MemoryReport.model_validate_json(report.model_dump_json()) == report
    path = write_memory_report(report, tmp_path / "results")
    assert path.name.startswith("memory-") and path.suffix == ".json"
    assert MemoryReport.model_validate(json.loads(path.read_text())) == report
    text = render_memory(report)
    assert all(name in text for name in PROCESSES)
