"""The ``tetrarch`` command line.

Every command takes ``--json`` for machine-readable output (one JSON document on stdout; errors
too, with a non-zero exit code). Connection options come before the command:
``tetrarch --address host:7233 --json domain list``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import BaseModel, ValidationError
from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError

from tetrarch.agent import TaskInput
from tetrarch.bootstrap import DEFAULT_BOOTSTRAP, HierarchySpec, load_bootstrap
from tetrarch.decisions import PolicyCheck
from tetrarch.errors import NotFound, TetrarchError
from tetrarch.images import Narrowing, ParameterRange
from tetrarch.lifecycle_ops import (
    CheckpointRequest,
    CloneRequest,
    CoordinateRequest,
    MergeRequest,
    RestoreRequest,
    SpecializeRequest,
    SplitRequest,
    UpgradeRequest,
)
from tetrarch.models import LevelRef
from tetrarch.names import Level
from tetrarch.operations import (
    ApplyResult,
    BatchAgent,
    BatchSpawnRequest,
    ConfigureDomainRequest,
    ConfigureSupervisorRequest,
    CreateDomainRequest,
    CreateSupervisorRequest,
    PolicyChangeResult,
    RemoveDomainRequest,
    RemoveSupervisorRequest,
    ScaleSupervisorsRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
    StopAgentRequest,
    SystemStatus,
)
from tetrarch.policy import TEMPLATES, OperationType, PlacementStrategy, Policy
from tetrarch.resource_ops import AllocateRequest, BalanceRequest, ReclaimRequest, ReleaseRequest
from tetrarch.resources import Resources
from tetrarch_cli import render
from tetrarch_cli.client import TetrarchClient
from tetrarch_cli.image_cli import image
from tetrarch_cli.schemas import export_schemas, file_name
from tetrarch_cli.server import ServerConfig, ServerError, ensure_search_attributes, free_port, start_server
from worker.connect import DEFAULT_ADDRESS, connect
from worker.run import parse_levels, run_workers

T = TypeVar("T")

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class Ctx:
    """Options shared by every command."""

    def __init__(self, address: str | None, namespace: str, prefix: str, as_json: bool) -> None:
        self.address = address
        self.namespace = namespace
        self.prefix = prefix
        self.json = as_json


def _emit(ctx: Ctx, value: Any, human: Callable[[], str]) -> None:
    if ctx.json:
        if isinstance(value, BaseModel):
            click.echo(value.model_dump_json(indent=2))
        else:
            click.echo(json.dumps(_jsonable(value), indent=2))
    else:
        click.echo(human())


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _fail(ctx: Ctx, code: int, kind: str, message: str, problems: list[str] | None = None,
          level: str = "client", extra: dict[str, Any] | None = None) -> None:
    if ctx.json:
        click.echo(json.dumps({"error": {"code": kind, "level": level, "message": message,
                                         "problems": problems or [], **(extra or {})}}, indent=2))
    else:
        click.echo(f"error [{kind}]: {message}", err=True)
        for p in problems or []:
            click.echo(f"  - {p}", err=True)
    sys.exit(code)


def _run(ctx: Ctx, work: Callable[[TetrarchClient], Awaitable[T]]) -> T:
    """Connect, run ``work``, and turn every failure into a clear message and exit code."""
    address = ctx.address or DEFAULT_ADDRESS

    async def go() -> T:
        try:
            client = await connect(address, ctx.namespace)
        except Exception as e:
            raise ConnectionError(str(e)) from e
        return await work(TetrarchClient(client, ctx.prefix))

    try:
        return asyncio.run(go())
    except TetrarchError as e:
        info = e.info()
        _fail(ctx, EXIT_REFUSED, info.code, str(e), info.problems, info.level,
              {"entity": info.entity, "data": info.data})
    except ConnectionError as e:
        _fail(ctx, EXIT_UNREACHABLE, "Unreachable",
              f"cannot reach Temporal at {address} ({e}); start it with `tetrarch up` or pass --address")
    except (RPCError, WorkflowQueryFailedError) as e:
        _fail(ctx, EXIT_UNREACHABLE, "Unavailable",
              f"Temporal at {address} could not answer ({e}); are the level workers running "
              "(`tetrarch up` or `tetrarch worker --level all`)?")
    raise AssertionError("unreachable")


def _resources(cpu: str | None, memory: str | None, gpu: int | None,
               default: Resources | None) -> Resources | None:
    if cpu is None and memory is None and gpu is None:
        return default
    base = default or Resources()
    data: dict[str, Any] = {"cpu_millis": base.cpu_millis, "memory_mib": base.memory_mib, "gpu": base.gpu}
    try:
        if cpu is not None:
            data["cpu"] = cpu
            data.pop("cpu_millis")
        if memory is not None:
            data["memory"] = memory
            data.pop("memory_mib")
        if gpu is not None:
            data["gpu"] = gpu
        return Resources.model_validate(data)
    except ValidationError as e:
        raise click.BadParameter("; ".join(err["msg"] for err in e.errors())) from None


def _policy(max_children: int | None) -> Policy | None:
    return None if max_children is None else Policy(max_children=max_children)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctx).json = True


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` accepted after any command too (``tetrarch status --json``)."""
    return click.option("--json", "json_flag", is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_json, help="Machine-readable output.")(f)


