"""The server-settings bench measures real servers and stops them (no timings asserted).

Like every e2e test, the measuring runs in a child process: the test process never opens a Temporal client.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import PYTHON, assert_clean, kill_servers_of, run
from tetrarch_cli.bench_server import ALL_TUNED, DEFAULTS, SettingsReport

pytestmark = pytest.mark.e2e

#: Measures two variants with tiny counts and prints the report as one JSON document.
_PROGRAM = r'''
import asyncio, os, sys
from pathlib import Path

from tetrarch_cli.bench_server import measure_server_settings

report = asyncio.run(measure_server_settings(short=True, state_root=Path(sys.argv[1]),
                                             only=["dev defaults", "all tuned"], samples=8))
print(report.model_dump_json(), flush=True)
os._exit(0)
'''


def _server_pids_of(state_root: Path) -> list[int]:
    """Servers still running on any state directory under ``state_root`` (killed, so none outlives the test)."""
    return [pid for d in state_root.iterdir() if d.is_dir() for pid in kill_servers_of(d)]


def test_two_variants_are_measured_each_on_its_own_server(tmp_path: Path) -> None:
    state_root = tmp_path / "state"
    try:
        r = run([PYTHON, "-c", _PROGRAM, str(state_root)], timeout=180)
    finally:
        leftover = _server_pids_of(state_root) if state_root.exists() else []
    assert r.rc == 0, str(r)
    assert_clean(r)
    assert leftover == [], "a server outlived its variant"
    report = SettingsReport.model_validate_json(r.stdout)
    assert [v.name for v in report.variants] == [DEFAULTS, ALL_TUNED]
    assert [res.variant for res in report.results] == [DEFAULTS, ALL_TUNED]
    assert len([d for d in state_root.iterdir() if (d / "temporal.sqlite").exists()]) == 2
    for res in report.results:
        assert res.error is None, res
        for figure in (res.noop_p50_ms, res.noop_p95_ms, res.noop_per_second, res.noop_load_p95_ms, res.update_p50_ms,
                       res.update_per_second):
            assert figure is not None and figure > 0, res
        assert isinstance(res.update_errors, dict)
        assert res.update_ok + sum(res.update_errors.values()) == report.plan.update_total, res
