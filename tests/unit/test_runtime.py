"""The task sandbox: real child processes, real limits, every way a task can end."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.sandbox import (
    MIN_MEMORY_MIB,
    PROJECT_ROOT,
    TaskLimits,
    TaskOutcome,
    TaskRequest,
    run_task,
    run_task_sync,
)

LIMITS = TaskLimits(memory_mib=128, cpu_seconds=5, wall_seconds=10)


def make_image(tmp_path: Path, source: str, name: str = "agent") -> Path:
    """A throwaway image: a directory holding one module."""
    root = tmp_path / "image"
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def request(root: Path, entrypoint: str = "agent:run", limits: TaskLimits = LIMITS, **fields) -> TaskRequest:
    return TaskRequest(image_root=str(root), entrypoint=entrypoint, intent=fields.pop("intent", "test"),
                       limits=limits, **fields)


async def run_source(tmp_path: Path, source: str, limits: TaskLimits = LIMITS, **fields) -> TaskOutcome:
    return await run_task(request(make_image(tmp_path, source), limits=limits, **fields))


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie waits for init, which may be slow)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> bool:
    """Whether ``predicate`` becomes true within ``within`` seconds (looking every 20 ms)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def gone(pid: int) -> bool:
    """Whether the process is gone (dead or a zombie), waiting up to two seconds for it."""
    return await eventually(lambda: not alive(pid))


def reaped(pid: int) -> bool:
    """Whether no process has this pid any more, not even a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def removed_temp_dir(path: str) -> bool:
    """Whether ``path`` was a directory right below the system's temp dir and no longer exists."""
    return Path(path).parent == Path(tempfile.gettempdir()).resolve() and not Path(path).exists()


ECHO = """
def run(request):
    state = dict(request["state"])
    state["count"] = state.get("count", 0) + 1
    return {"output": {"intent": request["intent"], "input": request["input"], "params": request["params"]},
            "state": state}
"""


# -- limits and requests ----------------------------------------------------------------------------


def test_memory_limit_below_floor_is_refused_clearly():
    with pytest.raises(ValidationError, match="below the floor"):
        TaskLimits(memory_mib=MIN_MEMORY_MIB - 1, cpu_seconds=1, wall_seconds=1)
    assert TaskLimits(memory_mib=MIN_MEMORY_MIB, cpu_seconds=1, wall_seconds=1).memory_mib == MIN_MEMORY_MIB


@pytest.mark.parametrize(("cpu", "rlimit"), [(1, (1, 2)), (1.2, (2, 3)), (0.1, (1, 2)), (30, (30, 31))])
def test_cpu_rlimit_rounds_up_to_whole_seconds(cpu, rlimit):
    assert TaskLimits(memory_mib=64, cpu_seconds=cpu, wall_seconds=1).cpu_rlimit == rlimit


@pytest.mark.parametrize("bad", [{"cpu_seconds": 0}, {"cpu_seconds": float("nan")}, {"wall_seconds": -1},
                                 {"wall_seconds": float("inf")}, {"max_output_bytes": 0}])
def test_impossible_limits_are_refused(bad):
    with pytest.raises(ValidationError):
        TaskLimits(**{"memory_mib": 64, "cpu_seconds": 1, "wall_seconds": 1, **bad})


@pytest.mark.parametrize("entrypoint", ["agent", "agent:", ":run", "agent:run:x", "a-b:run", "agent.:run"])
def test_malformed_entrypoints_are_refused(entrypoint):
    with pytest.raises(ValidationError):
        TaskRequest(image_root="/tmp", entrypoint=entrypoint, intent="x", limits=LIMITS)


def test_project_root_holds_the_runtime_package():
    assert (PROJECT_ROOT / "runtime" / "child.py").is_file()


# -- normal tasks -------------------------------------------------------------------------------------


async def test_normal_task_returns_output_state_and_usage(tmp_path):
    out = await run_source(tmp_path, ECHO, intent="summarise", input={"text": "héllo"}, params={"n": 3},
                           state={"count": 41})
    assert out.ok and out.reason == "ok", out
    assert out.output == {"intent": "summarise", "input": {"text": "héllo"}, "params": {"n": 3}}
    assert out.state == {"count": 42}
    assert out.error is None and out.exit_code == 0 and out.signal is None
    assert out.usage.cpu_seconds >= 0
    assert 0 < out.usage.max_rss_mib < 100  # the child's own peak, not the worker's
    assert 0 < out.usage.wall_seconds < 5