def resource_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--cpu / --memory / --gpu."""
    f = click.option("--gpu", type=int, default=None, help="Whole GPUs.")(f)
    f = click.option("--memory", default=None, help="Memory quantity, e.g. 10Gi or 512Mi.")(f)
    return click.option("--cpu", default=None, help="CPU cores (2, 0.5) or millicores (500m).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--address", envvar="TEMPORAL_ADDRESS", default=None,
              help=f"Temporal frontend host:port (env TEMPORAL_ADDRESS; default {DEFAULT_ADDRESS}).")
@click.option("--namespace", envvar="TEMPORAL_NAMESPACE", default="default", show_default=True)
@click.option("--prefix", envvar="TETRARCH_QUEUE_PREFIX", default="",
              help="Task-queue prefix of this deployment (env TETRARCH_QUEUE_PREFIX).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cli(ctx: click.Context, address: str | None, namespace: str, prefix: str, as_json: bool) -> None:
    """tetrarch: a durable four-level agent hierarchy (orchestrator, managers, supervisors, agents)."""
    ctx.obj = Ctx(address, namespace, prefix, as_json)


# -- up and worker ---------------------------------------------------------------------------------


@cli.command()
@click.option("--file", "file_", type=click.Path(path_type=Path), default=None,
              help="Hierarchy file (YAML or JSON) to apply. Without it, the seed's example layout is applied "
                   "on first start only, and an existing hierarchy is kept as it is.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path(".tetrarch"), show_default=True,
              help="Where the embedded server keeps its SQLite file and log.")
@click.option("--port", type=int, default=7233, show_default=True, help="Embedded server gRPC port.")
@click.option("--ui-port", type=int, default=8233, show_default=True, help="Embedded server Web UI port.")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Address the embedded server binds.")
@click.option("--no-workers", is_flag=True, help="Start no workers here (they run elsewhere).")
@click.option("--exit-after-apply", is_flag=True, help="Stop everything once the hierarchy is applied.")
@json_option
@click.pass_obj
def up(ctx: Ctx, file_: Path | None, state_dir: Path, port: int, ui_port: int, ip: str, no_workers: bool,
       exit_after_apply: bool) -> None:
    """Start the embedded Temporal server (unless --address names one), the four level workers and the
    hierarchy (from --file, else the seed's layout on first start); print the Web UI's address; run until
    interrupted."""
    try:
        spec = load_bootstrap(file_ or DEFAULT_BOOTSTRAP)
    except TetrarchError as e:
        _fail(ctx, EXIT_USAGE, e.code, str(e), e.problems)
    try:
        asyncio.run(_up(ctx, spec, state_dir, port, ui_port, ip, no_workers, exit_after_apply,
                        only_if_new=file_ is None))
    except ServerError as e:
        _fail(ctx, EXIT_UNREACHABLE, "ServerError", str(e))
    except ConnectionError as e:
        _fail(ctx, EXIT_UNREACHABLE, "Unreachable", str(e))
    except TetrarchError as e:
        _fail(ctx, EXIT_REFUSED, e.code, str(e), e.problems, e.level)
    except Interrupted:
        _fail(ctx, EXIT_INTERRUPTED, "Interrupted", "stopped before the hierarchy was applied; an apply "
              "already started completes on the server once workers run")


async def _up(ctx: Ctx, spec: HierarchySpec, state_dir: Path, port: int, ui_port: int, ip: str, no_workers: bool,
              exit_after_apply: bool, only_if_new: bool = False) -> None:
    # Signals are handled from the start: Ctrl-C or SIGTERM while the server starts or the hierarchy
    # is being applied (which waits for workers, forever with --no-workers and none elsewhere) must
    # still stop everything, and never leave the server process behind.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = None
    if ctx.address:
        address, ui = ctx.address, None
    else:
        config = ServerConfig(state_dir=state_dir, ip=ip, port=port, ui_port=ui_port, namespace=ctx.namespace)
        server = await _unless_stopped(stop, start_server(config))
        address, ui = config.address, config.ui_url
    worker_task = None
    try:
        try:
            client = await connect(address, ctx.namespace)
        except Exception as e:
            raise ConnectionError(f"cannot reach Temporal at {address} ({e}); check --address / "
                                  "TEMPORAL_ADDRESS, or leave it unset to start the embedded server") from e
        await ensure_search_attributes(client, ctx.namespace)
        if not no_workers:
            worker_task = asyncio.create_task(run_workers(client, list(Level), ctx.prefix, stop))
        tc = TetrarchClient(client, ctx.prefix)
        applied, expected = await _unless_stopped(stop, _apply_or_keep(tc, spec, only_if_new))
        status = await _unless_stopped(stop, _settled_status(tc, expected))
        ready = {"address": address, "namespace": ctx.namespace, "ui": ui,
                 "ui_workflows": f"{ui}/namespaces/{ctx.namespace}/workflows" if ui else None,
                 "state_dir": str(state_dir) if server else None, "applied": applied.model_dump(),
                 "status": status.model_dump(mode="json")}
        if ctx.json:
            click.echo(json.dumps(ready))
        else:
            click.echo(render.system_status(status))
            click.echo("")
            click.echo(f"created: {', '.join(applied.created) or 'nothing (already in place)'}")
            click.echo(f"Temporal server: {address} (namespace {ctx.namespace})")
            if ui:
                click.echo(f"Temporal Web UI: {ui}/namespaces/{ctx.namespace}/workflows")
            click.echo("Running. Press Ctrl-C to stop." if not exit_after_apply else "Done.")
        sys.stdout.flush()
        if not exit_after_apply:
            await stop.wait()
        stop.set()
        if worker_task is not None:
            await worker_task
    except BaseException:
        # Refused, interrupted or failed before ready: stop the workers while the server still runs
        # (a worker cannot shut down against a server that is gone: it would retry forever).
        stop.set()
        if worker_task is not None:
            await worker_task
        raise
    finally:
        if server is not None:
            server.stop()


async def _apply_or_keep(tc: TetrarchClient, spec: HierarchySpec,
                         only_if_new: bool) -> tuple[ApplyResult, HierarchySpec]:
    """Apply ``spec``; with ``only_if_new``, keep an existing hierarchy as it is (it may have been
    changed since the first start, and the default layout must not fight those changes).

    Returns what was applied and the hierarchy the status should settle on.
    """
    if only_if_new:
        try:
            existing = await tc.list_domains()
        except NotFound:
            pass
        else:
            return ApplyResult(unchanged=["orchestrator"] + [f"domain {c.name}" for c in existing]), HierarchySpec()
    return await tc.apply(spec), spec


class Interrupted(Exception):
    """A stop signal arrived before ``up`` was ready."""


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T:
    """Await ``work``, unless ``stop`` is set first: then cancel it and raise :class:`Interrupted`."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Interrupted
    return task.result()


async def _settled_status(tc: TetrarchClient, spec: HierarchySpec, attempts: int = 50) -> SystemStatus:
    """System status once the upward reports have caught up with what was just applied (or ~10 s)."""
    want_supervisors = sum(len(d.supervisors) for d in spec.domains)
    want_agents = sum(s.agents for d in spec.domains for s in d.supervisors)
    status = await tc.system_status()
    for _ in range(attempts):
        if (status.supervisors >= want_supervisors and status.agents_total >= want_agents
                and "starting" not in status.agents_by_status):
            break
        await asyncio.sleep(0.2)
        status = await tc.system_status()
    return status


@cli.command()
@click.option("--level", type=click.Choice([lv.value for lv in Level] + ["all"]), required=True,
              help="Which level's task queue to serve (all: the four in one process).")
@json_option
@click.pass_obj
def worker(ctx: Ctx, level: str) -> None:
    """Run the worker of one level (or all four) against the server at --address."""
    address = ctx.address or DEFAULT_ADDRESS

    async def go() -> None:
        try:
            client = await connect(address, ctx.namespace)
        except Exception as e:
            raise ConnectionError(str(e)) from e
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        levels = parse_levels(level)
        click.echo(f"worker for {', '.join(lv.value for lv in levels)} on {address} "
                   f"(queue prefix {ctx.prefix!r})", err=True)
        await run_workers(client, levels, ctx.prefix, stop)

    try:
        asyncio.run(go())
    except ConnectionError as e:
        _fail(ctx, EXIT_UNREACHABLE, "Unreachable", f"cannot reach Temporal at {address} ({e})")


@cli.command()
@click.argument("file_", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Only validate the file; apply nothing.")
@json_option
@click.pass_obj
def apply(ctx: Ctx, file_: Path, check: bool) -> None:
    """Apply a hierarchy file (idempotent: applying it twice changes nothing)."""
    try:
        spec = load_bootstrap(file_)
    except TetrarchError as e:
        _fail(ctx, EXIT_USAGE, e.code, str(e), e.problems)
    if check:
        _emit(ctx, {"valid": True, "domains": len(spec.domains)}, lambda: f"{file_} is valid")
        return
    result = _run(ctx, lambda tc: tc.apply(spec))
    _emit(ctx, result, lambda: f"created: {', '.join(result.created) or 'nothing (already in place)'}")


# -- status ------------------------------------------------------------------------------------------


@cli.command()
@click.argument("path", required=False)
@json_option
@click.pass_obj
def status(ctx: Ctx, path: str | None) -> None:
    """Status of the system, a domain (DOMAIN), a supervisor (DOMAIN/SUP) or an agent (agent:DOMAIN/NAME)."""
    if path is None:
        st = _run(ctx, lambda tc: tc.system_status())
        _emit(ctx, st, lambda: render.system_status(st))
        return
    if path.startswith("agent:"):
        domain, _, name = path.removeprefix("agent:").partition("/")
        ag = _run(ctx, lambda tc: tc.agent_status(domain, name))
        _emit(ctx, ag, lambda: render.agent_state(ag))
        return
    domain, _, sup = path.partition("/")
    view = _run(ctx, lambda tc: tc.supervisor_status(domain, sup) if sup else tc.domain_status(domain))
    _emit(ctx, view, lambda: render.level_view(view))


# -- domains -----------------------------------------------------------------------------------------


@cli.group()
def domain() -> None:
    """Create, configure, list, inspect and remove domains (managers)."""


@domain.command("create")
@click.argument("name")
@resource_options
@click.option("--max-supervisors", type=int, default=None, help="Policy: most supervisors in this domain.")
@click.option("--request-id", default="", help="Idempotency key (retrying with it never creates twice).")
@json_option
@click.pass_obj
def domain_create(ctx: Ctx, name: str, cpu: str | None, memory: str | None, gpu: int | None,
                  max_supervisors: int | None, request_id: str) -> None:
    """Create domain NAME (default pool 100 CPU / 100Gi)."""
    res = _resources(cpu, memory, gpu, Resources.of(cpu=100, memory="100Gi"))
    assert res is not None
    req = CreateDomainRequest(domain=name, resources=res, policy=_policy(max_supervisors) or Policy(),
                              request_id=request_id)
    r = _run(ctx, lambda tc: tc.create_domain(req))
    _emit(ctx, r, lambda: f"domain {name} {'created' if r.created else 'already exists (unchanged)'}: "
                          f"{r.domain.resources.human()}")


@domain.command("configure")
@click.argument("name")
@resource_options
@click.option("--max-supervisors", type=int, default=None)
@json_option
@click.pass_obj
def domain_configure(ctx: Ctx, name: str, cpu: str | None, memory: str | None, gpu: int | None,
                     max_supervisors: int | None) -> None:
    """Resize domain NAME's pool or set its supervisor limit."""
    req = ConfigureDomainRequest(domain=name)
    if cpu is not None or memory is not None or gpu is not None or max_supervisors is not None:
        view = _run(ctx, lambda tc: tc.domain_status(name))
        if cpu is not None or memory is not None or gpu is not None:
            req.resources = _resources(cpu, memory, gpu, view.pool.capacity)
        if max_supervisors is not None:  # change this one rule; the rest of the policy stays in force
            req.policy = view.policy.model_copy(update={"max_children": max_supervisors})
    r = _run(ctx, lambda tc: tc.configure_domain(req))
    _emit(ctx, r, lambda: f"domain {name} configured: {r.domain.resources.human()}")


@domain.command("list")
@json_option
@click.pass_obj
def domain_list(ctx: Ctx) -> None:
    """List the domains."""
    children = _run(ctx, lambda tc: tc.list_domains())
    _emit(ctx, children, lambda: render.children_table(children, "domain"))


@domain.command("status")
@click.argument("name")
@json_option
@click.pass_obj
def domain_status(ctx: Ctx, name: str) -> None:
    """Show domain NAME: pool, policy, health and supervisors."""
    view = _run(ctx, lambda tc: tc.domain_status(name))
    _emit(ctx, view, lambda: render.level_view(view))


@domain.command("remove")
@click.argument("name")
@click.option("--drain", is_flag=True, help="Remove its supervisors (stopping their agents) first.")
@json_option
@click.pass_obj
def domain_remove(ctx: Ctx, name: str, drain: bool) -> None:
    """Remove domain NAME (refused while it has supervisors, unless --drain)."""
    r = _run(ctx, lambda tc: tc.remove_domain(RemoveDomainRequest(domain=name, drain=drain)))
    _emit(ctx, r, lambda: f"domain {name} removed" + (f" (drained {', '.join(r.drained)})" if r.drained else ""))


# -- supervisors -------------------------------------------------------------------------------------


@cli.group()
def supervisor() -> None:
    """Create, configure, scale, list, inspect and remove supervisors."""


@supervisor.command("create")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@resource_options
@click.option("--max-agents", type=int, default=None, help="Policy: most agents under this supervisor.")
@click.option("--request-id", default="")
@json_option
@click.pass_obj
def supervisor_create(ctx: Ctx, domain_name: str, name: str, cpu: str | None, memory: str | None,
                      gpu: int | None, max_agents: int | None, request_id: str) -> None:
    """Create supervisor NAME in DOMAIN (default pool 10 CPU / 10Gi)."""
    res = _resources(cpu, memory, gpu, Resources.of(cpu=10, memory="10Gi"))
    assert res is not None
    req = CreateSupervisorRequest(domain=domain_name, name=name, resources=res,
                                  policy=_policy(max_agents) or Policy(), request_id=request_id)
    r = _run(ctx, lambda tc: tc.create_supervisor(req))
    _emit(ctx, r, lambda: f"supervisor {domain_name}/{name} "
                          f"{'created' if r.created else 'already exists (unchanged)'}: "
                          f"{r.supervisor.resources.human()}")


@supervisor.command("configure")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@resource_options
@click.option("--max-agents", type=int, default=None)
@json_option
@click.pass_obj
def supervisor_configure(ctx: Ctx, domain_name: str, name: str, cpu: str | None, memory: str | None,
                         gpu: int | None, max_agents: int | None) -> None:
    """Resize supervisor NAME's pool or set its agent limit."""
    req = ConfigureSupervisorRequest(domain=domain_name, name=name)
    if cpu is not None or memory is not None or gpu is not None or max_agents is not None:
        view = _run(ctx, lambda tc: tc.supervisor_status(domain_name, name))
        if cpu is not None or memory is not None or gpu is not None:
            req.resources = _resources(cpu, memory, gpu, view.pool.capacity)
        if max_agents is not None:  # change this one rule; the rest of the policy stays in force
            req.policy = view.policy.model_copy(update={"max_children": max_agents})
    r = _run(ctx, lambda tc: tc.configure_supervisor(req))
    _emit(ctx, r, lambda: f"supervisor {domain_name}/{name} configured: {r.supervisor.resources.human()}")


@supervisor.command("list")
@click.argument("domain_name", metavar="DOMAIN")
@json_option
@click.pass_obj
def supervisor_list(ctx: Ctx, domain_name: str) -> None:
    """List the supervisors of DOMAIN."""
    children = _run(ctx, lambda tc: tc.list_supervisors(domain_name))
    _emit(ctx, children, lambda: render.children_table(children, "supervisor"))


@supervisor.command("status")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@json_option
@click.pass_obj
def supervisor_status(ctx: Ctx, domain_name: str, name: str) -> None:
    """Show supervisor NAME of DOMAIN: pool, policy, health and agents."""
    view = _run(ctx, lambda tc: tc.supervisor_status(domain_name, name))
    _emit(ctx, view, lambda: render.level_view(view))


@supervisor.command("remove")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.option("--drain", is_flag=True, help="Stop its agents cleanly first.")
@json_option
@click.pass_obj
def supervisor_remove(ctx: Ctx, domain_name: str, name: str, drain: bool) -> None:
    """Remove supervisor NAME of DOMAIN (refused while it has agents, unless --drain)."""
    r = _run(ctx, lambda tc: tc.remove_supervisor(
        RemoveSupervisorRequest(domain=domain_name, name=name, drain=drain)))
    _emit(ctx, r, lambda: f"supervisor {domain_name}/{name} removed"
                          + (f" (stopped {', '.join(r.drained)})" if r.drained else ""))


@supervisor.command("scale")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("delta", type=int)
@resource_options
@click.option("--prefix", "name_prefix", default="sup", show_default=True, help="Names of added supervisors.")
@click.option("--drain", is_flag=True, help="Allow removing supervisors that still have agents.")
@json_option
@click.pass_obj
def supervisor_scale(ctx: Ctx, domain_name: str, delta: int, cpu: str | None, memory: str | None,
                     gpu: int | None, name_prefix: str, drain: bool) -> None:
    """Add DELTA supervisors to DOMAIN (negative: remove, emptiest first). Use -- before a negative DELTA."""
    res = _resources(cpu, memory, gpu, Resources.of(cpu=10, memory="10Gi"))
    assert res is not None
    req = ScaleSupervisorsRequest(domain=domain_name, delta=delta, resources=res, name_prefix=name_prefix,
                                  drain=drain)
    r = _run(ctx, lambda tc: tc.scale_supervisors(req))
    _emit(ctx, r, lambda: f"domain {domain_name}: added [{', '.join(r.added)}] removed [{', '.join(r.removed)}]")


# -- agents ------------------------------------------------------------------------------------------


@cli.group()
def agent() -> None:
    """Spawn, stop, list and inspect agents."""


@agent.command("spawn")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("supervisor_name", metavar="SUPERVISOR")
@click.argument("name")
@resource_options
@click.option("--priority", type=int, default=0, show_default=True, help="Preemption takes lower priorities first.")
@click.option("--placement", type=click.Choice([p.value for p in PlacementStrategy]), default=None,
              help="With SUPERVISOR '-': how the domain places it (default: the domain policy's, else spread).")
@click.option("--image", default=None, help="The signed image it runs: name[@version] in the image store, or a path.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="An image parameter (JSON value).")
@click.option("--depends-on", "depends_on", multiple=True, metavar="AGENT",
              help="An agent of the domain it needs: the spawn waits until it runs.")
@click.option("--request-id", default="")
@json_option
@click.pass_obj
def agent_spawn(ctx: Ctx, domain_name: str, supervisor_name: str, name: str, cpu: str | None,
                memory: str | None, gpu: int | None, priority: int, placement: str | None, image: str | None,
                params: tuple[str, ...], depends_on: tuple[str, ...], request_id: str) -> None:
    """Spawn agent NAME under SUPERVISOR of DOMAIN (default 1 CPU / 1Gi); SUPERVISOR '-' lets the domain place it.

    What the supervisor's pool cannot pay is borrowed from the domain's pool, then the global pool.
    """
    req = SpawnAgentRequest(domain=domain_name, supervisor=None if supervisor_name == "-" else supervisor_name,
                            name=name, resources=_resources(cpu, memory, gpu, None), request_id=request_id,
                            priority=priority, placement=PlacementStrategy(placement) if placement else None,
                            image=image, params=_params(params), depends_on=list(depends_on))
    r = _run(ctx, lambda tc: tc.spawn_agent(req))
    borrowed = f", {r.borrowed.human()} borrowed from above" if r.borrowed and not r.borrowed.is_zero() else ""
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} {'spawned' if r.created else 'already running'} "
                          f"under {r.supervisor or supervisor_name}: {r.agent.resources.human()}{borrowed}")


@agent.command("batch")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("supervisor_name", metavar="SUPERVISOR")
@click.argument("count", type=click.IntRange(1, 1000))
@resource_options
@click.option("--prefix", "name_prefix", default="agent", show_default=True, help="Agents are named <prefix>-<n>.")
@click.option("--best-effort", is_flag=True, help="Spawn what can be spawned; by default all or nothing.")
@click.option("--request-id", default="")
@json_option
@click.pass_obj
def agent_batch(ctx: Ctx, domain_name: str, supervisor_name: str, count: int, cpu: str | None, memory: str | None,
                gpu: int | None, name_prefix: str, best_effort: bool, request_id: str) -> None:
    """Spawn COUNT agents under SUPERVISOR of DOMAIN in one validation pass ('-': the domain places them)."""
    each = _resources(cpu, memory, gpu, None)
    req = BatchSpawnRequest(domain=domain_name, supervisor=None if supervisor_name == "-" else supervisor_name,
                            agents=[BatchAgent(name=f"{name_prefix}-{i}", resources=each) for i in range(1, count + 1)],
                            all_or_nothing=not best_effort, request_id=request_id)
    r = _run(ctx, lambda tc: tc.batch_spawn(req))

    def human() -> str:
        lines = [f"domain {r.domain}, supervisor {r.supervisor}: {r.spawned} spawned, {r.refused} refused"]
        lines += [f"  {o.name}: {o.error.code}: {o.error.message}" for o in r.agents if o.error is not None]
        return "\n".join(lines)

    _emit(ctx, r, human)
    if r.refused:
        sys.exit(EXIT_REFUSED)


@agent.command("task")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.argument("intent")
@click.option("--input", "input_json", default="{}", show_default=True, help="The task's input, a JSON object.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Wall-clock seconds per attempt.")
@click.option("--retries", type=click.IntRange(0, 10), default=None,
              help="Further attempts after an error or a crash.")
@click.option("--request-id", default="")
@json_option
@click.pass_obj
def agent_task(ctx: Ctx, domain_name: str, name: str, intent: str, input_json: str, timeout: float,
               retries: int | None,
               request_id: str) -> None:
    """Run INTENT on agent NAME of DOMAIN and print its output (exit 1 if the task failed or was refused)."""
    try:
        data = json.loads(input_json)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--input") from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    task = TaskInput(request_id=request_id, intent=intent, input=data, timeout_seconds=timeout, retries=retries)
    r = _run(ctx, lambda tc: tc.execute_task(domain_name, name, task))

    def human() -> str:
        used = f"{r.cpu_seconds:.2f} s CPU, {r.max_rss_mib:.0f} MiB peak, {r.wall_seconds:.2f} s"
        if r.ok:
            return json.dumps(r.output, indent=2) + f"\n({used}, attempt {r.attempts})"
        return f"task failed ({r.reason}) after {r.attempts} attempt(s): {r.error}\n({used})"

    _emit(ctx, r, human)
    if not r.ok:
        sys.exit(EXIT_REFUSED)


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs, each value JSON (or else a plain string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@agent.command("checkpoint")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.option("--label", default="")
@json_option
@click.pass_obj
def agent_checkpoint(ctx: Ctx, domain_name: str, name: str, label: str) -> None:
    """Checkpoint agent NAME (its image, parameters and working state)."""
    cp = _run(ctx, lambda tc: tc.checkpoint_agent(CheckpointRequest(domain=domain_name, name=name, label=label)))
    _emit(ctx, cp, lambda: f"checkpoint {cp.id} of {domain_name}/{name} at {cp.taken_at.isoformat(timespec='seconds')}"
                           f" ({cp.image.ref if cp.image else 'no image'}, {len(cp.memory)} state key(s))")


@agent.command("restore")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.option("--from", "source", default=None, help="Another agent's checkpoint (default: NAME's own, once stopped).")
@click.option("--checkpoint", default=None, help="A checkpoint id (default: the latest, the final one once stopped).")
@click.option("--supervisor", default=None, help="Restore under another supervisor of the domain.")
@json_option
@click.pass_obj
def agent_restore(ctx: Ctx, domain_name: str, name: str, source: str | None, checkpoint: str | None,
                  supervisor: str | None) -> None:
    """Start agent NAME from a checkpoint."""
    req = RestoreRequest(domain=domain_name, name=name, source=source, checkpoint=checkpoint, supervisor=supervisor)
    r = _run(ctx, lambda tc: tc.restore_agent(req))
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} restored from checkpoint {r.checkpoint} under {r.supervisor}")


@agent.command("clone")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("source")
@click.argument("name")
@click.option("--supervisor", default=None)
@json_option
@click.pass_obj
def agent_clone(ctx: Ctx, domain_name: str, source: str, name: str, supervisor: str | None) -> None:
    """Make agent NAME a copy of running agent SOURCE (its state and image)."""
    r = _run(ctx, lambda tc: tc.clone_agent(CloneRequest(domain=domain_name, source=source, name=name,
                                                         supervisor=supervisor)))
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} cloned from {source} under {r.supervisor}")


