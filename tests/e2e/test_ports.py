"""Clear failures instead of tracebacks: a port already taken, and a server that is not there."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Result, assert_clean, tetrarch, two_free_ports
from tetrarch.bootstrap import DEFAULT_BOOTSTRAP
from tetrarch_cli.server import free_port, port_in_use

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _assert_port_refusal(r: Result, port: int, flag: str, what: str, as_json: bool) -> None:
    assert r.rc != 0, str(r)
    assert_clean(r)
    if as_json:
        err = r.error
        assert err["code"] == "ServerError", str(r)
        message = err["message"]
    else:
        message = r.stderr
        assert r.stdout == "", str(r)
    assert f"port {port}" in message, str(r)
    assert "already in use" in message, str(r)
    assert what in message and flag in message, str(r)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "human"])
@pytest.mark.parametrize("which", ["server", "ui"])
def test_up_refuses_a_port_in_use(busy_port: int, tmp_path: Path, which: str, as_json: bool) -> None:
    other = free_port()
    port, ui_port = (busy_port, other) if which == "server" else (other, busy_port)
    r = tetrarch("up", "--state-dir", tmp_path / "state", "--port", port, "--ui-port", ui_port,
                 "--exit-after-apply", as_json=as_json, timeout=90)
    flag, what = ("--port", "server") if which == "server" else ("--ui-port", "Web UI")
    _assert_port_refusal(r, busy_port, flag, what, as_json)
    assert not port_in_use("127.0.0.1", other), "a server was left running on the other port"


#: Commands that need the server, each as a user would type it.
NEEDS_SERVER = [
    ["status"],
    ["status", "research"],
    ["domain", "list"],
    ["domain", "create", "x"],
    ["supervisor", "scale", "research", "2"],
    ["agent", "spawn", "research", "sup-1", "a1"],
    ["agent", "status", "research", "a1"],
    ["apply", str(DEFAULT_BOOTSTRAP)],
    ["worker", "--level", "all"],
    ["up", "--no-workers", "--exit-after-apply"],
]


def test_commands_against_nothing_exit_3_with_a_clear_message() -> None:
    address = f"127.0.0.1:{free_port()}"
    problems: list[str] = []
    for args in NEEDS_SERVER:
        for as_json in (True, False):
            r = tetrarch(*args, address=address, as_json=as_json, timeout=60)
            try:
                assert r.rc == 3, "exit code is not 3"
                assert_clean(r)
                if as_json:
                    err = r.error
                    assert err["code"] == "Unreachable", f"code {err['code']}"
                    message = err["message"]
                else:
                    message = r.stderr
                assert f"cannot reach Temporal at {address}" in message, "no 'cannot reach <address>'"
            except AssertionError as e:
                problems.append(f"{' '.join(args)} ({'json' if as_json else 'human'}): {e}\n{r}")
    assert not problems, "\n\n".join(problems)


def test_up_on_a_taken_port_refuses_before_starting_anything(tmp_path: Path) -> None:
    """The refusal comes first: the holder keeps its port and no server state is written."""
    port, ui_port = two_free_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = tetrarch("up", "--state-dir", tmp_path / "state", "--port", port, "--ui-port", ui_port, timeout=90)
        _assert_port_refusal(r, port, "--port", "server", True)
        # The holder still owns the port and still accepts connections.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    assert not (tmp_path / "state" / "temporal.sqlite").exists()