async def test_state_is_optional(tmp_path):
    out = await run_source(tmp_path, "def run(request):\n    return {'output': [1, 'two', None]}\n")
    assert out.ok and out.output == [1, "two", None] and out.state is None


def test_sync_wrapper(tmp_path):
    out = run_task_sync(request(make_image(tmp_path, ECHO)))
    assert out.ok and out.state == {"count": 1}


async def test_ten_tasks_run_concurrently(tmp_path):
    root = make_image(tmp_path, """
        import time
        def run(request):
            time.sleep(0.2)
            return {"output": request["input"]["i"] * 2}
    """)
    started = time.monotonic()
    outs = await asyncio.gather(*(run_task(request(root, input={"i": i})) for i in range(10)))
    assert [o.reason for o in outs] == ["ok"] * 10
    assert [o.output for o in outs] == [i * 2 for i in range(10)]
    assert time.monotonic() - started < 3  # not one after the other


async def test_image_stdout_does_not_break_the_protocol(tmp_path):
    out = await run_source(tmp_path, """
        import os, subprocess, sys
        def run(request):
            print('{"reason": "ok", "output": "forged"}')
            sys.stdout.write("no newline at the end")
            sys.stdout.flush()
            os.write(1, b"\\nstraight to fd 1\\n")
            subprocess.run(["echo", "from a subprocess"], check=True)
            print("to stderr", file=sys.stderr)
            return {"output": "real"}
    """)
    assert out.ok and out.output == "real", out
    for text in ("forged", "no newline at the end", "straight to fd 1", "from a subprocess", "to stderr"):
        assert text in out.stderr


async def test_child_environment_is_minimal(tmp_path):
    marker = tmp_path / "parent-secret"
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT)
    os.set_inheritable(fd, True)  # the worker may hold inheritable descriptors: none may leak
    try:
        out = await run_source(tmp_path, """
            import os, sys
            def run(request):
                fds = {}
                for n in os.listdir("/proc/self/fd"):  # includes the listing's own, closed by now
                    try:
                        fds[int(n)] = os.readlink(f"/proc/self/fd/{n}")
                    except OSError:
                        pass
                return {"output": {"env": dict(os.environ), "cwd": os.getcwd(), "fds": fds,
                                   "stdin": sys.stdin.read(), "path0": sys.path[0]}}
        """)
    finally:
        os.close(fd)
    assert out.ok, out
    env = out.output["env"]
    assert set(env) == {"PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUTF8", "LC_CTYPE", "HOME",
                        "TMPDIR", "MALLOC_ARENA_MAX"}
    assert env["PYTHONPATH"] == str(PROJECT_ROOT) and env["PYTHONDONTWRITEBYTECODE"] == "1"
    cwd = out.output["cwd"]
    assert env["HOME"] == cwd and removed_temp_dir(cwd)
    fds = {int(k): v for k, v in out.output["fds"].items()}
    assert fds[0] == "/dev/null" and out.output["stdin"] == ""
    assert str(marker) not in fds.values()
    assert set(fds) == {0, 1, 2, 3}  # stdio and the report channel
    assert out.output["path0"] == str((tmp_path / "image").resolve())
    assert not list((tmp_path / "image").glob("__pycache__"))


# -- failures of the image ----------------------------------------------------------------------------


async def test_exception_is_error_with_message_and_traceback(tmp_path):
    out = await run_source(tmp_path, """
        def helper():
            raise ValueError("the input is upside down")
        def run(request):
            helper()
    """)
    assert not out.ok and out.reason == "error"
    assert out.error is not None and out.error.startswith("ValueError: the input is upside down")
    assert "in helper" in out.error  # the last traceback lines
    assert out.output is None and out.state is None and out.exit_code == 0


async def test_huge_error_message_is_cut(tmp_path):
    out = await run_source(tmp_path, "def run(request):\n    raise ValueError('x' * 10_000_000)\n")
    assert out.reason == "error" and (out.error or "").startswith("ValueError: xxx")
    assert len(out.error or "") <= 8000


async def test_sys_exit_is_an_error(tmp_path):
    out = await run_source(tmp_path, "import sys\ndef run(request):\n    sys.exit(0)\n")
    assert out.reason == "error" and "sys.exit(0)" in (out.error or "")