@agent.command("upgrade")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.argument("image_ref", metavar="IMAGE")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE")
@json_option
@click.pass_obj
def agent_upgrade(ctx: Ctx, domain_name: str, name: str, image_ref: str, params: tuple[str, ...]) -> None:
    """Switch agent NAME to a newer signed version IMAGE (verified and tried first)."""
    req = UpgradeRequest(domain=domain_name, name=name, image=image_ref, params=_params(params))
    r = _run(ctx, lambda tc: tc.upgrade_agent(req))
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} upgraded: {r.previous_image} -> {r.image}")


@agent.command("specialize")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.option("--intent", "intents", multiple=True, help="An intent it keeps (default: all).")
@click.option("--range", "ranges", multiple=True, metavar="PARAM=MIN:MAX[:DEFAULT]",
              help="A tighter range for a numeric parameter (leave MIN or MAX empty to keep it).")
@json_option
@click.pass_obj
def agent_specialize(ctx: Ctx, domain_name: str, name: str, intents: tuple[str, ...], ranges: tuple[str, ...]) -> None:
    """Narrow agent NAME's intents and parameter ranges within its image (never wider)."""
    parameters: dict[str, ParameterRange] = {}
    for item in ranges:
        key, sep, spec = item.partition("=")
        parts = spec.split(":")
        if not sep or not key or len(parts) not in (2, 3):
            raise click.BadParameter(f"{item!r} is not PARAM=MIN:MAX[:DEFAULT]", param_hint="--range")
        try:
            values = [json.loads(p) if p else None for p in parts]
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{item!r}: {e}", param_hint="--range") from None
        parameters[key] = ParameterRange(minimum=values[0], maximum=values[1],
                                         default=values[2] if len(values) == 3 else None)
    narrowing = Narrowing(intents=list(intents) or None, parameters=parameters)
    r = _run(ctx, lambda tc: tc.specialize_agent(SpecializeRequest(domain=domain_name, name=name,
                                                                   narrowing=narrowing)))
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} specialized: intents {', '.join(r.intents)}")


