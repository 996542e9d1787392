"""Agents that run signed images, on a real server: the supervisor's image step of a spawn, and tasks.

Every refusal of an image happens at the supervisor step and leaves nothing behind: no allocation at
any level, no count, no agent workflow. Tasks run in a child process under the agent's allocation; a
task that breaks its limits is stopped and reported while the agent and the worker stay up.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, eventually, res
from tetrarch.agent import TaskInput
from tetrarch.errors import NotFound, PolicyDenied, TetrarchError
from tetrarch.image_store import DEFAULT_IMAGE_DIR
from tetrarch.images import Signature, generate_keypair, image_digest, public_key_hex, sign_image
from tetrarch.models import AgentStatus
from tetrarch.operations import CreateDomainRequest, CreateSupervisorRequest, RemoveDomainRequest, SpawnAgentRequest
from tetrarch.policy import ImagePolicy, Policy
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient

DEMO_KEY = (DEFAULT_IMAGE_DIR / "demo-key.pub").read_text().strip()
DEMO_PRIVATE = (DEFAULT_IMAGE_DIR / "demo-key.key").read_bytes()


async def domain(tc: TetrarchClient, tag: str, policy: Policy | None = None) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10), policy=policy or Policy()))
    await tc.create_supervisor(CreateSupervisorRequest(domain=d, name="s", resources=res(4)))
    return d


async def assert_nothing_left(tc: TetrarchClient, client: Client, d: str, before: object, agent: str) -> None:
    assert await tc.pools([d]) == before
    assert (await tc.domain_status(d)).agents == 0
    assert (await tc.supervisor_status(d, "s")).children == []
    with pytest.raises(NotFound):
        await tc.agent_status(d, agent)
    report = await tc.audit([d])
    assert report.ok, report.problems
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s"})


async def test_a_signed_image_runs_tasks(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "img", Policy(images=ImagePolicy(trusted_signers=frozenset({DEMO_KEY}))))
    spawned = await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="calc", image="calculator"))
    assert spawned.created
    state = await tc.agent_status(d, "calc")
    assert state.spec.image == "calculator@1.0.0" and state.spec.image_info is not None
    assert state.spec.image_info.signer == DEMO_KEY
    assert state.spec.resources == state.spec.image_info.manifest.default_resources, "the image's default resources"

    result = await tc.execute_task(d, "calc", TaskInput(intent="evaluate", input={"expression": "2 * (3 + 4)"}))
    assert result.ok and result.output == {"value": 14} and result.reason == "ok"
    assert result.cpu_seconds >= 0 and result.max_rss_mib > 0
    assert result.limits["memory_mib"] == state.spec.resources.memory_mib
    failed = await tc.execute_task(d, "calc", TaskInput(intent="evaluate", input={"expression": "__import__('os')"}))
    assert not failed.ok and failed.reason == "error" and failed.error
    after = await tc.agent_status(d, "calc")
    assert (after.tasks_completed, after.tasks_failed, after.status) == (1, 1, AgentStatus.RUNNING)
    assert after.used is not None and after.used.memory_mib > 0

    with pytest.raises(TetrarchError) as bad:
        await tc.execute_task(d, "calc", TaskInput(intent="evaluate", input={"expr": "1"}))
    assert bad.value.code == "TaskInputInvalid" and bad.value.level == "agent"
    with pytest.raises(TetrarchError) as unknown:
        await tc.execute_task(d, "calc", TaskInput(intent="summarize", input={}))
    assert unknown.value.code == "UnknownIntent"
    assert (await tc.agent_status(d, "calc")).tasks_completed == 1, "refused tasks never ran"
    # reportMetrics: the task counts travel up with the reports, to the supervisor and the domain.
    dom = await eventually(lambda: tc.domain_status(d), lambda v: v.metrics.tasks_completed == 1)
    assert (dom.metrics.tasks_completed, dom.metrics.tasks_failed) == (1, 1)
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


def _sign_anyway(root: Path, private_pem: bytes) -> None:
    """Sign an image as a careless tool would: without checking its manifest or entrypoint first
    (sign_image refuses to), so the supervisor's own checks are what refuses it."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    digest = image_digest(root)
    sig = Signature(digest=digest, signer=public_key_hex(private_pem), signature=key.sign(bytes.fromhex(digest)).hex(),
                    signed_at=datetime.now(UTC))
    (root / "SIGNATURE.json").write_text(sig.model_dump_json())


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(DEFAULT_IMAGE_DIR / name, dest)
    return dest