@pytest.mark.parametrize(("entrypoint", "message"), [
    ("missing:run", "entrypoint 'missing:run': no module 'missing' in image root"),
    ("agent:nope", "entrypoint 'agent:nope': module 'agent' has no attribute 'nope'"),
    ("agent:VALUE", "'VALUE' is a int, not a function"),
    ("json:dumps", "module 'json' resolves to"),
])
async def test_unknown_entrypoint_is_an_error_that_says_so(tmp_path, entrypoint, message):
    root = make_image(tmp_path, "VALUE = 3\ndef run(request):\n    return {'output': 1}\n")
    out = await run_task(request(root, entrypoint))
    assert out.reason == "error"
    assert message in (out.error or ""), out.error


async def test_missing_image_root_is_an_error(tmp_path):
    out = await run_task(request(tmp_path / "nowhere"))
    assert out.reason == "error" and "is not a directory" in (out.error or "")


async def test_missing_dependency_of_the_image_is_its_own_error(tmp_path):
    out = await run_source(tmp_path, "import no_such_dependency\ndef run(request):\n    return {'output': 1}\n")
    assert out.reason == "error"
    assert (out.error or "").startswith("ModuleNotFoundError: No module named 'no_such_dependency'")


@pytest.mark.parametrize(("returned", "message"), [
    ("[1, 2]", "returned a list, not a dict"),
    ("None", "returned a NoneType"),
    ("{'result': 1}", "has no 'output'"),
    ("{'output': 1, 'extra': 2}", "unknown keys ['extra']"),
    ("{'output': 1, 'state': [1]}", "'state' is a list"),
    ("{'output': object()}", "not JSON-serialisable"),
    ("{'output': {1, 2}}", "not JSON-serialisable"),
    ("{'output': float('nan')}", "not JSON-serialisable"),
])
async def test_malformed_result_is_bad_output(tmp_path, returned, message):
    out = await run_source(tmp_path, f"def run(request):\n    return {returned}\n")
    assert out.reason == "bad_output" and not out.ok
    assert message in (out.error or ""), out.error


async def test_output_over_max_output_bytes_is_bad_output(tmp_path):
    limits = LIMITS.model_copy(update={"max_output_bytes": 1000})
    source = "def run(request):\n    return {'output': request['input']['fill'] * 'x'}\n"
    out = await run_source(tmp_path, source, limits, input={"fill": 2000})
    assert out.reason == "bad_output" and "over the limit of 1000" in (out.error or "")
    fits = await run_source(tmp_path, source, limits, input={"fill": 900})
    assert fits.ok and fits.output == 900 * "x"


async def test_flooding_the_report_channel_is_stopped(tmp_path):
    limits = LIMITS.model_copy(update={"max_output_bytes": 1000})
    out = await run_source(tmp_path, """
        import os
        def run(request):
            report = 3  # the first free descriptor when the child set its report channel aside
            assert os.readlink(f"/proc/self/fd/{report}").startswith("pipe:")
            while True:
                os.write(report, b"x" * 65536)
    """, limits)
    assert out.reason == "bad_output" and "report channel" in (out.error or "")
    assert out.signal == signal.SIGKILL


async def test_os_exit_is_crashed(tmp_path):
    out = await run_source(tmp_path, "import os\ndef run(request):\n    os._exit(3)\n")
    assert out.reason == "crashed" and out.exit_code == 3 and out.signal is None
    assert "exited with code 3" in (out.error or "")


async def test_segfault_is_crashed_with_a_python_traceback(tmp_path):
    out = await run_source(tmp_path, "import ctypes\ndef run(request):\n    ctypes.string_at(0)\n")
    assert out.reason == "crashed" and out.signal == signal.SIGSEGV and out.exit_code is None
    assert "Segmentation fault" in out.stderr  # faulthandler


# -- limits -------------------------------------------------------------------------------------------


async def test_memory_hog_is_memory_limit_and_the_parent_is_fine(tmp_path):
    limits = TaskLimits(memory_mib=64, cpu_seconds=5, wall_seconds=10)
    out = await run_source(tmp_path, """
        def run(request):
            hoard = []
            for _ in range(640):  # ten times the limit, a MiB at a time
                hoard.append(bytearray(1024 * 1024))
            return {"output": len(hoard)}
    """, limits)
    assert out.reason == "memory_limit" and not out.ok
    assert (out.error or "").startswith("memory limit of 64 MiB (address space) exceeded: MemoryError")
    assert out.usage.max_rss_mib < 64
    after = await run_task(request(make_image(tmp_path / "again", ECHO), limits=limits))
    assert after.ok