@agent.command("merge")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.argument("agents", nargs=-1, required=True)
@click.option("--supervisor", default=None)
@json_option
@click.pass_obj
def agent_merge(ctx: Ctx, domain_name: str, name: str, agents: tuple[str, ...], supervisor: str | None) -> None:
    """Merge AGENTS of DOMAIN into a new agent NAME (states combined, allocations summed)."""
    r = _run(ctx, lambda tc: tc.merge_agents(MergeRequest(domain=domain_name, agents=list(agents), name=name,
                                                          supervisor=supervisor)))
    _emit(ctx, r, lambda: f"agents {', '.join(agents)} merged into {domain_name}/{name} under {r.supervisor}")


@agent.command("split")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.argument("parts", type=int)
@json_option
@click.pass_obj
def agent_split(ctx: Ctx, domain_name: str, name: str, parts: int) -> None:
    """Split agent NAME into PARTS agents NAME-1..PARTS (state dealt out, allocation divided)."""
    r = _run(ctx, lambda tc: tc.split_agent(SplitRequest(domain=domain_name, name=name, parts=parts)))
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} split into {', '.join(r.agents)}")


@agent.command("coordinate")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("supervisor_name", metavar="SUPERVISOR")
@click.option("--file", "file_", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="YAML or JSON: a list of operations ({op, agent, source?, image?, resources?, depends_on?}).")
@json_option
@click.pass_obj
def agent_coordinate(ctx: Ctx, domain_name: str, supervisor_name: str, file_: Path) -> None:
    """Apply a set of operations on SUPERVISOR's agents as one saga, in dependency order, all or none."""
    try:
        ops = yaml.safe_load(file_.read_text())
        req = CoordinateRequest(domain=domain_name, supervisor=supervisor_name, operations=ops)
    except (yaml.YAMLError, ValidationError) as e:
        raise click.BadParameter(str(e), param_hint="--file") from None
    r = _run(ctx, lambda tc: tc.coordinate(req))
    _emit(ctx, r, lambda: "applied, in order: " + "; ".join(r.order))


