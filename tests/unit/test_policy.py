"""The policy model: validation with every error at its path, stable JSON, operation names, templates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tetrarch.policy import (
    ADDS_AGENTS,
    DEFAULT_AGENT_RESOURCES,
    LOADS_IMAGE,
    TAKES_RESOURCES,
    TEMPLATES,
    AgentLimits,
    EvolutionPolicy,
    ImagePolicy,
    MessagingPolicy,
    OperationType,
    Policy,
    ShareLimits,
    template,
)
from tetrarch.resources import Resources

LEVELS = ("orchestrator", "manager", "supervisor")


def error_locs(exc: pytest.ExceptionInfo[ValidationError]) -> dict[tuple[str | int, ...], str]:
    """Every error of a refused policy: its location -> its pydantic error type."""
    return {tuple(e["loc"]): e["type"] for e in exc.value.errors()}


# -- validation ---------------------------------------------------------------------------------------------


def test_a_malformed_policy_is_refused_with_every_error_at_its_path():
    bad: dict[str, Any] = {
        "version": 0,
        "max_children": -2,
        "max_agents": -1,
        "surprise": True,
        "agent": {
            "max_resources": {"cpu": -1, "gpu": -1},
            "max_share": {"cpu_pct": 150, "memory_pct": 0, "gpu_pct": -3, "bogus": 1},
        },
        "allowed_operations": ["spawn", "status"],
        "denied_operations": ["kill", "read_metrics"],
        "messaging": {"send_to": ["a"], "extra": 1},
        "images": {"allowed_images": "calc@*"},
        "evolution": {"min_interval_seconds": -5, "allowed": "maybe"},
    }
    with pytest.raises(ValidationError) as exc:
        Policy.model_validate(bad)
    assert error_locs(exc) == {
        ("version",): "greater_than_equal",
        ("max_children",): "greater_than_equal",
        ("max_agents",): "greater_than_equal",
        ("surprise",): "extra_forbidden",
        ("agent", "max_resources", "cpu"): "value_error",
        ("agent", "max_resources", "gpu"): "greater_than_equal",
        ("agent", "max_share", "cpu_pct"): "less_than_equal",
        ("agent", "max_share", "memory_pct"): "greater_than",
        ("agent", "max_share", "gpu_pct"): "greater_than",
        ("agent", "max_share", "bogus"): "extra_forbidden",
        ("allowed_operations", 1): "enum",
        ("denied_operations", 1): "enum",
        ("messaging", "extra"): "extra_forbidden",
        ("images", "allowed_images"): "frozen_set_type",
        ("evolution", "allowed"): "bool_parsing",
        ("evolution", "min_interval_seconds"): "greater_than_equal",
    }


@pytest.mark.parametrize(
    ("data", "loc", "kind"),
    [
        ({"max_agents": -1}, ("max_agents",), "greater_than_equal"),
        ({"max_children": -1}, ("max_children",), "greater_than_equal"),
        ({"agent": {"max_share": {"cpu_pct": 100.01}}}, ("agent", "max_share", "cpu_pct"), "less_than_equal"),
        ({"agent": {"max_share": {"memory_pct": 0}}}, ("agent", "max_share", "memory_pct"), "greater_than"),
        ({"agent": {"max_share": {"gpu_pct": 0.0}}}, ("agent", "max_share", "gpu_pct"), "greater_than"),
        ({"agent": {"max_resources": {"memory": "-1Gi"}}}, ("agent", "max_resources", "memory"), "value_error"),
        ({"agent": {"max_cpu": 1}}, ("agent", "max_cpu"), "extra_forbidden"),
        ({"denied_operations": ["status"]}, ("denied_operations", 0), "enum"),
        ({"allowed_operations": ["metrics"]}, ("allowed_operations", 0), "enum"),
        ({"images": {"signers": ["ab"]}}, ("images", "signers"), "extra_forbidden"),
        ({"evolution": {"min_interval_seconds": -1}}, ("evolution", "min_interval_seconds"), "greater_than_equal"),
        ({"default_agent_resources": {"gpu": -1}}, ("default_agent_resources", "gpu"), "greater_than_equal"),
    ],
)
def test_each_malformed_rule_is_refused_at_its_path(data, loc, kind):
    with pytest.raises(ValidationError) as exc:
        Policy.model_validate(data)
    assert error_locs(exc) == {loc: kind}


@pytest.mark.parametrize("pct", [0.001, 5, 50, 100])
def test_shares_in_the_open_closed_percent_range_are_accepted(pct):
    assert ShareLimits(cpu_pct=pct, memory_pct=pct, gpu_pct=pct).cpu_pct == pct


def test_every_rule_is_optional_and_none_means_no_rule_here():
    p = Policy()
    assert p.version == 1
    assert p.max_agents is None and p.max_children is None
    assert p.agent.max_resources is None and p.agent.max_share is None
    assert p.allowed_operations is None and p.denied_operations == frozenset()
    assert p.messaging.send_to is None and p.messaging.accept_from is None
    assert p.images.trusted_signers is None and p.images.allowed_images is None
    assert p.evolution.allowed is None and p.evolution.min_interval_seconds is None


def test_a_policy_is_frozen():
    p = Policy(max_agents=3)
    with pytest.raises(ValidationError):
        p.max_agents = 4  # type: ignore[misc]
    assert p.max_agents == 3


def test_rules_clears_bookkeeping_only():
    a = Policy(version=7, template="standard", max_agents=3)
    b = Policy(version=2, max_agents=3)
    assert a != b
    assert a.rules() == b.rules()
    assert a.rules().max_agents == 3
    assert a.rules() != Policy(max_agents=4).rules()


# -- operation names ----------------------------------------------------------------------------------------


def test_reads_are_not_operation_types():
    for read in ("status", "metrics", "read", "list"):
        with pytest.raises(ValueError):
            OperationType(read)
    assert {op.value for op in OperationType} == {
        "spawn", "batch_spawn", "kill", "checkpoint", "restore", "clone", "merge", "split", "upgrade",
        "specialize", "message", "allocate", "evolve"}


def test_operation_groups():
    # Everything that adds an agent also gives it resources; messages, kills and checkpoints do neither.
    assert ADDS_AGENTS <= TAKES_RESOURCES
    for op in (OperationType.MESSAGE, OperationType.KILL, OperationType.CHECKPOINT):
        assert op not in ADDS_AGENTS | TAKES_RESOURCES | LOADS_IMAGE
    assert OperationType.EVOLVE in LOADS_IMAGE and OperationType.UPGRADE in LOADS_IMAGE
    assert OperationType.MERGE not in ADDS_AGENTS and OperationType.MERGE in TAKES_RESOURCES


# -- JSON ---------------------------------------------------------------------------------------------------


FULL = {
    "version": 4,
    "template": "standard",
    "max_children": 5,
    "max_agents": 40,
    "agent": {"max_resources": {"cpu": "1500m", "memory": "2Gi", "gpu": 1}, "max_share": {"cpu_pct": 10}},
    "allowed_operations": ["spawn", "kill", "message", "batch_spawn"],
    "denied_operations": ["merge", "clone"],
    "messaging": {"send_to": ["zeta", "alpha", "mu"], "accept_from": ["b", "a"]},
    "images": {"trusted_signers": ["ff00", "00ff"], "allowed_images": ["sum@*", "calc@1.*"]},
    "evolution": {"allowed": True, "min_interval_seconds": 3600},
    "default_agent_resources": {"cpu": 1, "memory": "1Gi"},
}


def reordered(data: dict[str, Any]) -> dict[str, Any]:
    """The same policy with every list reversed and the keys in reverse order."""
    out: dict[str, Any] = {}
    for key in reversed(list(data)):
        value = data[key]
        if isinstance(value, dict):
            value = reordered(value)
        elif isinstance(value, list):
            value = list(reversed(value))
        out[key] = value
    return out


def test_json_round_trip_is_stable_and_sets_serialise_sorted():
    p = Policy.model_validate(FULL)
    text = p.model_dump_json()
    assert text == p.model_dump_json()
    assert Policy.model_validate_json(text) == p
    assert Policy.model_validate_json(text).model_dump_json() == text
    dumped = json.loads(text)
    assert dumped["allowed_operations"] == ["batch_spawn", "kill", "message", "spawn"]
    assert dumped["denied_operations"] == ["clone", "merge"]
    assert dumped["messaging"] == {"send_to": ["alpha", "mu", "zeta"], "accept_from": ["a", "b"]}
    assert dumped["images"] == {"trusted_signers": ["00ff", "ff00"], "allowed_images": ["calc@1.*", "sum@*"]}
    assert dumped["agent"]["max_resources"] == {"cpu_millis": 1500, "memory_mib": 2048, "gpu": 1}
    # Differently ordered input: the very same JSON.
    other = Policy.model_validate(reordered(FULL))
    assert other == p
    assert other.model_dump_json() == text
    # The python-mode dump sorts too (a digest over it is stable).
    assert p.model_dump()["messaging"]["send_to"] == ["alpha", "mu", "zeta"]


names = st.frozensets(st.text(alphabet="abcxyz@*.1", min_size=1, max_size=6), max_size=5)
operations = st.frozensets(st.sampled_from(list(OperationType)))
pcts = st.none() | st.floats(min_value=0.01, max_value=100, allow_nan=False)
small_resources = st.builds(Resources, cpu_millis=st.integers(0, 10**6), memory_mib=st.integers(0, 10**6),
                            gpu=st.integers(0, 8))
random_policies = st.builds(
    Policy,
    version=st.integers(1, 1000),
    max_children=st.none() | st.integers(0, 100),
    max_agents=st.none() | st.integers(0, 100),
    agent=st.builds(AgentLimits, max_resources=st.none() | small_resources,
                    max_share=st.none() | st.builds(ShareLimits, cpu_pct=pcts, memory_pct=pcts, gpu_pct=pcts)),
    allowed_operations=st.none() | operations,
    denied_operations=operations,
    messaging=st.builds(MessagingPolicy, send_to=st.none() | names, accept_from=st.none() | names),
    images=st.builds(ImagePolicy, trusted_signers=st.none() | names, allowed_images=st.none() | names),
    evolution=st.builds(EvolutionPolicy, allowed=st.none() | st.booleans(),
                        min_interval_seconds=st.none() | st.integers(0, 10**6)),
)


@settings(max_examples=60, deadline=None)
@given(random_policies, st.randoms(use_true_random=False))
def test_any_policy_round_trips_to_identical_json(p, rnd):
    text = p.model_dump_json()
    back = Policy.model_validate_json(text)
    assert back == p
    assert back.model_dump_json() == text
    # The same policy from shuffled JSON lists dumps to the same text.
    data = json.loads(text)
    for section, field in (("messaging", "send_to"), ("images", "allowed_images"), ("images", "trusted_signers")):
        if data[section][field] is not None:
            rnd.shuffle(data[section][field])
    rnd.shuffle(data["denied_operations"])
    assert Policy.model_validate(data).model_dump_json() == text


# -- templates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_is_a_valid_policy_at_every_level(name, level):
    p = template(name, level)
    assert p.template == name
    assert p.version == 1
    assert Policy.model_validate_json(p.model_dump_json()) == p


@pytest.mark.parametrize("level", LEVELS)
def test_permissive_dev_has_no_rules_and_allows_evolution_at_any_pace(level):
    p = template("permissive-dev", level)
    assert p.rules() == Policy(evolution=EvolutionPolicy(allowed=True, min_interval_seconds=0))


@pytest.mark.parametrize(("level", "pct"), [("orchestrator", 50.0), ("manager", 10.0), ("supervisor", 5.0)])
def test_standard_has_the_seeds_cpu_shares(level, pct):
    p = template("standard", level)
    assert p.agent == AgentLimits(max_share=ShareLimits(cpu_pct=pct))
    assert p.evolution == EvolutionPolicy(allowed=True, min_interval_seconds=3600)
    assert p.allowed_operations is None and p.denied_operations == frozenset()
    assert p.messaging == MessagingPolicy()


@pytest.mark.parametrize(("level", "pct"), [("orchestrator", 50.0), ("manager", 10.0), ("supervisor", 5.0)])
def test_locked_down_allows_four_operations_no_messages_no_evolution(level, pct):
    p = template("locked-down", level)
    assert p.allowed_operations == frozenset({OperationType.SPAWN, OperationType.KILL, OperationType.CHECKPOINT,
                                              OperationType.RESTORE})
    assert p.messaging == MessagingPolicy(send_to=frozenset(), accept_from=frozenset())
    assert p.evolution.allowed is False
    assert p.agent.max_share == ShareLimits(cpu_pct=pct)


@pytest.mark.parametrize(("name", "level", "mention"), [
    ("strict", "manager", "permissive-dev"),
    ("", "manager", "locked-down"),
    ("Standard", "manager", "standard"),
    ("standard", "agent", "supervisor"),
    ("standard", "global", "orchestrator"),
    ("locked-down", "", "manager"),
])
def test_unknown_template_or_level_is_a_value_error_naming_the_choices(name, level, mention):
    with pytest.raises(ValueError, match=mention):
        template(name, level)


def test_default_agent_resources_are_one_cpu_one_gib():
    assert Resources(cpu_millis=1000, memory_mib=1024) == DEFAULT_AGENT_RESOURCES