async def test_memory_exhausted_by_small_objects_is_memory_limit(tmp_path):
    limits = TaskLimits(memory_mib=48, cpu_seconds=10, wall_seconds=10)
    out = await run_source(tmp_path, """
        def run(request):
            hoard = []
            while True:
                hoard.append([len(hoard)])
    """, limits)
    assert out.reason == "memory_limit", out


async def test_cpu_loop_is_cpu_limit(tmp_path):
    started = time.monotonic()
    out = await run_source(tmp_path, "def run(request):\n    while True:\n        pass\n",
                           TaskLimits(memory_mib=64, cpu_seconds=1, wall_seconds=20))
    assert out.reason == "cpu_limit" and not out.ok
    assert 0.9 <= out.usage.cpu_seconds < 2  # rusage and the kernel's tick accounting differ a little
    assert time.monotonic() - started < 4


async def test_fractional_cpu_limit_is_enforced_by_measuring(tmp_path):
    out = await run_source(tmp_path, "def run(request):\n    while True:\n        pass\n",
                           TaskLimits(memory_mib=64, cpu_seconds=0.3, wall_seconds=20))
    assert out.reason == "cpu_limit"
    assert 0.3 <= out.usage.cpu_seconds < 0.6  # long before RLIMIT_CPU's whole second
    assert out.signal == signal.SIGKILL


async def test_sleep_past_wall_clock_is_timeout_and_the_group_is_gone(tmp_path):
    pids = tmp_path / "pids"
    started = time.monotonic()
    out = await run_source(tmp_path, f"""
        import os, subprocess, time
        def run(request):
            grandchild = subprocess.Popen(["sleep", "60"])
            with open({str(pids)!r}, "w") as f:
                f.write(f"{{os.getpid()}} {{grandchild.pid}}")
            time.sleep(60)
    """, TaskLimits(memory_mib=64, cpu_seconds=5, wall_seconds=0.5))
    assert out.reason == "timeout" and out.signal == signal.SIGKILL
    assert time.monotonic() - started < 2
    child, grandchild = map(int, pids.read_text().split())
    assert reaped(child)  # by the sandbox, before it returned
    assert await gone(grandchild)  # killed with the group (reaped by init)


async def test_leftover_subprocesses_are_killed_after_a_normal_task(tmp_path):
    pid_file = tmp_path / "pid"
    out = await run_source(tmp_path, f"""
        import subprocess
        def run(request):
            with open({str(pid_file)!r}, "w") as f:
                f.write(str(subprocess.Popen(["sleep", "60"]).pid))
            return {{"output": "done"}}
    """)
    assert out.ok
    assert await gone(int(pid_file.read_text()))


async def test_cancelling_a_task_kills_its_child(tmp_path):
    pid_file = tmp_path / "pid"
    root = make_image(tmp_path, f"""
        import os, time
        def run(request):
            with open({str(pid_file)!r}, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
    """)
    task = asyncio.ensure_future(run_task(request(root)))
    assert await eventually(lambda: pid_file.exists() and bool(pid_file.read_text()))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pid_file.read_text())
    assert await eventually(lambda: reaped(pid))  # killed at once, reaped from an event-loop callback


def test_a_probe_loads_the_entrypoint_without_calling_it(tmp_path):
    """The start check of an upgrade: the code loads and its entrypoint is callable; nothing runs."""
    root = tmp_path / "img"
    root.mkdir()
    (root / "agent.py").write_text("def handle(request):\n    raise AssertionError('must not be called')\n")
    limits = TaskLimits(memory_mib=256, cpu_seconds=5, wall_seconds=10)
    ok = run_task_sync(TaskRequest(image_root=str(root), entrypoint="agent:handle", intent="x", limits=limits,
                                   probe=True))
    assert ok.ok and ok.output == {"loaded": "agent:handle"}
    broken = root / "broken.py"
    broken.write_text("raise RuntimeError('cannot start')\ndef handle(request):\n    return {}\n")
    bad = run_task_sync(TaskRequest(image_root=str(root), entrypoint="broken:handle", intent="x", limits=limits,
                                    probe=True))
    assert not bad.ok and bad.reason == "error" and "cannot start" in (bad.error or "")
