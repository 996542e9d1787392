"""Workers are disposable: kill one in the middle of operations and a new one finishes them exactly.

A bare dev server (no workers, nothing applied) serves the module; each test runs its own
``tetrarch worker`` processes, one per level, so it can choose exactly which level is down.

To kill workers while operations are provably half-done (not by timing luck), the level *below*
the victim is taken away first: the operations then do their first steps (the parent carves the
slices) and wait for the next queue, and the victim is SIGKILLed with them in flight. A fresh
worker then has to pick up the dead worker's workflows from their histories.

``up --no-workers`` is covered here too: it starts the server and its apply waits (durably) for
workers run elsewhere; a stop signal while it waits still stops everything.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    PYTHON,
    TETRARCH,
    Background,
    BareServer,
    Result,
    accounting_problems,
    assert_clean,
    cli_env,
    kill_servers_of,
    ok,
    snapshot,
    start_bare_server,
    start_worker,
    temporal,
    two_free_ports,
    wait_for,
    wait_polling,
    workflow_ids,
    workflow_list,
)
from tetrarch_cli.server import port_in_use

pytestmark = pytest.mark.e2e

GLOBAL = "global:\n  resources: {cpu: 1000, memory: 1Ti}\n"


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareServer]:
    server = start_bare_server(tmp_path_factory.mktemp("bare"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workers(bare: BareServer, tmp_path: Path) -> Iterator[Callable[[str], Background]]:
    """Start ``tetrarch worker --level L`` processes; all are stopped after the test."""
    started: list[Background] = []

    def start(level: str) -> Background:
        w = start_worker(bare.address, level, tmp_path / f"worker-{level}-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for p in Pending.started:  # clients of a failed test: they would wait for results forever
        if p.running():
            p.proc.kill()
            p.proc.communicate()
    Pending.started.clear()
    for w in started:
        if w.alive():
            w.stop(signal.SIGTERM, timeout=30)


class Pending:
    """A CLI command running in the background; ``finish`` waits for it and returns its Result."""

    started: list[Pending] = []

    def __init__(self, address: str, *args: str) -> None:
        self.argv = [str(TETRARCH), "--address", address, "--json", *args]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, env=cli_env())
        Pending.started.append(self)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 150.0) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"{self.argv} did not finish within {timeout:.0f}s:\n{out}\n{err}") from None
        return Result(self.argv, self.proc.returncode, out, err)


def apply_file(address: str, path: Path, text: str) -> dict[str, Any]:
    path.write_text(text)
    result: dict[str, Any] = ok("apply", path, address=address)
    return result


def children(address: str, *target: str) -> list[str]:
    """Names in a level's ledger: ``domain status D`` or ``supervisor status D S``."""
    view = ok(*target, address=address)
    return sorted(c["name"] for c in view["children"])


def check_domain(address: str, domain: str, supervisors: set[str], agents: dict[str, str]) -> None:
    """The domain holds exactly these supervisors and agents (agent -> supervisor), each once,
    all running, with books that balance at every level, and Temporal runs exactly one
    workflow per entity."""
    snap = snapshot(address)
    assert accounting_problems(snap) == []
    assert {k.split("/", 1)[1] for k in snap["supervisors"] if k.startswith(f"{domain}/")} == supervisors
    mine = {k.split("/", 1)[1]: v for k, v in snap["agents"].items() if k.startswith(f"{domain}/")}
    assert {name: a["supervisor"] for name, a in mine.items()} == agents
    assert {a["status"] for a in mine.values()} == {"running"}

    expected = ({f"manager/{domain}"} | {f"supervisor/{domain}/{s}" for s in supervisors}
                | {f"agent/{domain}/{a}" for a in agents})

    def running_entities() -> list[str]:
        ids = workflow_ids(workflow_list(address, f"Domain='{domain}' AND ExecutionStatus='Running'"))
        return sorted(i for i in ids if not i.startswith("op/"))

    ids = wait_for(running_entities, lambda i: set(i) == expected, timeout=30,
                   what=f"visibility listing exactly the entities of {domain}")
    assert len(ids) == len(set(ids)), f"an entity runs twice: {ids}"
    # Nothing else is running for the domain: no operation left hanging.
    ops = [i for i in workflow_ids(workflow_list(address, f"Domain='{domain}' AND ExecutionStatus='Running'"))
           if i.startswith("op/")]
    assert ops == [], f"operations still running: {ops}"