@agent.command("usage")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@resource_options
@json_option
@click.pass_obj
def agent_usage(ctx: Ctx, domain_name: str, name: str, cpu: str | None, memory: str | None,
                gpu: int | None) -> None:
    """Report what agent NAME uses (as its runtime measured it); over its allocation, quotas apply."""
    used = _resources(cpu, memory, gpu, None)
    if used is None:
        raise click.UsageError("give at least one of --cpu, --memory, --gpu")
    st = _run(ctx, lambda tc: tc.report_usage(domain_name, name, used))
    _emit(ctx, st, lambda: f"agent {domain_name}/{name} uses {used.human()} (reported to its supervisor)")


@agent.command("stop")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@click.option("--cascade", is_flag=True, help="Stop the agents that depend on it first.")
@json_option
@click.pass_obj
def agent_stop(ctx: Ctx, domain_name: str, name: str, cascade: bool) -> None:
    """Stop agent NAME of DOMAIN cleanly and release its resources (refused while others depend on it)."""
    r = _run(ctx, lambda tc: tc.stop_agent(StopAgentRequest(domain=domain_name, name=name, cascade=cascade)))
    _emit(ctx, r, lambda: f"agent {domain_name}/{name} stopped; released "
                          f"{r.released.human() if r.released else 'nothing'}")


