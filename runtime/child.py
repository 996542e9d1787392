"""The sandboxed side of :func:`runtime.sandbox.run_task`: run one image entrypoint in this process.

Started as ``python -m runtime.child MEMORY_BYTES CPU_SOFT CPU_HARD MAX_OUTPUT_BYTES`` in a session of
its own. The protocol with the parent:

* stdin carries one JSON document: ``{"image_root", "entrypoint", "request"}``;
* stdout carries exactly one JSON line, the *report*: ``{"reason", "output", "state", "error",
  "peak_rss_kib"}`` where ``reason`` is ``ok``, ``error``, ``bad_output`` or ``memory_limit``;
* stderr carries whatever the image prints (its stdout included, see :func:`detach_stdout`).

The child applies its own resource limits first thing (:func:`apply_limits`), before it reads the
request or imports any image code. That is more robust than ``preexec_fn`` in the parent: the worker
that spawns tasks is multi-threaded (Temporal's core, asyncio's executors), and a ``preexec_fn``
runs Python between ``fork`` and ``exec``, where another thread may hold a lock forever (the Python
docs warn against it in threaded programs), and it forbids the ``vfork`` fast path. Here the parent
only forks and execs; the limits bind everything the image does, and a failure to apply them is
reported through the protocol like any other error.

This module imports only the standard library, and imports little of it: whatever is loaded before
:func:`apply_limits` is part of the baseline address space that counts against the memory limit.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import resource
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

#: Keys an entrypoint's return value may have.
RESULT_KEYS = frozenset({"output", "state"})
#: Address space kept in reserve while the image runs and freed on MemoryError, so that the report
#: can still be built and written when the image exhausted the limit with small allocations.
RESERVE_BYTES = 4 * 1024 * 1024
#: How many trailing traceback lines an error report keeps, and its overall cap in characters.
TRACEBACK_LINES = 12
ERROR_MAX_CHARS = 8000


class BadOutput(Exception):
    """The entrypoint returned something that is not a valid result."""


class EntrypointError(Exception):
    """The entrypoint cannot be found: bad image root, missing module, missing function."""


def apply_limits(memory_bytes: int, cpu_soft: int, cpu_hard: int) -> None:
    """Limit this process's address space and CPU time, and turn core dumps off.

    Soft and hard address-space limits are equal, so the image cannot raise them (unless it runs as
    root). RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one; SIGXCPU is reset
    to its default action (terminate) and unblocked in case the parent's disposition leaked in. No
    core files: SIGXCPU and SIGSEGV would otherwise dump the whole address space into the work dir.
    """
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGXCPU})
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_hard))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def detach_stdout() -> int:
    """Keep the real stdout for the report only; point fd 1 and ``sys.stdout`` at stderr.

    Done at the descriptor level, so that ``print``, ``os.write(1, ...)``, C libraries and
    subprocesses of the image all land in stderr and none of them can corrupt the report line.
    Returns the private descriptor of the report channel (not inheritable by subprocesses).
    """
    sys.stdout.flush()
    report_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return report_fd


def read_request() -> dict[str, Any]:
    """Read the request document from stdin, then give the image an empty stdin (``/dev/null``)."""
    data = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    document = json.loads(data)
    if not isinstance(document, dict):
        raise TypeError("the request document must be a JSON object")
    return document


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, then the last lines of its traceback (bounded)."""
    headline = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    lines = "".join(traceback.format_exception(exc)).rstrip("\n").splitlines()
    tail = "\n".join(lines[-TRACEBACK_LINES:])
    return f"{headline}\n--- traceback (last {TRACEBACK_LINES} lines) ---\n{tail}"


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies below it."""
    return path == root or root in path.parents


def load_entrypoint(image_root: str, entrypoint: str) -> Any:
    """Import ``module:function`` from the image root (first on ``sys.path``) and return the function.

    A module name that is already imported (``json``, ``runtime``...) would silently resolve to the
    wrong module; that, a module that is not in the image, and a missing function are reported as
    :class:`EntrypointError` with a message naming the entrypoint. An import error raised by the
    image's own code (one of its dependencies is missing) propagates unchanged, with its traceback.
    """
    root = Path(image_root).resolve()
    if not root.is_dir():
        raise EntrypointError(f"image root {image_root!r} is not a directory")
    module_name, _, function_name = entrypoint.partition(":")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise EntrypointError(f"entrypoint {entrypoint!r}: no module {module_name!r} in image root {root}") from e
        raise
    where = getattr(module, "__file__", None)
    if where is None or not _inside(Path(where).resolve(), root):
        raise EntrypointError(f"entrypoint {entrypoint!r}: module {module_name!r} resolves to {where or 'a built-in'}, "
                              f"outside the image root {root} (rename the module: the name is taken)")
    function = getattr(module, function_name, None)
    if function is None:
        raise EntrypointError(f"entrypoint {entrypoint!r}: module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise EntrypointError(f"entrypoint {entrypoint!r}: {function_name!r} is a {type(function).__name__}, "
                              "not a function")
    return function


def encode_result(result: Any, max_output_bytes: int) -> bytes:
    """Check an entrypoint's return value and encode it as the report line; raise BadOutput if invalid.

    The value must be a dict with ``output`` (any JSON value) and optionally ``state`` (a JSON object
    or None), nothing else; NaN and infinities are refused (they are not JSON). The encoded line, output
    and state together, must not exceed ``max_output_bytes``.
    """
    if not isinstance(result, dict):
        raise BadOutput(f"the entrypoint returned a {type(result).__name__}, not a dict with 'output'")
    if "output" not in result:
        raise BadOutput(f"the entrypoint's result has no 'output' (keys: {sorted(map(str, result))})")
    unknown = set(result) - RESULT_KEYS
    if unknown:
        raise BadOutput(f"the entrypoint's result has unknown keys {sorted(map(str, unknown))} "
                        f"(allowed: {sorted(RESULT_KEYS)})")
    state = result.get("state")
    if state is not None and not isinstance(state, dict):
        raise BadOutput(f"the entrypoint's 'state' is a {type(state).__name__}, not a dict")
    report = {"reason": "ok", "output": result["output"], "state": state, "error": None,
              "peak_rss_kib": peak_rss_kib()}
    try:
        line = json.dumps(report, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise BadOutput(f"the entrypoint's result is not JSON-serialisable: {type(e).__name__}: {e}") from e
    if len(line) > max_output_bytes:
        raise BadOutput(f"the entrypoint's result is {len(line)} bytes encoded, over the limit of {max_output_bytes}")
    return line


def failure(reason: str, error: str) -> bytes:
    """The report line for a task that produced no result (the error text cut to :data:`ERROR_MAX_CHARS`)."""
    if len(error) > ERROR_MAX_CHARS:
        error = error[: ERROR_MAX_CHARS - 3] + "..."
    report = {"reason": reason, "output": None, "state": None, "error": error, "peak_rss_kib": peak_rss_kib()}
    return json.dumps(report, separators=(",", ":")).encode()


def run(document: dict[str, Any], max_output_bytes: int) -> bytes:
    """Load the entrypoint, call it with the request and return the report line."""
    function = load_entrypoint(str(document["image_root"]), str(document["entrypoint"]))
    if document.get("probe"):  # a start check: the code loads and its entrypoint is callable
        return encode_result({"output": {"loaded": str(document["entrypoint"])}}, max_output_bytes)
    return encode_result(function(document["request"]), max_output_bytes)


def run_guarded(max_output_bytes: int) -> bytes:
    """:func:`run` the request from stdin, turning every exception into a report line.

    A MemoryError (from the image, from decoding the request or from encoding the result) is
    ``memory_limit``: the reserve is dropped first, and the exception's frames (and whatever the image
    allocated through them) are released before the report is built. SystemExit from the image is an
    error too: a task must return its result.
    """
    _reserve: bytearray | None = None
    error = ""
    try:
        _reserve = bytearray(RESERVE_BYTES)
        return run(read_request(), max_output_bytes)
    except MemoryError as e:
        _reserve = None
        error = describe(e)
    except BadOutput as e:
        return failure("bad_output", str(e))
    except EntrypointError as e:
        return failure("error", f"{type(e).__name__}: {e}")
    except SystemExit as e:
        return failure("error", f"the image called sys.exit({e.code!r}) instead of returning a result")
    except BaseException as e:
        return failure("error", describe(e))
    return failure("memory_limit", error)


def peak_rss_kib(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a live process since its last exec, in KiB; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str]) -> None:
    """Apply the limits, run the task, write the report and exit at once.

    ``os._exit`` skips interpreter shutdown: non-daemon threads the image left running must not keep
    the task alive, and the image's atexit handlers run on no one's behalf. Leftover subprocesses are
    killed by the parent with the whole process group.
    """
    memory_bytes, cpu_soft, cpu_hard, max_output_bytes = (int(a) for a in argv)
    apply_limits(memory_bytes, cpu_soft, cpu_hard)
    faulthandler.enable()  # a segfault leaves a Python traceback in stderr
    report_fd = detach_stdout()
    line = run_guarded(max_output_bytes)
    try:
        sys.stderr.flush()
    finally:
        write_all(report_fd, line + b"\n")
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