def test_killed_workers_leave_operations_to_their_successor(bare: BareServer, workers: Callable[[str], Background],
                                                           tmp_path: Path) -> None:
    a = bare.address
    d = "wk"
    workers("orchestrator")
    manager = workers("manager")
    supervisor = workers("supervisor")
    agent = workers("agent")
    created = apply_file(a, tmp_path / "wk.yaml", GLOBAL + f"""\
domains:
  - name: {d}
    resources: {{cpu: 100, memory: 100Gi}}
    supervisors:
      - {{name: base, resources: {{cpu: 10, memory: 10Gi}}, agents: 2}}
""")["created"]
    assert {f"domain {d}", f"supervisor {d}/base", f"agent {d}/base-agent-1", f"agent {d}/base-agent-2"} <= set(created)

    # 1. Spawns while no agent worker runs: a spawn starts its agent's workflow without waiting for
    #    its first task, so each finishes with its slice carved, and its agent waits for an agent
    #    worker. Then the supervisor worker dies.
    assert agent.stop(signal.SIGTERM) == 0
    spawns = [Pending(a, "agent", "spawn", d, "base", f"a-{i}") for i in range(1, 5)]
    spawned = [p.finish() for p in spawns]
    assert len(children(a, "supervisor", "status", d, "base")) == 6
    supervisor.stop(signal.SIGKILL)

    # 2. A scale-up in flight on the manager worker: the manager carves five slices, and the
    #    supervisors cannot start (no supervisor worker). Then the manager worker dies too.
    scale = Pending(a, "supervisor", "scale", d, "5")
    wait_for(lambda: children(a, "domain", "status", d), lambda c: len(c) == 6, timeout=60,
             what="five supervisors registered at manager wk")
    assert scale.running(), "the scale finished without a supervisor worker"
    manager.stop(signal.SIGKILL)
    assert scale.running()

    # 3. One new worker for every level: it replays the dead workers' workflows and finishes them,
    #    and the agents waiting for an agent worker start.
    workers("all")
    results = [*spawned, scale.finish()]
    for r in results:
        assert r.rc == 0, str(r)
        assert_clean(r)
    for i, r in enumerate(results[:4], start=1):
        assert r.json["created"] is True and r.json["agent"]["name"] == f"a-{i}"
    assert results[4].json == {"domain": d, "added": [f"sup-{i}" for i in range(1, 6)], "removed": []}

    sups = {"base"} | {f"sup-{i}" for i in range(1, 6)}
    agents = {"base-agent-1": "base", "base-agent-2": "base"} | {f"a-{i}": "base" for i in range(1, 5)}
    check_domain(a, d, sups, agents)
    assert ok("supervisor", "status", d, "base", address=a)["pool"]["granted"]["cpu_millis"] == 6000
    assert ok("domain", "status", d, address=a)["pool"]["granted"]["cpu_millis"] == 60000

    # Repeating the same spawns now changes nothing (the entities exist once).
    again = ok("agent", "spawn", d, "base", "a-1", address=a)
    assert again["created"] is False
    check_domain(a, d, sups, agents)

    # Reports reach the top: the orchestrator sees the domain's 6 supervisors and 6 running agents.
    def wk_report() -> Any:
        st = ok("status", address=a)
        return next((c["last_report"] for c in st["orchestrator"]["children"] if c["name"] == d), None)

    wait_for(wk_report, lambda r: r is not None and r["supervisors"] == 6 and r["agents_by_status"] == {"running": 6},
             timeout=30, what="the orchestrator's report of wk")


def test_two_workers_of_one_level_share_the_work(bare: BareServer, workers: Callable[[str], Background],
                                                 tmp_path: Path) -> None:
    a = bare.address
    d = "wk2"
    managers = [workers("manager"), workers("manager")]
    for level in ("orchestrator", "supervisor", "agent"):
        workers(level)
    for m in managers:
        wait_polling(a, "manager", m)
    apply_file(a, tmp_path / "wk2.yaml", GLOBAL + f"""\
domains:
  - name: {d}
    resources: {{cpu: 100, memory: 100Gi}}
    supervisors:
      - {{name: base, resources: {{cpu: 10, memory: 10Gi}}, agents: 1}}
""")

    scale = ok("supervisor", "scale", d, "4", address=a)
    assert scale["added"] == ["sup-1", "sup-2", "sup-3", "sup-4"]
    spawns = [Pending(a, "agent", "spawn", d, f"sup-{s}", f"s{s}-a{i}") for s in (1, 2, 3) for i in (1, 2)]
    for p in spawns:
        r = p.finish()
        assert r.rc == 0, str(r)
        assert_clean(r)
        assert r.json["created"] is True
    # The only empty supervisor goes.
    assert ok("supervisor", "scale", d, "--", "-1", address=a)["removed"] == ["sup-4"]
    ok("supervisor", "create", d, "extra", "--cpu", "2", "--memory", "2Gi", address=a)
    assert ok("supervisor", "remove", d, "sup-3", "--drain", address=a)["drained"] == ["s3-a1", "s3-a2"]

    agents = {"base-agent-1": "base"} | {f"s{s}-a{i}": f"sup-{s}" for s in (1, 2) for i in (1, 2)}
    check_domain(a, d, {"base", "sup-1", "sup-2", "extra"}, agents)
    assert all(m.alive() for m in managers)


