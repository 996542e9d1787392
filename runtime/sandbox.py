"""Run one agent task in a separate process under OS-enforced limits, and say exactly how it ended.

:func:`run_task` starts ``python -m runtime.child`` (see :mod:`runtime.child` for the protocol) in a
session and process group of its own, with a minimal environment, no inherited descriptors besides
stdio, and a fresh working directory that is removed afterwards. The child limits itself (address
space, CPU) before it touches the image; the parent watches the wall clock and the CPU clock, reaps
the child itself (``wait4``, for its resource usage), kills the whole process group whenever a task
ends, and classifies the end into one :data:`Reason`. Nothing the image does (exhausting memory,
spinning, sleeping, crashing, flooding stdout) can take the parent down with it.

This is resource isolation, not a security boundary: the image runs as the worker's user, sees the
worker's file system and network, and a process that runs as root can raise its own hard limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

import runtime
from runtime.child import peak_rss_kib

Reason = Literal["ok", "error", "memory_limit", "cpu_limit", "timeout", "crashed", "bad_output"]

MIB = 1024 * 1024
#: Address space a child needs before the image runs, measured with CPython 3.11 on Linux x86-64:
#: ~16 MiB for the interpreter with the child's imports, plus the child's 4 MiB MemoryError reserve.
BASELINE_MEMORY_MIB = 20
#: The lowest memory limit accepted: the baseline plus a little room for the image's own imports
#: and data. (Below the baseline a task still ends cleanly, as ``memory_limit``, but can do nothing.)
MIN_MEMORY_MIB = 32
#: The highest memory limit accepted (4 PiB): any larger value would overflow RLIMIT_AS in bytes.
MAX_MEMORY_MIB = 2**32
#: How much of the child's stderr is kept (its tail).
STDERR_TAIL_BYTES = 64 * 1024
#: Room on the report channel beyond ``max_output_bytes`` for the report's envelope and error texts.
#: The child itself refuses results over ``max_output_bytes``; the parent kills a child whose report
#: channel passes this sum, which only a child that bypasses the protocol can do.
PROTOCOL_SLACK_BYTES = 64 * 1024
#: Shortest pause between two looks at the child's CPU clock.
POLL_SECONDS = 0.05
#: How long to wait for the pipes to close once the process group is dead (a descendant that left the
#: group with setsid() may still hold them).
DRAIN_SECONDS = 2.0
#: Where ``runtime`` is importable from: the one entry on the child's PYTHONPATH.
PROJECT_ROOT = Path(runtime.__file__).resolve().parent.parent
#: The system part of the child's PATH (the interpreter's own directory comes first).
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
#: Words that, at the end of a dead child's stderr, say it died of memory exhaustion.
MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class TaskLimits(BaseModel):
    """What one task may consume; each limit is enforced by the kernel, by the parent, or both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mib: int = Field(le=MAX_MEMORY_MIB, description=(
        "Address-space limit of the child process as a whole (RLIMIT_AS, soft = hard), interpreter "
        f"included: about {BASELINE_MEMORY_MIB} MiB of it is taken before the image runs; at least "
        f"{MIN_MEMORY_MIB}. The request is decoded inside the limit too. Address space is not RSS: every "
        "thread reserves its stack (8 MiB by default), and mapped files count."))
    cpu_seconds: float = Field(gt=0, allow_inf_nan=False, description=(
        "User + system CPU time of the child, interpreter start-up included. The kernel backstop is "
        "RLIMIT_CPU rounded up to whole seconds (SIGXCPU at the soft limit, SIGKILL one second later); "
        "the parent enforces the exact value by sampling the child's CPU clock and by checking the "
        "final usage: a task that used more than this is cpu_limit even if it produced a result."))
    wall_seconds: float = Field(gt=0, allow_inf_nan=False, description=(
        "Wall-clock limit from spawn to exit (interpreter start-up, ~30 ms, included); when it passes, "
        "the whole process group is killed."))
    max_output_bytes: int = Field(default=MIB, ge=1, description=(
        "Largest encoded result (output and state together, as one JSON line) the task may return."))

    @field_validator("memory_mib")
    @classmethod
    def _above_floor(cls, value: int) -> int:
        """Refuse memory limits the interpreter cannot even start a task in."""
        if value < MIN_MEMORY_MIB:
            raise ValueError(f"memory_mib {value} is below the floor of {MIN_MEMORY_MIB} MiB: the interpreter and "
                             f"the sandbox take ~{BASELINE_MEMORY_MIB} MiB of address space before the image runs")
        return value

    @property
    def cpu_rlimit(self) -> tuple[int, int]:
        """RLIMIT_CPU (soft, hard) in whole seconds: the limit rounded up, and one second more."""
        soft = math.ceil(self.cpu_seconds)
        return soft, soft + 1


