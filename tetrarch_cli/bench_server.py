"""Confirm the embedded dev server's tuning: each setting alone, against the dev server as it ships.

``tetrarch_cli.server`` starts the dev server with a few dynamic config values and SQLite pragmas, each
with a reason. This module measures those reasons: the same small workload (no-op workflows, Updates on
one entity) runs on a fresh headless server per variant, one server at a time (two would share the two
CPUs and spoil each other's figures): the dev defaults, each setting alone on top of them, and all of
them (what ``tetrarch up`` runs). Every figure is also given as a ratio to the defaults' in the same run,
since absolute times on a shared machine drift from run to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError
from temporalio.worker import Worker

from tetrarch_cli.bench import _latencies, _pct, _rate, machine_info, now_utc
from tetrarch_cli.server import SQLITE_PRAGMAS, TUNED_DYNAMIC_CONFIG, ServerConfig, free_port, start_server
from worker.connect import connect
from worker.run import workflow_runner
from workflows.bench import NoopEntityWorkflow, NoopWorkflow

DEFAULTS = "dev defaults"
ALL_TUNED = "all tuned"

#: Why each tuned dynamic config key is set (server.py's comments, in one place a report can show).
_REASONS: dict[str, str] = {
    "history.maxInFlightUpdates": "entity workflows take many concurrent Updates; the default cap of 10 "
                                  "in-flight Updates per workflow rejects them under load",
    "history.transferProcessorMaxPollRPS": "every workflow task otherwise waits ~40 ms for the transfer "
                                           "queue's poll (no-op p50 ~50 ms -> ~17 ms)",
    "matching.numTaskqueueReadPartitions": "one partition per task queue: a dev server has one matching host, and "
                                           "extra partitions only add forwarding hops (p95 under load ~3x lower)",
}

#: Keys that only make sense together, measured as one variant: (label, keys).
_TOGETHER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("task queue partitions=1", ("matching.numTaskqueueReadPartitions", "matching.numTaskqueueWritePartitions")),
)

_SQLITE_REASON = ("write-ahead logging with normal sync survives a process crash (not a power cut) and "
                  "should roughly double no-op throughput on this store")

TASK_QUEUE = "bench-settings"


class SettingsVariant(BaseModel):
    """One server configuration to measure, and why it is (or is not) set."""

    name: str
    reason: str
    dynamic_config: dict[str, str] = Field(default_factory=dict)
    sqlite_pragmas: dict[str, str] = Field(default_factory=dict)


class SamplePlan(BaseModel):
    """How many calls each measure makes, and how many are in flight for the rates."""

    latency: int
    noop_total: int
    noop_in_flight: int = 20
    update_total: int
    update_in_flight: int = 50
    warmup: int = 3


class VariantResult(BaseModel):
    """One variant's figures; ``None`` where it could not be measured (``error`` says why)."""

    variant: str
    noop_p50_ms: float | None = None
    noop_p95_ms: float | None = None
    noop_per_second: float | None = Field(default=None, description="No-op workflows completed per second.")
    noop_load_p95_ms: float | None = Field(default=None, description="p95 of one no-op workflow's start to "
                                                                     "result while the rate is measured.")
    update_per_second: float | None = Field(default=None, description="Updates accepted and answered per second.")
    update_ok: int = 0
    update_errors: dict[str, int] = Field(default_factory=dict,
                                          description="Updates that failed under load, by error type.")
    update_p50_ms: float | None = None
    update_p95_ms: float | None = None
    sdk_warnings: dict[str, int] = Field(default_factory=dict,
                                         description="The SDK core's warnings during the variant (calls it "
                                                     "retried, stale workflow tasks), by message, counted "
                                                     "instead of printed.")
    seconds: float | None = Field(default=None, description="Wall time of the variant, server start included.")
    error: str | None = None


class SettingsReport(BaseModel):
    """A whole run: the plan, the machine, one result per variant."""

    started_at: datetime
    mode: str
    machine: dict[str, Any]
    plan: SamplePlan
    variants: list[SettingsVariant] = Field(default_factory=list)
    results: list[VariantResult]


