"""Lifecycle operations on a real server: checkpoint, kill, restore, clone, upgrade and specialize.

Each refusal names what is wrong and leaves the agents as they were (an upgrade that fails keeps the
old version running); each test ends with the conservation audit of its domain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.client import Client

from tests.conftest import domain_name
from tests.workflow.helpers import assert_only_entities_running, res
from tetrarch.agent import TaskInput
from tetrarch.errors import Conflict, InvalidRequest, NotFound, PolicyDenied, TetrarchError
from tetrarch.image_store import DEFAULT_IMAGE_DIR
from tetrarch.images import Narrowing, ParameterRange, sign_image
from tetrarch.lifecycle_ops import (
    CheckpointRequest,
    CloneRequest,
    LifecycleResult,
    MergeRequest,
    RestoreRequest,
    SelfRequest,
    SpecializeRequest,
    SplitRequest,
    UpgradeRequest,
)
from tetrarch.models import AgentStatus
from tetrarch.operations import (
    CreateDomainRequest,
    CreateSupervisorRequest,
    RemovalResult,
    RemoveDomainRequest,
    SetPolicyRequest,
    SpawnAgentRequest,
    StopAgentRequest,
)
from tetrarch.policy import ImagePolicy, OperationType, Policy
from tetrarch.resources import Resources
from tetrarch_cli.client import TetrarchClient

DEMO_KEY = (DEFAULT_IMAGE_DIR / "demo-key.pub").read_text().strip()
DEMO_PRIVATE = (DEFAULT_IMAGE_DIR / "demo-key.key").read_bytes()
TEXT = "Durable workflows survive crashes. Lunch was at noon. Workflows replay their history after crashes."


async def domain(tc: TetrarchClient, tag: str) -> str:
    d = domain_name(tag)
    await tc.create_domain(CreateDomainRequest(domain=d, resources=res(10), policy=Policy(
        images=ImagePolicy(trusted_signers=frozenset({DEMO_KEY})))))
    for s in ("s1", "s2"):
        await tc.create_supervisor(CreateSupervisorRequest(domain=d, name=s, resources=res(3)))
    return d


async def summarize(tc: TetrarchClient, d: str, agent: str, doc: str) -> None:
    r = await tc.execute_task(d, agent, TaskInput(intent="summarize", input={"text": TEXT, "document_id": doc}))
    assert r.ok, r


async def finish(tc: TetrarchClient, d: str) -> None:
    report = await tc.audit([d])
    assert report.ok, report.problems
    await tc.remove_domain(RemoveDomainRequest(domain=d, drain=True))


async def test_kill_keeps_a_final_checkpoint_and_restore_brings_the_agent_back_elsewhere(
        tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "restore")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a", image="summarizer"))
    await summarize(tc, d, "a", "doc-1")
    cp = await tc.checkpoint_agent(CheckpointRequest(domain=d, name="a", label="after doc-1"))
    assert cp.memory == {"work_items": ["doc-1"]} and cp.image is not None and cp.image.ref == "summarizer@1.0.0"
    await summarize(tc, d, "a", "doc-2")
    with pytest.raises(Conflict):  # restoring over a running agent of the same name
        await tc.restore_agent(RestoreRequest(domain=d, name="a"))
    before_kill = await tc.pools([d])
    await tc.stop_agent(StopAgentRequest(domain=d, name="a"))
    restored = await tc.restore_agent(RestoreRequest(domain=d, name="a", supervisor="s2"))
    assert restored.checkpoint == "final" and restored.supervisor == "s2"
    state = await tc.agent_status(d, "a")
    assert state.status is AgentStatus.RUNNING and state.spec.supervisor == "s2"
    assert state.memory == {"work_items": ["doc-1", "doc-2"]}, "the final checkpoint's working state"
    pools = await tc.pools([d])
    assert pools.pools[f"manager/{d}"] == before_kill.pools[f"manager/{d}"]
    # An older checkpoint of another agent, under a new name.
    with pytest.raises(NotFound) as e:
        await tc.restore_agent(RestoreRequest(domain=d, name="b", source="a", checkpoint="cp-nope"))
    assert "cp-nope" in e.value.message
    with pytest.raises(NotFound):
        await tc.restore_agent(RestoreRequest(domain=d, name="c", source="never-existed"))
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"supervisor/{d}/s2",
                                                   f"agent/{d}/a"})
    await finish(tc, d)


async def test_clone_copies_state_and_image_and_the_source_runs_on(tc: TetrarchClient) -> None:
    d = await domain(tc, "clone")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a", image="summarizer",
                                           params={"max_sentences": 2}))
    await summarize(tc, d, "a", "doc-1")
    cloned = await tc.clone_agent(CloneRequest(domain=d, source="a", name="a-copy"))
    assert cloned.agents == ["a-copy"]
    copy, src = await tc.agent_status(d, "a-copy"), await tc.agent_status(d, "a")
    assert copy.memory == src.memory == {"work_items": ["doc-1"]}
    assert copy.spec.params == {"max_sentences": 2} and copy.spec.image_info is not None
    assert src.spec.image_info is not None and copy.spec.image_info.digest == src.spec.image_info.digest
    assert src.status is AgentStatus.RUNNING
    with pytest.raises(NotFound):
        await tc.clone_agent(CloneRequest(domain=d, source="ghost", name="x"))
    await finish(tc, d)


def _version(tmp_path: Path, version: str, broken: bool = False) -> Path:
    """The calculator image at another version, signed by the demo key (broken: it answers wrong)."""
    dest = tmp_path / f"calculator-{version}"
    shutil.copytree(DEFAULT_IMAGE_DIR / "calculator", dest)
    manifest = dest / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", f"version: {version}"))
    if broken:
        code = dest / "agent.py"
        code.write_text(code.read_text() + "\n\n_real = handle\n\n\ndef handle(request):\n"
                        "    out = _real(request)\n    out['output'] = {'value': -1}\n    return out\n")
    sign_image(dest, DEMO_PRIVATE)
    return dest


async def test_upgrade_only_after_the_new_version_verifies_and_passes(tc: TetrarchClient, tmp_path: Path) -> None:
    d = await domain(tc, "upgrade")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="calc", image="calculator"))
    broken = _version(tmp_path, "1.2.0", broken=True)
    with pytest.raises(Conflict) as failed:
        await tc.upgrade_agent(UpgradeRequest(domain=d, name="calc", image=str(broken)))
    assert "evaluation" in failed.value.message and failed.value.problems
    assert (await tc.agent_status(d, "calc")).spec.image == "calculator@1.0.0", "the old version keeps running"
    unsigned = _version(tmp_path, "1.3.0")
    (unsigned / "SIGNATURE.json").unlink()
    with pytest.raises(TetrarchError) as e:
        await tc.upgrade_agent(UpgradeRequest(domain=d, name="calc", image=str(unsigned)))
    assert e.value.code == "ImageUnsigned"
    older = _version(tmp_path, "0.9.0")
    with pytest.raises(InvalidRequest) as old:
        await tc.upgrade_agent(UpgradeRequest(domain=d, name="calc", image=str(older)))
    assert "not newer" in old.value.message
    with pytest.raises(InvalidRequest):
        await tc.upgrade_agent(UpgradeRequest(domain=d, name="calc", image="summarizer"))

    crashing = _version(tmp_path, "1.4.0")
    code = crashing / "agent.py"
    code.write_text(code.read_text() + "\n\nraise RuntimeError('this version cannot start')\n")
    sign_image(crashing, DEMO_PRIVATE)
    with pytest.raises(Conflict) as start:
        await tc.upgrade_agent(UpgradeRequest(domain=d, name="calc", image=str(crashing)))
    assert "does not start" in str(start.value.problems) and "cannot start" in str(start.value.problems)
    assert (await tc.agent_status(d, "calc")).spec.image == "calculator@1.0.0"

    good = _version(tmp_path, "1.1.0")
    done = await tc.upgrade_agent(UpgradeRequest(domain=d, name="calc", image=str(good)))
    assert (done.previous_image, done.image) == ("calculator@1.0.0", "calculator@1.1.0")
    state = await tc.agent_status(d, "calc")
    assert state.spec.image == "calculator@1.1.0" and state.status is AgentStatus.RUNNING
    r = await tc.execute_task(d, "calc", TaskInput(intent="evaluate", input={"expression": "6 * 7"}))
    assert r.ok and r.output == {"value": 42}
    await finish(tc, d)


async def test_specialize_narrows_and_never_widens(tc: TetrarchClient) -> None:
    d = await domain(tc, "special")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a", image="summarizer"))
    with pytest.raises(TetrarchError) as wide:
        await tc.specialize_agent(SpecializeRequest(domain=d, name="a", narrowing=Narrowing(
            parameters={"max_sentences": ParameterRange(maximum=50)})))
    assert wide.value.code == "SpecializeWidens"
    with pytest.raises(TetrarchError) as unknown:
        await tc.specialize_agent(SpecializeRequest(domain=d, name="a", narrowing=Narrowing(intents=["translate"])))
    assert unknown.value.code == "SpecializeWidens"
    narrowed = await tc.specialize_agent(SpecializeRequest(domain=d, name="a", narrowing=Narrowing(
        parameters={"max_sentences": ParameterRange(maximum=2, default=1)})))
    assert narrowed.intents == ["summarize"]
    state = await tc.agent_status(d, "a")
    assert state.spec.image_info is not None
    assert state.spec.image_info.manifest.parameters["max_sentences"].maximum == 2
    assert state.spec.params["max_sentences"] == 1
    await finish(tc, d)


async def test_split_deals_the_state_out_and_divides_the_allocation(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "split")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a", image="summarizer",
                                           resources=Resources.of(cpu=1, memory="512Mi")))
    for doc in ("d1", "d2", "d3"):
        await summarize(tc, d, "a", doc)
    for parts in (0, 1):
        with pytest.raises(InvalidRequest):
            await tc.split_agent(SplitRequest(domain=d, name="a", parts=parts))
    with pytest.raises(InvalidRequest) as many:  # 512Mi in 32 parts is below what a task needs
        await tc.split_agent(SplitRequest(domain=d, name="a", parts=32))
    assert "more than" in many.value.message
    assert (await tc.agent_status(d, "a")).status is AgentStatus.RUNNING
    # An agent others depend on cannot be replaced: refused before any part is made.
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s2", name="needs-a", resources=res(1),
                                           depends_on=["a"]))
    before = await tc.pools([d])
    with pytest.raises(Conflict) as dep:
        await tc.split_agent(SplitRequest(domain=d, name="a", parts=2))
    assert "needs-a" in dep.value.message
    assert await tc.pools([d]) == before
    with pytest.raises(NotFound):
        await tc.agent_status(d, "a-1")
    await tc.stop_agent(StopAgentRequest(domain=d, name="needs-a"))
    done = await tc.split_agent(SplitRequest(domain=d, name="a", parts=2))
    assert done.agents == ["a-1", "a-2"]
    one, two = await tc.agent_status(d, "a-1"), await tc.agent_status(d, "a-2")
    assert one.memory == {"work_items": ["d1", "d3"]} and two.memory == {"work_items": ["d2"]}
    assert one.spec.resources == two.spec.resources == Resources.of(cpu=0.5, memory="256Mi")
    with pytest.raises(NotFound):
        await tc.agent_status(d, "a")
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"supervisor/{d}/s2",
                                                   f"agent/{d}/a-1", f"agent/{d}/a-2"})
    await finish(tc, d)


async def test_merge_combines_states_and_sums_allocations(tc: TetrarchClient, client: Client) -> None:
    d = await domain(tc, "merge")
    for name, doc in (("a", "d1"), ("b", "d2")):
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name=name, image="summarizer",
                                               resources=Resources.of(cpu=0.5, memory="256Mi")))
        await summarize(tc, d, name, doc)
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s2", name="calc", image="calculator"))
    with pytest.raises(InvalidRequest) as other:
        await tc.merge_agents(MergeRequest(domain=d, agents=["a", "elsewhere/b"], name="ab"))
    assert "different domains" in other.value.message
    with pytest.raises(InvalidRequest) as images:
        await tc.merge_agents(MergeRequest(domain=d, agents=["a", "calc"], name="ac"))
    assert "different images" in images.value.message
    merged = await tc.merge_agents(MergeRequest(domain=d, agents=["a", "b"], name="ab"))
    assert merged.agents == ["ab"]
    ab = await tc.agent_status(d, "ab")
    assert ab.memory == {"work_items": ["d1", "d2"]}
    assert ab.spec.resources == Resources.of(cpu=1, memory="512Mi")
    for gone in ("a", "b"):
        with pytest.raises(NotFound):
            await tc.agent_status(d, gone)
    await assert_only_entities_running(client, d, {f"manager/{d}", f"supervisor/{d}/s1", f"supervisor/{d}/s2",
                                                   f"agent/{d}/ab", f"agent/{d}/calc"})
    await finish(tc, d)


async def test_an_agent_asks_for_operations_on_itself(tc: TetrarchClient) -> None:
    """requestLifecycleOperation: judged by the policies like any other operation."""
    d = await domain(tc, "self")
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a", image="summarizer"))
    await summarize(tc, d, "a", "d1")
    with pytest.raises(InvalidRequest):
        await tc.request_operation(d, "a", SelfRequest(operation="split", parts=1))
    started = await tc.request_operation(d, "a", SelfRequest(operation="clone", name="a-twin"))
    assert started.workflow_id.startswith(f"op/clone/{d}/a-twin/")
    cloned = await tc.operation_result(started.workflow_id, LifecycleResult)
    assert cloned.agents == ["a-twin"] and (await tc.agent_status(d, "a-twin")).memory == {"work_items": ["d1"]}
    # A policy that denies clones refuses the agent's own request too.
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(
        images=ImagePolicy(trusted_signers=frozenset({DEMO_KEY})), denied_operations=frozenset({OperationType.CLONE}))))
    denied = await tc.request_operation(d, "a", SelfRequest(operation="clone", name="a-third"))
    with pytest.raises(PolicyDenied) as e:
        await tc.operation_result(denied.workflow_id, LifecycleResult)
    assert e.value.level == "manager"
    stop = await tc.request_operation(d, "a", SelfRequest(operation="stop", reason="done with my work"))
    await tc.operation_result(stop.workflow_id, RemovalResult)
    with pytest.raises(NotFound):
        await tc.agent_status(d, "a")
    await finish(tc, d)


def _hooked(tmp_path: Path) -> Path:
    """The summarizer with merge and split hooks of its own (signed by the demo key)."""
    dest = tmp_path / "summarizer-hooked"
    shutil.copytree(DEFAULT_IMAGE_DIR / "summarizer", dest)
    (dest / "hooks.py").write_text(
        "def merge(request):\n"
        "    items = sorted({i for s in request['input']['states'] for i in s.get('work_items', [])})\n"
        "    return {'output': {'work_items': items, 'merged_by': 'hook'}}\n\n\n"
        "def split(request):\n"
        "    state, parts = request['input']['state'], request['input']['parts']\n"
        "    items = state.get('work_items', [])\n"
        "    return {'output': [{'work_items': items[i::parts], 'part': i} for i in range(parts)]}\n")
    manifest = dest / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("merge: union", "merge: hooks:merge")
                        .replace("split: even", "split: hooks:split"))
    sign_image(dest, DEMO_PRIVATE)
    return dest


async def test_the_image_declares_how_states_merge_and_split(tc: TetrarchClient, tmp_path: Path) -> None:
    d = await domain(tc, "hooks")
    image = str(_hooked(tmp_path))
    for name, doc in (("a", "d2"), ("b", "d1")):
        await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name=name, image=image,
                                               resources=Resources.of(cpu=0.5, memory="256Mi")))
        await summarize(tc, d, name, doc)
    await tc.merge_agents(MergeRequest(domain=d, agents=["a", "b"], name="ab"))
    assert (await tc.agent_status(d, "ab")).memory == {"work_items": ["d1", "d2"], "merged_by": "hook"}
    await tc.split_agent(SplitRequest(domain=d, name="ab", parts=2))
    parts = [(await tc.agent_status(d, f"ab-{i}")).memory for i in (1, 2)]
    assert parts == [{"work_items": ["d1"], "part": 0}, {"work_items": ["d2"], "part": 1}]
    await finish(tc, d)


async def test_checkpoint_refuses_what_it_cannot_checkpoint(tc: TetrarchClient) -> None:
    d = await domain(tc, "cp-bad")
    with pytest.raises(NotFound):
        await tc.checkpoint_agent(CheckpointRequest(domain=d, name="ghost"))
    await tc.spawn_agent(SpawnAgentRequest(domain=d, supervisor="s1", name="a", image="summarizer"))
    await tc.stop_agent(StopAgentRequest(domain=d, name="a"))
    with pytest.raises(Conflict) as e:
        await tc.checkpoint_agent(CheckpointRequest(domain=d, name="a"))
    assert "not running" in e.value.message
    await tc.set_policy(SetPolicyRequest(domain=d, policy=Policy(
        images=ImagePolicy(trusted_signers=frozenset({DEMO_KEY})),
        denied_operations=frozenset({OperationType.CHECKPOINT}))))
    await tc.restore_agent(RestoreRequest(domain=d, name="a"))
    with pytest.raises(PolicyDenied) as denied:
        await tc.checkpoint_agent(CheckpointRequest(domain=d, name="a"))
    assert denied.value.level == "manager"
    await finish(tc, d)