@pytest.mark.parametrize("fault", ["unsigned", "untrusted", "tampered", "bad-manifest", "no-entrypoint"])
async def test_a_bad_image_is_refused_at_the_supervisor_and_leaves_nothing(
        tc: TetrarchClient, client: Client, tmp_path: Path, fault: str) -> None:
    d = await domain(tc, f"badimg-{fault[:6]}", Policy(images=ImagePolicy(trusted_signers=frozenset({DEMO_KEY}))))
    before = await tc.pools([d])
    image = _copy(tmp_path, "calculator")
    if fault == "unsigned":
        (image / "SIGNATURE.json").unlink()
    elif fault == "untrusted":
        key, _ = generate_keypair()
        sign_image(image, key)
    elif fault == "tampered":
        code = image / "agent.py"
        data = bytearray(code.read_bytes())
        data[-2] = ord("#") if data[-2] != ord("#") else ord(" ")
        code.write_bytes(bytes(data))
    elif fault == "bad-manifest":
        (image / "manifest.yaml").write_text("name: [unclosed\n")
        _sign_anyway(image, DEMO_PRIVATE)
    else:
        manifest = image / "manifest.yaml"
        manifest.write_text(manifest.read_text().replace("agent:handle", "agent:nowhere"))
        _sign_anyway(image, DEMO_PRIVATE)
    expected = {"unsigned": "ImageUnsigned", "untrusted": "ImageUntrusted", "tampered": "ImageTampered",
                "bad-manifest": "ImageBadManifest", "no-entrypoint": "ImageBadEntrypoint"}[fault]
    with pytest.raises(TetrarchError) as e:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", image=str(image),
                                               resources=Resources.of(cpu=0.5, memory="256Mi")))
    assert e.value.code == expected, e.value
    assert e.value.level == "supervisor"
    await assert_nothing_left(tc, client, d, before, "a")
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_an_image_outside_the_policy_is_refused(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "imgpol", Policy(images=ImagePolicy(allowed_images=frozenset({"summarizer@*"}))))
    before = await tc.pools([d])
    with pytest.raises(PolicyDenied) as e:
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", image="calculator"))
    assert e.value.level == "manager" and "calculator" in e.value.message
    await assert_nothing_left(tc, client, d, before, "a")
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_tasks_past_their_limits_are_stopped_and_the_agent_stays_up(
        tc: TetrarchClient, client: Client, tmp_path: Path) -> None:
    """A memory hog and a CPU loop, each stopped by the OS limits of the agent's allocation."""
    key, public = generate_keypair()
    image = _copy(tmp_path, "calculator")
    (image / "agent.py").write_text(
        "def handle(request):\n"
        "    if request['input']['expression'] == 'hog':\n"
        "        blocks = []\n"
        "        while True:\n"
        "            blocks.append(bytearray(16 * 1024 * 1024))\n"
        "    if request['input']['expression'] == 'spin':\n"
        "        while True:\n"
        "            pass\n"
        "    return {'output': {'value': 1}}\n")
    sign_image(image, key)
    d = await domain(tc, "limits", Policy(images=ImagePolicy(trusted_signers=frozenset({public}))))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="a", image=str(image),
                                           resources=Resources.of(cpu=0.5, memory="128Mi")))
    hog = await tc.execute_task(d, "a", TaskInput(intent="evaluate", input={"expression": "hog"}, retries=2))
    assert not hog.ok and hog.reason == "memory_limit" and hog.attempts == 1, "a limit is not retried"
    spin = await tc.execute_task(d, "a", TaskInput(intent="evaluate", input={"expression": "spin"},
                                                   timeout_seconds=2))
    assert not spin.ok and spin.reason == "cpu_limit"
    assert spin.limits["cpu_seconds"] == pytest.approx(1.0)
    fine = await tc.execute_task(d, "a", TaskInput(intent="evaluate", input={"expression": "1"}))
    assert fine.ok and fine.output == {"value": 1}, "the agent and the worker are still up"
    state = await tc.agent_status(d, "a")
    assert (state.status, state.tasks_completed, state.tasks_failed) == (AgentStatus.RUNNING, 1, 2)
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_the_agents_task_policy_retries_failures(tc: TetrarchClient) -> None:
    """A failed task is retried with backoff per the agent's policy (task_retries), unless the task says."""
    d = await domain(tc, "retries")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s", name="calc", image="calculator", task_retries=2))
    failed = await tc.execute_task(d, "calc", TaskInput(intent="evaluate", input={"expression": "1 / 0"}))
    assert not failed.ok and failed.reason == "error" and failed.attempts == 3
    once = await tc.execute_task(d, "calc", TaskInput(intent="evaluate", input={"expression": "1 / 0"}, retries=0))
    assert not once.ok and once.attempts == 1
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))