def running_applies(address: str) -> list[str]:
    """Ids of running ApplyHierarchy workflows (none while the server is still starting)."""
    r = temporal("workflow", "list", "--address", address, "--query",
                 "WorkflowType='ApplyHierarchy' AND ExecutionStatus='Running'", "-o", "json")
    return workflow_ids(json.loads(r.stdout or "[]")) if r.rc == 0 else []


def test_up_without_workers_applies_once_a_worker_comes(tmp_path: Path) -> None:
    """``up --no-workers`` starts the server and waits (durably) for workers run elsewhere."""
    port, ui_port = two_free_ports()
    state = tmp_path / "state"
    argv = [str(TETRARCH), "--json", "up", "--no-workers", "--state-dir", str(state), "--port", str(port),
            "--ui-port", str(ui_port)]
    up = Background(argv, tmp_path / "up.log").start()
    worker: Background | None = None
    try:
        address = f"127.0.0.1:{port}"
        # The apply operation is started and waits on the orchestrator queue: nobody serves it yet.
        wait_for(lambda: running_applies(address), lambda ids: len(ids) == 1, timeout=60,
                 what="ApplyHierarchy waiting for workers")
        assert up.alive() and up.lines.empty(), "up said it was ready with no worker anywhere"
        worker = start_worker(address, "all", tmp_path / "worker.log")
        info = up.ready()
        assert len(info["applied"]["created"]) == 13
        assert info["status"]["agents_by_status"] == {"running": 7}
        assert ok("domain", "status", "support", address=address)["children"][0]["name"] == "sup-1"
    finally:
        if worker is not None:
            worker.stop()
        up.stop()
        kill_servers_of(state)


def test_up_stops_on_sigterm_while_waiting_for_workers(tmp_path: Path) -> None:
    """A stop signal while the apply waits for workers stops ``up`` and its server (no hang, no orphan)."""
    port, ui_port = two_free_ports()
    state = tmp_path / "state"
    argv = [str(TETRARCH), "--json", "up", "--no-workers", "--state-dir", str(state), "--port", str(port),
            "--ui-port", str(ui_port)]
    up = Background(argv, tmp_path / "up.log").start()
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: running_applies(address), lambda ids: len(ids) == 1, timeout=60,
                 what="ApplyHierarchy waiting for workers")
        assert up.process is not None
        up.process.send_signal(signal.SIGTERM)
        rc = up.process.wait(timeout=60)
        out = "".join(iter(up.lines.get, None))
        assert rc == 130, f"exit {rc}; stdout:\n{out}\nstderr:\n{up.stderr()}"
        assert json.loads(out)["error"]["code"] == "Interrupted"
        assert "Traceback" not in out + up.stderr()
        assert not port_in_use("127.0.0.1", port), "the server outlived up"
        assert not port_in_use("127.0.0.1", ui_port), "the Web UI outlived up"
    finally:
        up.stop(signal.SIGKILL)
        kill_servers_of(state)