def variants() -> list[SettingsVariant]:
    """The dev defaults first, then each tuned setting alone on top of them, then all tuned (the project's)."""
    out = [SettingsVariant(name=DEFAULTS, reason="the dev server as it ships: no dynamic config, the SQLite "
                                                 "store's own pragmas")]
    group_of = {key: (label, keys) for label, keys in _TOGETHER for key in keys}
    seen: set[str] = set()
    for key, value in TUNED_DYNAMIC_CONFIG.items():
        if key in seen:
            continue
        label, keys = group_of.get(key, (f"{key}={value}", (key,)))
        together = {k: TUNED_DYNAMIC_CONFIG[k] for k in keys if k in TUNED_DYNAMIC_CONFIG}
        seen.update(together)
        reason = next((_REASONS[k] for k in together if k in _REASONS), "set in TUNED_DYNAMIC_CONFIG")
        out.append(SettingsVariant(name=label, reason=reason, dynamic_config=together))
    if SQLITE_PRAGMAS:
        out.append(SettingsVariant(name="sqlite " + ", ".join(f"{k}={v}" for k, v in SQLITE_PRAGMAS.items()),
                                   reason=_SQLITE_REASON, sqlite_pragmas=dict(SQLITE_PRAGMAS)))
    out.append(SettingsVariant(name=ALL_TUNED, reason="what tetrarch up runs: every setting above together",
                               dynamic_config=dict(TUNED_DYNAMIC_CONFIG), sqlite_pragmas=dict(SQLITE_PRAGMAS)))
    return out


def sample_plan(short: bool, samples: int | None = None) -> SamplePlan:
    """Short: well under a minute and a half for all variants on 2 cores; full: more. ``samples`` sets every count."""
    if samples is not None:
        return SamplePlan(latency=samples, noop_total=samples, update_total=samples, warmup=1)
    if short:
        return SamplePlan(latency=30, noop_total=150, update_total=100)
    return SamplePlan(latency=200, noop_total=1000, update_total=1000, warmup=10)


def error_name(e: BaseException) -> str:
    """A short, countable name for a failed call: the type, with the gRPC status or the Update's cause."""
    if isinstance(e, RPCError):
        return f"RPCError({e.status.name})"
    if isinstance(e, WorkflowUpdateFailedError) and e.cause is not None:
        return f"WorkflowUpdateFailedError({type(e.cause).__name__})"
    return type(e).__name__


async def _counted_rate(total: int, in_flight: int, call: Callable[[int], Awaitable[object]],
                        errors: dict[str, int]) -> tuple[int, float]:
    """Calls that succeeded and their rate per second, with ``in_flight`` at once; failures counted, not raised."""
    ok = 0

    async def counted(i: int) -> None:
        nonlocal ok
        try:
            await call(i)
        except Exception as e:  # a rejected Update is a figure here, not a crash
            errors[error_name(e)] = errors.get(error_name(e), 0) + 1
        else:
            ok += 1

    t = time.perf_counter()
    await _rate(total, in_flight, counted)
    return ok, ok / (time.perf_counter() - t)


def _ms(samples_s: list[float], q: float) -> float:
    return round(_pct([s * 1000 for s in samples_s], q), 3)