@agent.command("list")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("supervisor_name", metavar="SUPERVISOR")
@json_option
@click.pass_obj
def agent_list(ctx: Ctx, domain_name: str, supervisor_name: str) -> None:
    """List the agents of SUPERVISOR in DOMAIN."""
    children = _run(ctx, lambda tc: tc.list_agents(domain_name, supervisor_name))
    _emit(ctx, children, lambda: render.children_table(children, "agent"))


@agent.command("status")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("name")
@json_option
@click.pass_obj
def agent_status(ctx: Ctx, domain_name: str, name: str) -> None:
    """Show agent NAME of DOMAIN."""
    st = _run(ctx, lambda tc: tc.agent_status(domain_name, name))
    _emit(ctx, st, lambda: render.agent_state(st))


# -- resources ---------------------------------------------------------------------------------------


@cli.group()
def resources() -> None:
    """Allocate and release agent resources; show pools; balance, reclaim and audit them."""


@resources.command("request")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("agent_name", metavar="AGENT")
@resource_options
@click.option("--supervisor", default=None, help="The agent's supervisor (looked up when left out).")
@click.option("--request-id", default="", help="Idempotency key: a retry with it never takes twice.")
@json_option
@click.pass_obj
def resources_request(ctx: Ctx, domain_name: str, agent_name: str, cpu: str | None, memory: str | None,
                      gpu: int | None, supervisor: str | None, request_id: str) -> None:
    """Allocate more resources to AGENT: its supervisor's pool, else borrowed from DOMAIN's, else global."""
    amount = _resources(cpu, memory, gpu, None)
    if amount is None:
        raise click.UsageError("give at least one of --cpu, --memory, --gpu")
    req = AllocateRequest(domain=domain_name, agent=agent_name, resources=amount, supervisor=supervisor,
                          request_id=request_id)
    r = _run(ctx, lambda tc: tc.allocate(req))
    _emit(ctx, r, lambda: render.allocation(r))


@resources.command("release")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("agent_name", metavar="AGENT")
@click.argument("allocation_id", required=False)
@click.option("--include-spawn", is_flag=True, help="Without ALLOCATION_ID: release the spawn allocation too.")
@json_option
@click.pass_obj
def resources_release(ctx: Ctx, domain_name: str, agent_name: str, allocation_id: str | None,
                      include_spawn: bool) -> None:
    """Release ALLOCATION_ID of AGENT (or all its extra allocations); each part returns where it came from."""
    req = ReleaseRequest(domain=domain_name, agent=agent_name, allocation_id=allocation_id,
                         include_spawn=include_spawn)
    r = _run(ctx, lambda tc: tc.release(req))
    _emit(ctx, r, lambda: render.release(r))


@resources.command("show")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("agent_name", metavar="AGENT")
@json_option
@click.pass_obj
def resources_show(ctx: Ctx, domain_name: str, agent_name: str) -> None:
    """Show AGENT's allocations: what its supervisor paid and what was borrowed above."""
    v = _run(ctx, lambda tc: tc.allocations(domain_name, agent_name))
    _emit(ctx, v, lambda: render.allocations(v))


@resources.command("pools")
@click.argument("domains", nargs=-1)
@json_option
@click.pass_obj
def resources_pools(ctx: Ctx, domains: tuple[str, ...]) -> None:
    """Every level's pool (global, each domain, each supervisor): capacity, granted, borrowed, lent, free."""
    v = _run(ctx, lambda tc: tc.pools(list(domains) or None))
    _emit(ctx, v, lambda: render.pools(v))