class TaskRequest(BaseModel):
    """One task for one image: where its code is, what to call, with what, under which limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_root: str = Field(min_length=1, description="Directory of the image; first on the child's sys.path.")
    entrypoint: str = Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$",
                            description="'module:function', the module relative to the image root.")
    intent: str
    input: dict[str, JsonValue] = Field(default_factory=dict)
    params: dict[str, JsonValue] = Field(default_factory=dict)
    state: dict[str, JsonValue] = Field(default_factory=dict)
    limits: TaskLimits
    probe: bool = Field(default=False, description="Only load the entrypoint (a start check); do not call it.")

    def document(self) -> bytes:
        """The JSON document the child reads from stdin."""
        request = {"intent": self.intent, "input": self.input, "params": self.params, "state": self.state}
        return json.dumps({"image_root": self.image_root, "entrypoint": self.entrypoint, "request": request,
                           "probe": self.probe}).encode()


class TaskUsage(BaseModel):
    """What the task consumed: CPU as the kernel accounted it at reaping, peak RSS as /proc showed it."""

    model_config = ConfigDict(frozen=True)

    cpu_seconds: float = Field(description="User + system CPU of the child (and of descendants it waited for), "
                                           "from wait4's rusage.")
    max_rss_mib: float = Field(description=(
        "Peak resident set size of the child since its exec (VmHWM): reported by the child as it ends, else "
        "the last value the parent sampled while it ran (a lower bound for a child that was killed or crashed)."))
    wall_seconds: float = Field(description="From spawn to reaping, as the parent's event loop saw it.")


class TaskOutcome(BaseModel):
    """How a task ended: its result if it had one, otherwise why not, always with its usage."""

    model_config = ConfigDict(frozen=True)

    ok: bool = Field(description="Whether the task returned a valid result (reason 'ok').")
    reason: Reason
    output: Any = Field(default=None, description="The entrypoint's 'output', a JSON value (ok only).")
    state: dict[str, Any] | None = Field(default=None, description="The new state, if the task returned one (ok only).")
    error: str | None = Field(default=None, description="What went wrong: type and message, then traceback lines.")
    usage: TaskUsage
    exit_code: int | None = Field(default=None, description="The child's exit status, None if a signal ended it.")
    signal: int | None = Field(default=None, description="The signal that ended the child, if one did.")
    stderr: str = Field(default="", description=f"The last {STDERR_TAIL_BYTES} bytes of the child's stderr.")


class _Report(BaseModel):
    """The one line the child writes to stdout (see :mod:`runtime.child`)."""

    model_config = ConfigDict(extra="forbid")

    reason: Literal["ok", "error", "bad_output", "memory_limit"]
    output: Any = None  # JSON by construction: no need to validate it value by value
    state: dict[str, Any] | None = None
    error: str | None = None
    peak_rss_kib: int = 0


class _Capture(asyncio.Protocol):
    """Collects one pipe of the child: its head up to ``cap`` bytes, or (``tail``) its last ``cap`` bytes.

    A head capture that overflows calls ``on_overflow`` once and discards the rest, still reading so
    that the writer is never blocked on a full pipe.
    """

    def __init__(self, cap: int, *, tail: bool, on_overflow: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self.tail = tail
        self.on_overflow = on_overflow
        self.data = bytearray()
        self.dropped = 0
        self.overflowed = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        """Keep what fits; note what does not."""
        if self.overflowed:
            return
        self.data += data
        excess = len(self.data) - self.cap
        if excess <= 0:
            return
        self.dropped += excess
        if self.tail:
            del self.data[:excess]
            return
        del self.data[self.cap:]
        self.overflowed = True
        if self.on_overflow is not None:
            self.on_overflow()

    def connection_lost(self, exc: Exception | None) -> None:
        """The pipe is closed: every writer is gone (or the transport was closed)."""
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        """What was kept, decoded for people, with a note of what was dropped."""
        note = f"[... {self.dropped} bytes dropped ...]\n" if self.dropped and self.tail else ""
        return note + self.data.decode("utf-8", errors="replace")


class _Exit(BaseModel):
    """How the child's process ended, from ``wait4``, and when."""

    model_config = ConfigDict(frozen=True)

    exit_code: int | None
    signal: int | None
    cpu_seconds: float
    wall_seconds: float