#: A supervisor worker whose escalations stop at the domain: the domain's share of an allocation is
#: asked by a local activity in the worker running the allocation (this one), and here that call
#: waits forever. An escalation then waits right after the supervisor's share was taken.
_SUPERVISOR_HOLDING_AT_DOMAIN = """
import asyncio, sys
from temporalio import activity
from temporalio.worker import Worker
from activities.levels import LevelActivities
from tetrarch.calls import ReserveCall
from tetrarch.level import ReserveResult
from tetrarch.names import Level, TaskQueues
from worker.connect import connect
from worker.registry import WORKFLOWS_BY_LEVEL, activities_for
from worker.run import workflow_runner

class Holding(LevelActivities):
    @activity.defn(name="reserve")
    async def reserve(self, call: ReserveCall) -> ReserveResult:
        if call.target.level is Level.MANAGER:
            await asyncio.Event().wait()
        return await super().reserve(call)

async def main():
    client = await connect(sys.argv[1])
    acts = [a for a in activities_for(Level.SUPERVISOR, client) if a.__name__ != "reserve"]
    await Worker(client, task_queue=TaskQueues("").for_level(Level.SUPERVISOR),
                 workflows=list(WORKFLOWS_BY_LEVEL[Level.SUPERVISOR]), activities=[*acts, Holding(client).reserve],
                 workflow_runner=workflow_runner()).run()

asyncio.run(main())
"""


def test_a_worker_killed_mid_escalation_completes_or_compensates(bare: BareServer,
                                                                  workers: Callable[[str], Background],
                                                                  tmp_path: Path) -> None:
    """The supervisor worker dies after the supervisor reserved its share, before the domain answered.

    Two allocations are caught there: one the domain and the global pool can pay (it completes after
    the restart) and one the global pool cannot (it compensates: the supervisor's share comes back).
    Either way every ledger balances afterwards.
    """
    a = bare.address
    d = "wkres"
    workers("orchestrator")
    workers("manager")
    workers("agent")
    crippled = Background([PYTHON, "-c", _SUPERVISOR_HOLDING_AT_DOMAIN, a], tmp_path / "supervisor-holding.log").start()
    try:
        apply_file(a, tmp_path / "wkres.yaml", GLOBAL + f"""\
domains:
  - name: {d}
    resources: {{cpu: 10, memory: 10Gi}}
    supervisors:
      - {{name: base, resources: {{cpu: 3, memory: 3Gi}}, agents: 1}}
""")
        agent = "base-agent-1"  # holds 1 CPU / 1Gi: the supervisor has 2 CPU / 2Gi free
        before = ok("resources", "pools", d, address=a)["pools"]
        fits = Pending(a, "resources", "request", d, agent, "--cpu", "3", "--request-id", "fits")
        too_big = Pending(a, "resources", "request", d, agent, "--cpu", "1000", "--request-id", "too-big")

        def held() -> list[str]:
            return sorted(g["key"].split("#", 1)[1] for g in ok("resources", "show", d, agent, address=a)["grants"]
                          if not g["spawn"])

        wait_for(held, lambda keys: keys == ["fits", "too-big"], timeout=60,
                 what="both allocations reserved at the supervisor and waiting for the domain")
        assert fits.running() and too_big.running()
        crippled.stop(signal.SIGKILL)  # the worker running both AllocateResources workflows
        workers("supervisor")

        done = fits.finish()
        assert done.rc == 0, str(done)
        assert_clean(done)
        # Which of the two resumed allocations reaches the domain first is up to the restart: when the
        # doomed one does, it holds the domain's free CPU until refused, and this one borrows globally.
        parts = {level: part["cpu_millis"] for level, part in done.json["parts"].items()}
        assert done.json["served_by"] in ("manager", "orchestrator")
        assert sum(parts.values()) == 3000, parts
        refused = too_big.finish()
        assert refused.rc == 1, str(refused)
        assert refused.error["code"] == "CapacityExceeded" and refused.error["level"] == "orchestrator"

        assert held() == ["fits"], "the refused allocation gave its supervisor share back"
        audit = ok("resources", "audit", address=a)
        assert audit["ok"] is True and audit["problems"] == []
        after = ok("resources", "pools", d, address=a)["pools"]
        top = after["orchestrator"]
        assert top["lent"]["cpu_millis"] - before["orchestrator"]["lent"]["cpu_millis"] == parts.get("orchestrator", 0)
        dom = after[f"manager/{d}"]
        assert dom["lent"]["cpu_millis"] == parts.get("manager", 0)
        borrowed = parts.get("manager", 0) + parts.get("orchestrator", 0)
        assert after[f"supervisor/{d}/base"]["borrowed"]["cpu_millis"] == borrowed
        ops = [i for i in workflow_ids(workflow_list(a, f"Domain='{d}' AND ExecutionStatus='Running'"))
               if i.startswith("op/")]
        assert ops == [], f"operations still running: {ops}"
    finally:
        if crippled.alive():
            crippled.stop(signal.SIGKILL)