@resources.command("audit")
@click.argument("domains", nargs=-1)
@json_option
@click.pass_obj
def resources_audit(ctx: Ctx, domains: tuple[str, ...]) -> None:
    """Check conservation across every ledger (exit 1 if anything does not balance)."""
    r = _run(ctx, lambda tc: tc.audit(list(domains) or None))
    _emit(ctx, r, lambda: render.audit(r))
    if not r.ok:
        sys.exit(EXIT_REFUSED)


@resources.command("balance")
@click.argument("domain_name", metavar="DOMAIN")
@click.option("--dry-run", is_flag=True, help="Only plan the moves.")
@json_option
@click.pass_obj
def resources_balance(ctx: Ctx, domain_name: str, dry_run: bool) -> None:
    """Move free nominal capacity between DOMAIN's supervisors toward those that borrow."""
    r = _run(ctx, lambda tc: tc.balance(BalanceRequest(domain=domain_name, dry_run=dry_run)))
    _emit(ctx, r, lambda: render.balance(r))


@resources.command("reclaim")
@click.argument("target", metavar="global|DOMAIN")
@resource_options
@json_option
@click.pass_obj
def resources_reclaim(ctx: Ctx, target: str, cpu: str | None, memory: str | None, gpu: int | None) -> None:
    """Ask back lent capacity until TARGET has this much free: idle borrowers first, then its policy."""
    amount = _resources(cpu, memory, gpu, None)
    if amount is None:
        raise click.UsageError("give at least one of --cpu, --memory, --gpu")
    req = ReclaimRequest(domain=None if target == "global" else target, resources=amount)
    r = _run(ctx, lambda tc: tc.reclaim(req))
    _emit(ctx, r, lambda: render.reclaim(r))
    if not r.satisfied:
        sys.exit(EXIT_REFUSED)


# -- policy ------------------------------------------------------------------------------------------


def _target(spec: str) -> tuple[str | None, str | None]:
    """``global``, ``DOMAIN`` or ``DOMAIN/SUPERVISOR`` as (domain, supervisor)."""
    if spec == "global":
        return None, None
    domain, _, sup = spec.partition("/")
    return domain, sup or None


def _load_policy(ctx: Ctx, path: Path) -> Policy:
    """A policy file (YAML or JSON), every problem listed with its path."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as e:
        _fail(ctx, EXIT_USAGE, "InvalidPolicy", f"cannot read {path}: {e.strerror}")
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        _fail(ctx, EXIT_USAGE, "InvalidPolicy", f"{path} is not valid YAML/JSON", [str(e)])
    try:
        return Policy.model_validate(data or {})
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        _fail(ctx, EXIT_USAGE, "InvalidPolicy", f"{path} is not a valid policy ({len(problems)} problem(s))",
              problems)
    raise AssertionError("unreachable")


def _change_human(r: PolicyChangeResult) -> str:
    head = (f"{r.target}: " + ("dry run, nothing changed" if r.dry_run else
                              f"policy v{r.policy.version} in force" if r.applied else "unchanged (same rules)"))
    lines = [head]
    for title, items in (("conflicts with the levels above", r.conflicts),
                         ("children whose policy now loosens it", r.children_in_conflict),
                         ("running agents it would refuse", r.agents_refused)):
        if items:
            lines.append(f"  {title}:")
            lines += [f"    - {i}" for i in items]
    return "\n".join(lines)


@cli.group()
def policy() -> None:
    """Show, set, validate, dry-run and template policies; check an operation (what-if).

    TARGET is `global`, a domain, or DOMAIN/SUPERVISOR."""


@policy.command("show")
@click.argument("target", default="global")
@json_option
@click.pass_obj
def policy_show(ctx: Ctx, target: str) -> None:
    """Show TARGET's policy and its decision cache."""
    domain, sup = _target(target)
    ref = (LevelRef.supervisor(domain, sup) if domain and sup else LevelRef.manager(domain) if domain
           else LevelRef.orchestrator())
    view = _run(ctx, lambda tc: tc.describe(ref))
    out = {"target": view.id, "policy": view.policy.model_dump(mode="json"),
           "cache": view.policy_cache.model_dump(mode="json") if view.policy_cache else None}
    _emit(ctx, out, lambda: yaml.safe_dump(out, sort_keys=False).rstrip())


def _set(ctx: Ctx, target: str, pol: Policy | None, template_name: str | None, dry_run: bool) -> None:
    domain, sup = _target(target)
    req = SetPolicyRequest(domain=domain, supervisor=sup, policy=pol, template=template_name, dry_run=dry_run)
    r = _run(ctx, lambda tc: tc.set_policy(req))
    _emit(ctx, r, lambda: _change_human(r))
    if dry_run and r.conflicts:
        sys.exit(EXIT_REFUSED)


@policy.command("set")
@click.argument("target")
@click.option("--file", "file_", type=click.Path(path_type=Path), required=True, help="Policy file (YAML or JSON).")
@click.option("--dry-run", is_flag=True, help="Show conflicts and the agents it would refuse; change nothing.")
@json_option
@click.pass_obj
def policy_set(ctx: Ctx, target: str, file_: Path, dry_run: bool) -> None:
    """Set TARGET's policy from a file (refused, with every conflict, if it loosens a level above)."""
    _set(ctx, target, _load_policy(ctx, file_), None, dry_run)


@policy.command("validate")
@click.argument("target")
@click.option("--file", "file_", type=click.Path(path_type=Path), required=True)
@json_option
@click.pass_obj
def policy_validate(ctx: Ctx, target: str, file_: Path) -> None:
    """Validate a policy file for TARGET (a dry run: exit 1 if it conflicts with the levels above)."""
    _set(ctx, target, _load_policy(ctx, file_), None, True)


@policy.command("template")
@click.argument("name", type=click.Choice(list(TEMPLATES)))
@click.argument("target")
@click.option("--dry-run", is_flag=True)
@json_option
@click.pass_obj
def policy_template(ctx: Ctx, name: str, target: str, dry_run: bool) -> None:
    """Apply template NAME (permissive-dev, standard, locked-down) to TARGET."""
    _set(ctx, target, None, name, dry_run)