class _Child:
    """A spawned child: reaped by us as soon as it exits, and killed as a whole process group.

    Exit is noticed through a pidfd registered with the event loop (polling where pidfds are
    missing). Before reaping, the group is killed: the zombie still holds the group id, so no other
    process can have taken it, and descendants the task left behind die with it. Reaping happens in
    an event-loop callback, so it happens even if the coroutine that started the child is cancelled.

    Peak RSS is sampled from ``/proc`` while the child lives (:meth:`sample`), because ``wait4``'s
    ``ru_maxrss`` is useless here: Linux carries the RSS of the memory image the child exec'd from
    (the worker's, shared through vfork) into it, so every task would report the worker's size.
    """

    def __init__(self, pid: int, started: float) -> None:
        self.pid = pid
        self.started = started
        self.loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[_Exit] = self.loop.create_future()
        self.kill_reason: Reason | None = None
        self.peak_rss_kib = 0
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux, or a kernel older than 5.3
            self._poll()
        else:
            self.loop.add_reader(self._pidfd, self._check)

    def sample(self) -> float:
        """Look at the live child: note its peak RSS so far and return the CPU seconds it has used."""
        if self.exited.done():  # reaped: the pid may belong to another process by now
            return 0.0
        self.peak_rss_kib = max(self.peak_rss_kib, peak_rss_kib(self.pid))
        return cpu_seconds_of(self.pid)

    def kill(self, reason: Reason | None) -> None:
        """Kill the process group (if the child is not reaped yet), remembering the first reason."""
        if self.exited.done():
            return
        if self.kill_reason is None:
            self.kill_reason = reason
        self.sample()
        self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _poll(self) -> None:
        self._check()
        if not self.exited.done():
            self.loop.call_later(POLL_SECONDS, self._poll)

    def _check(self) -> None:
        """Reap the child if it has exited."""
        if self.exited.done():
            return
        try:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return
            self._kill_group()
            _, status, rusage = os.wait4(self.pid, 0)
        except ChildProcessError:  # reaped behind our back (a process-wide SIGCHLD handler)
            self._finish(None, None)
            return
        self._finish(status, rusage)

    def _finish(self, status: int | None, rusage: resource.struct_rusage | None) -> None:
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
        end = _Exit(exit_code=code if code is None or code >= 0 else None,
                    signal=-code if code is not None and code < 0 else None,
                    cpu_seconds=cpu, wall_seconds=self.loop.time() - self.started)
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.exited.set_result(end)


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU seconds a live process has used so far, from ``/proc`` (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def child_environment(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing of the worker's leaks in (no credentials, no proxies).

    UTF-8 throughout (``LC_CTYPE`` is what CPython would coerce the C locale to anyway, stated here
    so the environment is exactly this). ``HOME`` and ``TMPDIR`` point at the task's own directory,
    so what the image writes there goes away with it. ``MALLOC_ARENA_MAX=1`` stops glibc from
    reserving 64 MiB of address space per thread for malloc arenas, which spends RLIMIT_AS on
    reservations (measured: 8 threads making small allocations peak at ~600 MiB of address space
    without it, ~90 MiB with it, for the same ~20 MiB RSS).
    """
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), *SYSTEM_PATH]),
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUTF8": "1",
        "LC_CTYPE": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "MALLOC_ARENA_MAX": "1",
    }


def _spawn(limits: TaskLimits, workdir: str) -> subprocess.Popen[bytes]:
    """Start the child in a new session (its pid is its process group id) in ``workdir``.

    ``-s`` keeps the user's site-packages out and ``-P`` keeps the working directory off sys.path.
    Popen forks and execs synchronously, as asyncio's own subprocess support does; that takes a few
    milliseconds and never waits for the child.
    """
    soft, hard = limits.cpu_rlimit
    argv = [sys.executable, "-s", "-P", "-m", "runtime.child",
            str(limits.memory_mib * MIB), str(soft), str(hard), str(limits.max_output_bytes)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=child_environment(workdir), close_fds=True, start_new_session=True)


async def _watch(child: _Child, limits: TaskLimits) -> None:
    """Wait for the child to exit, killing its process group once it passes the wall clock or CPU limit.

    The CPU clock cannot run faster than the wall clock times the number of CPUs, so the next look is
    no sooner than that bound allows (and at least :data:`POLL_SECONDS` later).
    """
    deadline = child.started + limits.wall_seconds
    cpus = os.cpu_count() or 1
    while not child.exited.done():
        used = child.sample()
        if used > limits.cpu_seconds:
            child.kill("cpu_limit")
            break
        now = child.loop.time()
        if now >= deadline:
            child.kill("timeout")
            break
        pause = min(deadline - now, max(POLL_SECONDS, (limits.cpu_seconds - used) / cpus))
        await asyncio.wait([child.exited], timeout=pause)
    await child.exited


def _parse_report(data: bytes) -> _Report | None:
    """The child's report, if stdout holds exactly one valid report line."""
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        return None
    try:
        return _Report.model_validate_json(data)
    except ValidationError:
        return None


def _died_of_memory(stderr: bytes) -> bool:
    """Whether the end of a dead child's stderr says it ran out of memory."""
    tail = stderr[-2048:]
    return any(marker in tail for marker in MEMORY_MARKERS)


def _death(end: _Exit) -> str:
    """How the child died, for people."""
    if end.signal is not None:
        return f"killed by {signal.Signals(end.signal).name}"
    if end.exit_code is None:
        return "reaped by someone else (a process-wide SIGCHLD handler?)"
    return f"exited with code {end.exit_code}"


def _classify(limits: TaskLimits, end: _Exit, kill_reason: Reason | None, report: _Report | None,
              stderr: bytes) -> tuple[Reason, str | None]:
    """Decide why a task ended: (reason, error text).

    In order: a kill by the parent says why by itself; then CPU (SIGXCPU, or more CPU used than
    allowed, whatever the child reported); then a complete report, which is trusted whatever the exit
    status; then, without a report, stderr that ends in a memory error makes ``memory_limit`` (the
    interpreter or a C extension died of an allocation failure), a clean exit is ``bad_output`` (the
    report line is malformed), and anything else is ``crashed``.
    """
    if kill_reason == "timeout":
        return "timeout", f"wall-clock limit of {limits.wall_seconds} s exceeded; the process group was killed"
    if kill_reason == "bad_output":
        return "bad_output", (f"the child wrote more than {limits.max_output_bytes + PROTOCOL_SLACK_BYTES} "
                              "bytes to its report channel; the process group was killed")
    if kill_reason == "cpu_limit" or end.signal == signal.SIGXCPU or end.cpu_seconds > limits.cpu_seconds:
        used = end.cpu_seconds
        return "cpu_limit", f"CPU limit of {limits.cpu_seconds} s reached (used {used:.2f} s); the child {_death(end)}"
    memory = f"memory limit of {limits.memory_mib} MiB (address space) exceeded"
    if report is not None:
        return report.reason, f"{memory}: {report.error}" if report.reason == "memory_limit" else report.error
    if end.exit_code != 0 and _died_of_memory(stderr):
        return "memory_limit", f"{memory}: the child {_death(end)} after a memory error (see stderr)"
    if end.exit_code == 0:
        return "bad_output", "the child exited without a well-formed report line on stdout"
    return "crashed", f"the child {_death(end)} without a result"


def _outcome(limits: TaskLimits, child: _Child, stdout: bytes, stderr: _Capture) -> TaskOutcome:
    """Put the classification and the measurements together."""
    end = child.exited.result()
    report = _parse_report(stdout)
    reason, error = _classify(limits, end, child.kill_reason, report, bytes(stderr.data))
    peak_kib = max(child.peak_rss_kib, report.peak_rss_kib if report is not None else 0)
    usage = TaskUsage(cpu_seconds=end.cpu_seconds, max_rss_mib=peak_kib / 1024, wall_seconds=end.wall_seconds)
    result = report if reason == "ok" else None
    return TaskOutcome(ok=reason == "ok", reason=reason, error=error,
                       output=result.output if result is not None else None,
                       state=result.state if result is not None else None,
                       usage=usage, exit_code=end.exit_code, signal=end.signal, stderr=stderr.text())


def _returncode(end: _Exit) -> int:
    """The child's end as a Popen return code (negative: the signal that ended it)."""
    return end.exit_code if end.exit_code is not None else -(end.signal or signal.SIGKILL)


async def _run_in(req: TaskRequest, workdir: str) -> TaskOutcome:
    """Run the task with ``workdir`` as the child's working directory."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    popen = _spawn(req.limits, workdir)
    child = _Child(popen.pid, started)
    readers: list[asyncio.ReadTransport] = []
    writer: asyncio.WriteTransport | None = None
    assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
    try:
        out = _Capture(req.limits.max_output_bytes + PROTOCOL_SLACK_BYTES, tail=False,
                       on_overflow=lambda: child.kill("bad_output"))
        err = _Capture(STDERR_TAIL_BYTES, tail=True)
        readers.append((await loop.connect_read_pipe(lambda: out, popen.stdout))[0])
        readers.append((await loop.connect_read_pipe(lambda: err, popen.stderr))[0])
        writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, popen.stdin)
        writer.write(req.document())
        writer.close()  # flushes, then closes: the child reads to end of file
        await _watch(child, req.limits)
        await asyncio.wait([out.closed, err.closed], timeout=DRAIN_SECONDS)
        return _outcome(req.limits, child, bytes(out.data), err)
    finally:
        child.kill(None)  # cancelled: the group dies now, the callback reaps it later
        if writer is not None and not writer.is_closing():
            writer.abort()
        for reader in readers:
            reader.close()
        # Reaped by us (now or, if cancelled, soon): Popen must neither wait for it nor warn about it.
        popen.returncode = _returncode(child.exited.result()) if child.exited.done() else -signal.SIGKILL


async def run_task(req: TaskRequest) -> TaskOutcome:
    """Run one task in a sandboxed child process and report how it ended.

    Never blocks the event loop for more than a fork and exec, and any number may run concurrently.
    Raises only if the child cannot be started at all (OSError) or if cancelled (the child's process
    group is killed first); every way the task itself can end is a :class:`TaskOutcome`.
    """
    workdir = tempfile.mkdtemp(prefix="tetrarch-task-")
    try:
        return await _run_in(req, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_task_sync(req: TaskRequest) -> TaskOutcome:
    """:func:`run_task` for callers without an event loop (not callable from inside a running one)."""
    return asyncio.run(run_task(req))
