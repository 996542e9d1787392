"""Agents with images through the command line: the default hierarchy's agents run the example images.

Tasks, bad task input, image verification, and the lifecycle commands (checkpoint, clone, stop,
restore, specialize) against ``up``'s embedded server.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Up, assert_clean, ok, tetrarch

pytestmark = pytest.mark.e2e


def test_the_default_agents_run_their_images(up_server: Up) -> None:
    a = up_server.address
    st = ok("agent", "status", "research", "sup-2-agent-1", address=a)
    assert st["spec"]["image"] == "calculator@1.0.0"
    r = ok("agent", "task", "research", "sup-2-agent-1", "evaluate", "--input", '{"expression": "2 + 2 * 10"}',
           address=a)
    assert r["ok"] is True and r["output"] == {"value": 22}
    human = tetrarch("agent", "task", "support", "sup-1-agent-1", "route", "--input",
                     json.dumps({"text": "my invoice is wrong, refund please"}), address=a, as_json=False)
    assert human.rc == 0, str(human)
    assert '"capability"' in human.stdout
    bad = tetrarch("agent", "task", "research", "sup-2-agent-1", "evaluate", "--input", '{"expr": 1}', address=a)
    assert bad.rc == 1 and bad.error["code"] == "TaskInputInvalid"
    assert_clean(bad)
    not_json = tetrarch("agent", "task", "research", "sup-2-agent-1", "evaluate", "--input", "{nope", address=a)
    assert not_json.rc == 2


def test_image_commands(up_server: Up) -> None:
    ok_verify = tetrarch("image", "verify", "images/calculator", "--trust-file", "images/demo-key.pub")
    assert ok_verify.rc == 0, str(ok_verify)
    untrusted = tetrarch("image", "verify", "images/calculator", "--trust", "00" * 32)
    assert untrusted.rc == 1 and "ImageUntrusted" in (untrusted.stdout + untrusted.stderr)


def test_lifecycle_commands(up_server: Up) -> None:
    a = up_server.address
    d = "life-cli"
    ok("domain", "create", d, "--cpu", "8", "--memory", "8Gi", address=a)
    ok("supervisor", "create", d, "s1", "--cpu", "3", "--memory", "3Gi", address=a)
    ok("supervisor", "create", d, "s2", "--cpu", "3", "--memory", "3Gi", address=a)
    ok("agent", "spawn", d, "s1", "sum", "--image", "summarizer", "--param", "max_sentences=2", address=a)
    text = "Durable workflows survive crashes. Lunch was at noon. Workflows replay history after crashes."
    ok("agent", "task", d, "sum", "summarize", "--input", json.dumps({"text": text, "document_id": "d1"}), address=a)
    cp = ok("agent", "checkpoint", d, "sum", "--label", "one doc", address=a)
    assert cp["memory"] == {"work_items": ["d1"]}
    clone = ok("agent", "clone", d, "sum", "sum-2", address=a)
    assert clone["agents"] == ["sum-2"]
    ok("agent", "stop", d, "sum", address=a)
    restored = ok("agent", "restore", d, "sum", "--supervisor", "s2", address=a)
    assert restored["supervisor"] == "s2" and restored["checkpoint"] == "final"
    assert ok("agent", "status", d, "sum", address=a)["memory"] == {"work_items": ["d1"]}
    spec = ok("agent", "specialize", d, "sum", "--range", "max_sentences=1:1:1", address=a)
    assert spec["intents"] == ["summarize"]
    wide = tetrarch("agent", "specialize", d, "sum", "--range", "max_sentences=1:99", address=a)
    assert wide.rc == 1 and wide.error["code"] == "SpecializeWidens"
    assert ok("resources", "audit", d, address=a)["ok"] is True
    ok("domain", "remove", d, "--drain", address=a)