class _CountCoreLogs(logging.Filter):
    """Counts the SDK core's forwarded log lines by message (digits as N) and keeps them off stderr."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def filter(self, record: logging.LogRecord) -> bool:
        core = getattr(record, "temporal_log", None)
        text = str(getattr(core, "message", record.getMessage()))
        if record.levelno >= logging.WARNING:
            key = re.sub(r"\d+", "N", text)
            self.counts[key] = self.counts.get(key, 0) + 1
        return False


async def _workload(client: Client, plan: SamplePlan, result: VariantResult) -> None:
    """The measures, against a server with a worker already polling :data:`TASK_QUEUE`."""
    run_id = uuid.uuid4().hex[:8]

    async def noop(i: int) -> object:
        return await client.execute_workflow(NoopWorkflow.run, id=f"settings/noop/{run_id}/{i}",
                                             task_queue=TASK_QUEUE)

    for i in range(plan.warmup):  # the first calls pay for caches and pollers, not for the settings
        await noop(-1 - i)
    lat = await _latencies(plan.latency, noop)
    result.noop_p50_ms, result.noop_p95_ms = _ms(lat, 0.5), _ms(lat, 0.95)
    loaded_lat: list[float] = []

    async def timed_noop(i: int) -> None:
        t = time.perf_counter()
        await noop(plan.latency + i)
        loaded_lat.append(time.perf_counter() - t)

    result.noop_per_second = round(await _rate(plan.noop_total, plan.noop_in_flight, timed_noop), 1)
    result.noop_load_p95_ms = _ms(loaded_lat, 0.95)

    sequential = await client.start_workflow(NoopEntityWorkflow.run, id=f"settings/entity/{run_id}/seq",
                                             task_queue=TASK_QUEUE)
    loaded = await client.start_workflow(NoopEntityWorkflow.run, id=f"settings/entity/{run_id}/load",
                                         task_queue=TASK_QUEUE)
    try:
        for _ in range(plan.warmup):
            await sequential.execute_update(NoopEntityWorkflow.touch)
            await loaded.execute_update(NoopEntityWorkflow.touch)
        lat = await _latencies(plan.latency, lambda i: sequential.execute_update(NoopEntityWorkflow.touch))
        result.update_p50_ms, result.update_p95_ms = _ms(lat, 0.5), _ms(lat, 0.95)
        errors: dict[str, int] = {}
        ok, rate = await _counted_rate(plan.update_total, plan.update_in_flight,
                                       lambda i: loaded.execute_update(NoopEntityWorkflow.touch), errors)
        result.update_ok, result.update_errors = ok, errors
        result.update_per_second = round(rate, 1) if ok else None
    finally:
        for handle in (sequential, loaded):
            with contextlib.suppress(Exception):  # the server is about to go; a run left open does not matter
                await handle.signal(NoopEntityWorkflow.stop)


async def measure_variant(variant: SettingsVariant, plan: SamplePlan, state_dir: Path,
                          time_limit: float | None = None) -> VariantResult:
    """Start a fresh headless server with ``variant``'s settings, measure, and stop it (worker first).

    A failure is recorded in the result's ``error`` so the other variants still run; cancellation
    (Ctrl-C) is not caught. The server is stopped in every case.
    """
    result = VariantResult(variant=variant.name)
    config = ServerConfig(state_dir=state_dir, port=free_port(), headless=True,
                          dynamic_config=dict(variant.dynamic_config), sqlite_pragmas=dict(variant.sqlite_pragmas))
    core_log = logging.getLogger("temporalio.core")
    counter = _CountCoreLogs(result.sdk_warnings)
    core_log.addFilter(counter)
    t = time.perf_counter()
    try:
        async with asyncio.timeout(time_limit):
            server = await start_server(config)
            try:
                client = await connect(config.address, config.namespace)
                async with Worker(client, task_queue=TASK_QUEUE, workflows=[NoopWorkflow, NoopEntityWorkflow],
                                  workflow_runner=workflow_runner()):
                    await _workload(client, plan, result)
            finally:
                server.stop()
    except Exception as e:
        result.error = f"{error_name(e)}: {e}" if str(e) else error_name(e)
    finally:
        await asyncio.sleep(0.2)  # the core forwards its log lines in batches a few ms late
        core_log.removeFilter(counter)
    result.seconds = round(time.perf_counter() - t, 1)
    return result


async def measure_server_settings(short: bool, state_root: Path, only: list[str] | None = None,
                                  samples: int | None = None, variant_timeout: float | None = None,
                                  ) -> SettingsReport:
    """Measure every variant (or those named in ``only``), one fresh server after another.

    Each server keeps its SQLite file in a new directory under ``state_root``. ``samples`` overrides
    every count of the plan (for tests); ``variant_timeout`` bounds one variant, server start included
    (default: 5 minutes short, 20 full).
    """
    chosen = variants()
    if only is not None:
        known = {v.name for v in chosen}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise ValueError(f"no such variant: {', '.join(unknown)}; known: {', '.join(v.name for v in chosen)}")
        chosen = [v for v in chosen if v.name in only]
    plan = sample_plan(short, samples)
    started = now_utc()
    timeout = variant_timeout if variant_timeout is not None else (300.0 if short else 1200.0)
    results = []
    for i, variant in enumerate(chosen):
        results.append(await measure_variant(variant, plan, _fresh_dir(state_root, f"{i}-"), timeout))
    return SettingsReport(started_at=started, mode="short" if short else "full", machine=machine_info(),
                          plan=plan, variants=chosen, results=results)


def _fresh_dir(root: Path, prefix: str) -> Path:
    """A new, empty directory under ``root``: each server starts on a SQLite file of its own."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def _num(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def _with_ratio(v: float | None, base: float | None, show: bool) -> str:
    r = _ratio(v, base)
    return _num(v) + (f" ({r:.2f}x)" if show and r is not None else "")


