"""The server-settings bench's pure parts: the variants follow server.py, and a report renders and writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tetrarch_cli.bench_server import (
    ALL_TUNED,
    DEFAULTS,
    SettingsReport,
    VariantResult,
    measure_server_settings,
    render_settings,
    sample_plan,
    variants,
    write_settings_report,
)
from tetrarch_cli.server import SQLITE_PRAGMAS, TUNED_DYNAMIC_CONFIG


def test_variants_run_from_the_defaults_through_each_setting_alone_to_all_tuned() -> None:
    vs = variants()
    assert vs[0].name == DEFAULTS and vs[0].dynamic_config == {} and vs[0].sqlite_pragmas == {}
    assert vs[-1].name == ALL_TUNED
    assert vs[-1].dynamic_config == TUNED_DYNAMIC_CONFIG and vs[-1].sqlite_pragmas == SQLITE_PRAGMAS
    assert len({v.name for v in vs}) == len(vs)
    assert all(v.reason.strip() for v in vs)
    singles = vs[1:-1]
    for key, value in TUNED_DYNAMIC_CONFIG.items():
        holding = [v for v in singles if key in v.dynamic_config]
        assert len(holding) == 1, key
        assert holding[0].dynamic_config[key] == value and holding[0].sqlite_pragmas == {}
    holding = [v for v in singles if v.sqlite_pragmas]
    assert len(holding) == 1 and holding[0].sqlite_pragmas == SQLITE_PRAGMAS and holding[0].dynamic_config == {}


def test_the_read_and_write_partitions_are_one_variant() -> None:
    both = {"matching.numTaskqueueReadPartitions", "matching.numTaskqueueWritePartitions"}
    assert [set(v.dynamic_config) for v in variants()[1:-1] if both & set(v.dynamic_config)] == [both]


def test_short_plan_is_smaller_than_full_and_samples_override_every_count() -> None:
    short, full = sample_plan(short=True), sample_plan(short=False)
    assert short.latency < full.latency and short.noop_total < full.noop_total
    assert short.update_total < full.update_total
    tiny = sample_plan(short=True, samples=4)
    assert (tiny.latency, tiny.noop_total, tiny.update_total) == (4, 4, 4)


def _empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


async def test_an_unknown_variant_name_is_refused_before_any_server_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such variant"):
        await measure_server_settings(short=True, state_root=tmp_path, only=["dev defaults", "fastest"])
    assert _empty(tmp_path)


def _report() -> SettingsReport:
    vs = variants()
    results = [
        VariantResult(variant=DEFAULTS, noop_p50_ms=50.0, noop_p95_ms=80.0, noop_per_second=40.0,
                      noop_load_p95_ms=400.0, update_per_second=10.0, update_ok=80, update_p50_ms=9.0,
                      update_p95_ms=14.0, update_errors={"RPCError(RESOURCE_EXHAUSTED)": 20},
                      sdk_warnings={"gRPC call update_workflow_execution retried N times": 7}, seconds=20.0),
        VariantResult(variant=vs[1].name, error="ServerError: port taken", seconds=1.0),
        VariantResult(variant=ALL_TUNED, noop_p50_ms=15.0, noop_p95_ms=28.0, noop_per_second=84.0,
                      noop_load_p95_ms=200.0, update_per_second=600.0, update_ok=100, update_p50_ms=6.0,
                      update_p95_ms=20.0, seconds=5.0),
    ]
    return SettingsReport(started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), mode="short",
                          machine={"cpus": 2, "temporalio": "1.35.0", "temporal_cli": "temporal version x"},
                          plan=sample_plan(short=True), variants=[vs[0], vs[1], vs[-1]], results=results)


def test_render_gives_each_variant_its_figures_and_ratio_to_the_defaults() -> None:
    text = render_settings(_report())
    lines = text.splitlines()
    tuned = next(line for line in lines if line.startswith(ALL_TUNED))
    assert "15.0 (0.30x)" in tuned and "84.0 (2.10x)" in tuned and "200 (0.50x)" in tuned
    assert "600 (60.00x)" in tuned
    defaults = next(line for line in lines if line.startswith(DEFAULTS))
    assert "50.0" in defaults and "x)" not in defaults
    assert "20/100: RPCError(RESOURCE_EXHAUSTED) x20" in defaults
    assert "ServerError: port taken" in text
    assert "retried N times x7" in text
    assert all(v.reason in text for v in _report().variants)


def test_render_without_the_defaults_gives_no_ratios() -> None:
    report = _report()
    report.results = [r for r in report.results if r.variant != DEFAULTS]
    assert "x)" not in render_settings(report)


def test_write_puts_the_whole_report_in_one_timestamped_file(tmp_path: Path) -> None:
    report = _report()
    path = write_settings_report(report, tmp_path / "out")
    assert path.name == "server-settings-20260102T030405Z.json"
    assert SettingsReport.model_validate(json.loads(path.read_text())) == report