@policy.command("check")
@click.argument("operation", type=click.Choice([op.value for op in OperationType]))
@click.argument("target", default="global")
@resource_options
@click.option("--count", type=int, default=1, show_default=True, help="Agents added (batch spawn).")
@click.option("--to", "target_domain", default=None, help="Receiving domain (message).")
@json_option
@click.pass_obj
def policy_check(ctx: Ctx, operation: str, target: str, cpu: str | None, memory: str | None, gpu: int | None,
                 count: int, target_domain: str | None) -> None:
    """What-if: judge OPERATION at TARGET by every level's policy, without doing it; print the chain."""
    domain, sup = _target(target)
    check = PolicyCheck(operation=OperationType(operation), domain=domain, supervisor=sup,
                        resources=_resources(cpu, memory, gpu, None), count=count, target_domain=target_domain)
    d = _run(ctx, lambda tc: tc.check(check))

    def human() -> str:
        head = "allowed" if d.allowed else f"DENIED by {d.level} ({d.rule}): {d.reason}"
        rows = [[v.level, v.entity, "allow" if v.allowed else "deny", v.rule or "-", v.reason or "-"]
                for v in d.verdicts]
        return head + "\n\n" + render.table(["level", "entity", "verdict", "rule", "reason"], rows)

    _emit(ctx, d, human)
    if not d.allowed:
        sys.exit(EXIT_REFUSED)


# -- bench -------------------------------------------------------------------------------------------


@cli.command()
@click.option("--short", "mode", flag_value="short", default=True, help="Under a minute (default).")
@click.option("--full", "mode", flag_value="full", help="More samples, higher concurrency, and the worker tuning.")
@click.option("--tuning/--no-tuning", default=None,
              help="Also measure worker tuning (sandbox, pollers, eager start and dispatch, local activities); "
                   "on by default with --full.")
@click.option("--server-settings", is_flag=True,
              help="Instead: confirm each embedded-server setting alone, each on a fresh server of its own.")
@click.option("--memory", "memory_steps", default=None, metavar="N,N,...",
              help="Instead: resident memory of the server and each level's worker process with N idle agents "
                   "(e.g. 0,1000,10000).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Directory for the run's JSON file.")
@json_option
@click.pass_obj
def bench(ctx: Ctx, mode: str, tuning: bool | None, server_settings: bool, memory_steps: str | None,
          out: Path) -> None:
    """Measure the seed's table beside the bare server's ceiling, in one run (own server unless --address)."""
    from tetrarch_cli import bench as b

    if server_settings:
        _bench_server_settings(ctx, mode == "short", out)
        return
    if memory_steps is not None:
        _bench_memory(ctx, memory_steps, out)
        return
    with_tuning = tuning if tuning is not None else mode == "full"

    async def go() -> b.BenchReport:
        from tetrarch_cli.bench_tuning import tuning_rows

        started = b.now_utc()
        server = None
        address = ctx.address
        with tempfile.TemporaryDirectory(prefix="tetrarch-bench-") as state:
            if address is None:
                config = ServerConfig(state_dir=Path(state), port=free_port(), headless=True)
                server = await start_server(config)
                address = config.address
            try:
                client = await connect(address, ctx.namespace)
                await ensure_search_attributes(client, ctx.namespace)
                prefix = f"{ctx.prefix}bench{uuid.uuid4().hex[:6]}-"
                stop = asyncio.Event()
                workers = asyncio.create_task(run_workers(client, list(Level), prefix, stop))
                try:
                    await TetrarchClient(client, prefix).apply(HierarchySpec())
                    rows = await b.run_bench(client, prefix, short=mode == "short")
                    if with_tuning:  # the deployment's orchestrator stays on the workers above
                        rows += await tuning_rows(client, short=mode == "short")
                finally:
                    stop.set()
                    await workers
            finally:
                if server is not None:
                    server.stop()
        return b.new_report(mode, rows, started, embedded=server is not None)

    try:
        report = asyncio.run(go())
    except ServerError as e:
        _fail(ctx, EXIT_UNREACHABLE, "ServerError", str(e))
    path = b.write_report(report, out)
    _emit(ctx, report, lambda: b.render(report) + f"\n\nwritten to {path}")


def _bench_server_settings(ctx: Ctx, short: bool, out: Path) -> None:
    """Each embedded-server setting alone, against the dev server's defaults and the tuned whole."""
    from tetrarch_cli import bench_server as bs

    with tempfile.TemporaryDirectory(prefix="tetrarch-settings-") as state:
        try:
            report = asyncio.run(bs.measure_server_settings(short, Path(state)))
        except ServerError as e:
            _fail(ctx, EXIT_UNREACHABLE, "ServerError", str(e))
    path = bs.write_settings_report(report, out)
    _emit(ctx, report, lambda: bs.render_settings(report) + f"\n\nwritten to {path}")


def _bench_memory(ctx: Ctx, steps_text: str, out: Path) -> None:
    """Resident memory with 0, 1,000, 10,000 (or the given numbers of) idle agents."""
    from tetrarch_cli import bench_memory as bm

    try:
        steps = [int(x) for x in steps_text.split(",") if x.strip()]
    except ValueError:
        _fail(ctx, EXIT_USAGE, "InvalidRequest",
              f"--memory takes agent counts separated by commas (e.g. 0,1000,10000), not {steps_text!r}")
    with tempfile.TemporaryDirectory(prefix="tetrarch-memory-") as state:
        try:
            report = asyncio.run(bm.measure_memory(steps, Path(state)))
        except ServerError as e:
            _fail(ctx, EXIT_UNREACHABLE, "ServerError", str(e))
        except ValueError as e:
            _fail(ctx, EXIT_USAGE, "InvalidRequest", str(e))
    path = bm.write_memory_report(report, out)
    _emit(ctx, report, lambda: bm.render_memory(report) + f"\n\nwritten to {path}")


# -- schema ------------------------------------------------------------------------------------------


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write one file per workflow / update / query / signal into this directory.")
@json_option
@click.pass_obj
def schema(ctx: Ctx, out: Path | None) -> None:
    """Export the JSON Schemas of every public workflow, Update, Query and signal (input and output)."""
    entries = export_schemas()
    if out is None:
        click.echo(json.dumps(entries, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        (out / file_name(entry)).write_text(json.dumps(entry, indent=2) + "\n")
    index = [{"kind": e["kind"], "name": e["name"], "on": e["on"], "file": file_name(e)} for e in entries]
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    _emit(ctx, index, lambda: f"wrote {len(entries)} schemas to {out}")


cli.add_command(image)


def main(args: list[str] | None = None) -> None:
    """Console entry point.

    Ends the process with ``os._exit`` once output is flushed: the Temporal client's native threads
    can crash the interpreter while it finalizes (temporalio/sdk-python#300, "PyGILState_Release:
    thread state ... must be current"), turning a clean exit code into SIGSEGV or SIGABRT at random.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = 0
    try:
        cli(args)
    except SystemExit as e:
        if isinstance(e.code, int):
            code = e.code
        elif e.code is not None:
            click.echo(str(e.code), err=True)
            code = 1
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