def _errors_cell(r: VariantResult, plan: SamplePlan) -> str:
    failed = sum(r.update_errors.values())
    if not failed:
        return f"0/{plan.update_total}"
    kinds = ", ".join(f"{name} x{n}" for name, n in sorted(r.update_errors.items(), key=lambda kv: -kv[1]))
    return f"{failed}/{plan.update_total}: {kinds}"


def render_settings(report: SettingsReport) -> str:
    """The table people read: each variant's figures, with its ratio to the dev defaults' in brackets."""
    from tetrarch_cli.render import table

    base = next((r for r in report.results if r.variant == DEFAULTS and r.error is None), None)
    rows = []
    for r in report.results:
        show = base is not None and r is not base
        b = base or VariantResult(variant=DEFAULTS)
        rows.append([r.variant,
                     _with_ratio(r.noop_p50_ms, b.noop_p50_ms, show),
                     _with_ratio(r.noop_p95_ms, b.noop_p95_ms, show),
                     _with_ratio(r.noop_per_second, b.noop_per_second, show),
                     _with_ratio(r.noop_load_p95_ms, b.noop_load_p95_ms, show),
                     _with_ratio(r.update_p50_ms, b.update_p50_ms, show),
                     _with_ratio(r.update_per_second, b.update_per_second, show),
                     _errors_cell(r, report.plan) if r.error is None else "-",
                     sum(r.sdk_warnings.values()), _num(r.seconds)])
    p = report.plan
    head = (f"tetrarch server settings ({report.mode}), {report.started_at.isoformat(timespec='seconds')}, "
            f"{report.machine.get('cpus')} CPUs, temporalio {report.machine.get('temporalio')}, "
            f"{report.machine.get('temporal_cli')}\n"
            f"{p.latency} sequential calls per latency; {p.noop_total} no-op workflows with "
            f"{p.noop_in_flight} in flight (their p95: loaded); {p.update_total} Updates on one entity with "
            f"{p.update_in_flight} in flight. In brackets: the ratio to the dev defaults' figure (lower is "
            "better for ms, higher for /s).")
    body = table(["variant", "no-op p50 ms", "no-op p95 ms", "no-op/s", "p95 ms loaded", "Update p50 ms",
                  "Updates/s", "Updates failed", "SDK warnings", "s"], rows)
    notes = [f"  {v.name}: {v.reason}" for v in report.variants]
    failures = [f"  {r.variant}: {r.error}" for r in report.results if r.error]
    warnings = [f"  {r.variant}: " + "; ".join(f"{msg} x{n}" for msg, n in sorted(r.sdk_warnings.items(),
                                                                                 key=lambda kv: -kv[1]))
                for r in report.results if r.sdk_warnings]
    out = head + "\n\n" + body
    if failures:
        out += "\n\nfailed:\n" + "\n".join(failures)
    if warnings:
        out += "\n\nSDK warnings (counted, not printed):\n" + "\n".join(warnings)
    if notes:
        out += "\n\nvariants:\n" + "\n".join(notes)
    return out


def write_settings_report(report: SettingsReport, out_dir: Path) -> Path:
    """One JSON file per run: ``server-settings-<UTC time>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"server-settings-{report.started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return path

