"""Bootstrap files: loading, whole-file validation with paths, and planning against what exists."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tetrarch.bootstrap import (
    DEFAULT_BOOTSTRAP,
    CurrentHierarchy,
    DomainEntry,
    HierarchySpec,
    SupervisorEntry,
    load_bootstrap,
    parse_bootstrap,
    plan_bootstrap,
)
from tetrarch.errors import InvalidBootstrap
from tetrarch.level import LevelState, RegisterChild
from tetrarch.names import Level
from tetrarch.policy import Policy
from tetrarch.resources import Resources

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def res(cpu: float | str = 0, memory: float | str = 0, gpu: int = 0) -> Resources:
    return Resources.of(cpu=cpu, memory=memory, gpu=gpu)


def write(tmp_path: Path, text: str, name: str = "hierarchy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(path: Path) -> list[str]:
    with pytest.raises(InvalidBootstrap) as exc:
        load_bootstrap(path)
    err = exc.value
    assert err.code == "InvalidBootstrap"
    assert err.level == "client"
    assert err.problems, "an invalid file must list its problems"
    return err.problems


def only(problems: list[str], path: str) -> list[str]:
    """The problems reported at exactly ``path``."""
    return [p for p in problems if p.split(": ", 1)[0] == path]


# -- the default file -------------------------------------------------------------------------------


def test_default_file_mirrors_the_seed():
    spec = load_bootstrap(DEFAULT_BOOTSTRAP)
    assert spec.version == 1
    assert spec.global_.resources == res(1000, "1Ti")
    assert spec.global_.resources == Resources(cpu_millis=1_000_000, memory_mib=1024 * 1024)
    assert [d.name for d in spec.domains] == ["research", "support"]
    for d in spec.domains:
        assert d.resources == res(100, "100Gi")
        assert d.supervisors
        for s in d.supervisors:
            assert s.resources == res(10, "10Gi")
            assert s.agent_resources == res(1, "1Gi")
            assert s.agents > 0
    assert [(s.name, s.agents) for s in spec.domains[0].supervisors] == [("sup-1", 2), ("sup-2", 2)]
    assert [(s.name, s.agents) for s in spec.domains[1].supervisors] == [("sup-1", 3)]


def test_model_defaults_mirror_the_seed():
    spec = HierarchySpec()
    assert spec.global_.resources == res(1000, "1Ti")
    assert spec.domains == []
    assert DomainEntry(name="d").resources == res(100, "100Gi")
    s = SupervisorEntry(name="s")
    assert s.resources == res(10, "10Gi")
    assert s.agent_resources == res(1, "1Gi")
    assert s.agents == 0


def test_json_file_and_empty_file(tmp_path):
    data = {"global": {"resources": {"cpu": 50, "memory": "50Gi"}},
            "domains": [{"name": "d", "resources": {"cpu": 20, "memory": "20Gi"},
                         "supervisors": [{"name": "s", "resources": {"cpu": 5, "memory": "5Gi"}, "agents": 5}]}]}
    spec = load_bootstrap(write(tmp_path, json.dumps(data), "h.json"))
    assert spec.global_.resources == res(50, "50Gi")
    assert spec.domains[0].supervisors[0].agents == 5
    # the same data as YAML gives the same spec
    assert load_bootstrap(write(tmp_path, json.dumps(data), "h.yml")) == spec
    assert parse_bootstrap(data) == spec
    empty = load_bootstrap(write(tmp_path, "", "empty.yaml"))
    assert empty == HierarchySpec()


# -- malformed files --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InvalidBootstrap, match="cannot read"):
        load_bootstrap(tmp_path / "nope.yaml")


def test_bad_yaml(tmp_path):
    path = write(tmp_path, "domains: [\n  - name: a\n")
    with pytest.raises(InvalidBootstrap, match="not valid YAML") as exc:
        load_bootstrap(path)
    assert len(exc.value.problems) == 1
    assert "line" in exc.value.problems[0]


def test_bad_json(tmp_path):
    path = write(tmp_path, '{"domains": [}', "h.json")
    with pytest.raises(InvalidBootstrap, match="not valid JSON") as exc:
        load_bootstrap(path)
    assert "line 1" in exc.value.problems[0]


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    assert problems_of(write(tmp_path, text)) == [f"<root>: got {kind}"]


def test_unknown_fields(tmp_path):
    problems = problems_of(write(tmp_path, """
        colour: red
        global: {resources: {cpu: 10, memory: 10Gi}, flavour: x}
        domains:
          - name: a
            resources: {cpu: 1, disk: 1Gi}
            supervisors: [{name: s, resources: {cpu: 1, memory: 1Gi}, replicas: 3}]
    """))
    assert sorted(problems) == sorted([
        "colour: Extra inputs are not permitted",
        "global.flavour: Extra inputs are not permitted",
        "domains[0].resources.disk: Extra inputs are not permitted",
        "domains[0].supervisors[0].replicas: Extra inputs are not permitted",
    ])


def test_missing_names(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - resources: {cpu: 1, memory: 1Gi}
          - name: b
            supervisors: [{agents: 1}]
    """))
    assert sorted(problems) == ["domains[0].name: Field required", "domains[1].supervisors[0].name: Field required"]


def test_bad_quantities_are_reported_at_their_own_path(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - name: a
            supervisors:
              - {name: s0, resources: {cpu: 1, memory: 1Gi}}
              - {name: s1, resources: {cpu: -2, memory: lots}}
          - name: b
            resources: {cpu: 2 cores, memory: 1Gi, gpu: -1}
    """))
    assert len(problems) == 4
    assert only(problems, "domains[0].supervisors[1].resources.cpu")[0].endswith("cpu must not be negative (got -2)")
    assert "'lots'" in only(problems, "domains[0].supervisors[1].resources.memory")[0]
    assert "'2 cores'" in only(problems, "domains[1].resources.cpu")[0]
    assert only(problems, "domains[1].resources.gpu")


def test_infinite_quantity_is_a_problem_not_a_crash(tmp_path):
    problems = problems_of(write(tmp_path, "global: {resources: {cpu: .inf, memory: .nan}}\n"))
    assert len(problems) == 2
    assert only(problems, "global.resources.cpu")
    assert only(problems, "global.resources.memory")


def test_other_schema_errors(tmp_path):
    problems = problems_of(write(tmp_path, """
        version: 2
        global: {policy: {max_children: -1}}
        domains:
          - {name: a, supervisors: [{name: s, agents: -3}]}
          - {name: b, supervisors: nope}
    """))
    assert [p.split(": ", 1)[0] for p in problems] == [
        "version", "global.policy.max_children", "domains[0].supervisors[0].agents", "domains[1].supervisors"]


def test_supervisor_larger_than_its_domain(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - name: a
            resources: {cpu: 10, memory: 10Gi}
            supervisors: [{name: s, resources: {cpu: 4, memory: 20Gi}}]
    """))
    assert only(problems, "domains[0].supervisors[0].resources") == [
        "domains[0].supervisors[0].resources: supervisor larger than its domain: memory needs 20Gi, has 10Gi"]


def test_supervisors_together_larger_than_the_domain(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - name: a
            resources: {cpu: 10, memory: 10Gi}
            supervisors:
              - {name: s1, resources: {cpu: 6, memory: 1Gi}}
              - {name: s2, resources: {cpu: 6, memory: 1Gi}}
    """))
    assert problems == ["domains[0].supervisors: supervisors together exceed the domain: cpu needs 12, has 10"]


def test_domains_together_larger_than_global(tmp_path):
    problems = problems_of(write(tmp_path, """
        global: {resources: {cpu: 100, memory: 100Gi}}
        domains:
          - {name: a, resources: {cpu: 60, memory: 10Gi}}
          - {name: b, resources: {cpu: 60, memory: 10Gi}}
    """))
    assert problems == ["domains: domains together exceed the global pool: cpu needs 120, has 100"]


def test_domain_larger_than_global(tmp_path):
    problems = problems_of(write(tmp_path, """
        global: {resources: {cpu: 100, memory: 100Gi, gpu: 0}}
        domains: [{name: a, resources: {cpu: 10, memory: 10Gi, gpu: 1}}]
    """))
    assert only(problems, "domains[0].resources") == [
        "domains[0].resources: domain larger than the global pool: gpu needs 1, has 0"]


def test_too_many_agents_for_a_supervisor(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - name: a
            supervisors:
              - {name: s1, resources: {cpu: 10, memory: 10Gi}, agents: 10}
              - {name: s2, resources: {cpu: 10, memory: 10Gi}, agents: 11}
              - {name: s3, resources: {cpu: 10, memory: 10Gi}, agents: 2, agent_resources: {cpu: 6, memory: 1Gi}}
              - {name: s4, agents: 3, policy: {max_children: 2}}
    """))
    assert only(problems, "domains[0].supervisors[0].agents") == []
    s2 = only(problems, "domains[0].supervisors[1].agents")
    assert len(s2) == 2
    assert any("cpu needs 11, has 10" in p for p in s2)
    assert any("memory needs 11Gi, has 10Gi" in p for p in s2)
    assert len(only(problems, "domains[0].supervisors[2].agents")) == 1
    assert only(problems, "domains[0].supervisors[3].agents") == [
        "domains[0].supervisors[3].agents: 3 agents exceed policy max_children 2"]
    assert len(problems) == 4


def test_too_many_children_for_policy(tmp_path):
    problems = problems_of(write(tmp_path, """
        global: {policy: {max_children: 1}}
        domains:
          - {name: a, policy: {max_children: 1}, supervisors: [{name: s1}, {name: s2}]}
          - {name: b}
    """))
    assert sorted(p.split(": ", 1)[0] for p in problems) == ["domains", "domains[0].supervisors"]


def test_duplicate_names(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - {name: a, supervisors: [{name: s}, {name: t}, {name: s}]}
          - {name: b}
          - {name: a}
    """))
    assert sorted(problems) == sorted([
        "domains[0].supervisors[2].name: supervisor 's' appears twice in domain 'a'",
        "domains[2].name: domain 'a' appears twice",
    ])


def test_same_supervisor_name_in_two_domains_is_fine(tmp_path):
    spec = load_bootstrap(write(tmp_path, """
        domains:
          - {name: a, supervisors: [{name: s}]}
          - {name: b, supervisors: [{name: s}]}
    """))
    assert [s.name for d in spec.domains for s in d.supervisors] == ["s", "s"]


def test_invalid_names(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - {name: Research, supervisors: [{name: sup_1}, {name: ok-1}, {name: "-x"}]}
          - {name: "", supervisors: []}
    """))
    assert sorted(problems) == sorted([
        "domains[0].name: 'Research' is not a lowercase DNS label",
        "domains[0].supervisors[0].name: 'sup_1' is not a lowercase DNS label",
        "domains[0].supervisors[2].name: '-x' is not a lowercase DNS label",
        "domains[1].name: '' is not a lowercase DNS label",
    ])


def test_three_schema_problems_are_all_reported(tmp_path):
    path = write(tmp_path, """
        domains:
          - name: a
            supervisors: [{name: s, resources: {cpu: -1, memory: 1Gi}}]
          - name: b
            resources: {cpu: 1, memory: plenty}
          - name: c
            size: large
    """)
    with pytest.raises(InvalidBootstrap) as exc:
        load_bootstrap(path)
    assert str(path) in exc.value.message
    assert "3 problem(s)" in exc.value.message
    assert [p.split(": ", 1)[0] for p in exc.value.problems] == [
        "domains[0].supervisors[0].resources.cpu", "domains[1].resources.memory", "domains[2].size"]


def test_three_semantic_problems_are_all_reported(tmp_path):
    problems = problems_of(write(tmp_path, """
        global: {resources: {cpu: 100, memory: 100Gi}}
        domains:
          - name: a
            resources: {cpu: 50, memory: 50Gi}
            supervisors:
              - {name: s, resources: {cpu: 1, memory: 1Gi}, agents: 2, agent_resources: {cpu: 1, memory: 512Mi}}
          - {name: a, resources: {cpu: 10, memory: 10Gi}}
          - {name: c_c, resources: {cpu: 10, memory: 10Gi}}
    """))
    assert [p.split(": ", 1)[0] for p in problems] == [
        "domains[0].supervisors[0].agents", "domains[1].name", "domains[2].name"]


def test_schema_and_semantic_problems_are_reported_together(tmp_path):
    problems = problems_of(write(tmp_path, """
        domains:
          - {name: a, resources: {cpu: -1}}
          - {name: a}
          - {name: Bad}
    """))
    assert [p.split(": ", 1)[0] for p in problems] == ["domains[0].resources.cpu", "domains[1].name",
                                                        "domains[2].name"]


# -- planning ---------------------------------------------------------------------------------------


def current_of(spec: HierarchySpec) -> CurrentHierarchy:
    """What exists after ``spec`` was applied, as the entities would describe themselves."""
    orch = LevelState(level=Level.ORCHESTRATOR, name="orchestrator", capacity=spec.global_.resources,
                      policy=spec.global_.policy, created_at=T0, updated_at=T0)
    managers = {}
    for d in spec.domains:
        orch.register_child(RegisterChild(request_id="boot", name=d.name, resources=d.resources, policy=d.policy), T0)
        m = LevelState(level=Level.MANAGER, name=d.name, domain=d.name, capacity=d.resources, policy=d.policy,
                       created_at=T0, updated_at=T0)
        for s in d.supervisors:
            m.register_child(RegisterChild(request_id="boot", name=s.name, resources=s.resources, policy=s.policy),
                             T0)
        managers[d.name] = m.view(T0)
    return CurrentHierarchy(orchestrator=orch.view(T0), managers=managers)


@pytest.fixture
def default_spec() -> HierarchySpec:
    return load_bootstrap(DEFAULT_BOOTSTRAP)


def test_plan_from_nothing_creates_everything(default_spec):
    plan = plan_bootstrap(default_spec, CurrentHierarchy())
    assert plan.create_orchestrator is True
    assert plan.domains_to_create == ["research", "support"]
    assert plan.supervisors_to_create == ["research/sup-1", "research/sup-2", "support/sup-1"]
    assert plan.conflicts == []
    assert plan.unchanged == []


def test_plan_against_identical_hierarchy_changes_nothing(default_spec):
    plan = plan_bootstrap(default_spec, current_of(default_spec))
    assert plan.create_orchestrator is False
    assert plan.domains_to_create == []
    assert plan.supervisors_to_create == []
    assert plan.conflicts == []
    assert plan.unchanged == ["orchestrator", "domain research", "supervisor research/sup-1",
                              "supervisor research/sup-2", "domain support", "supervisor support/sup-1"]


def test_plan_lists_only_what_is_missing(default_spec):
    partial = default_spec.model_copy(update={"domains": [default_spec.domains[0].model_copy(
        update={"supervisors": default_spec.domains[0].supervisors[:1]})]})
    plan = plan_bootstrap(default_spec, current_of(partial))
    assert plan.create_orchestrator is False
    assert plan.domains_to_create == ["support"]
    assert plan.supervisors_to_create == ["research/sup-2", "support/sup-1"]
    assert plan.conflicts == []


def test_plan_for_a_domain_whose_manager_view_is_missing(default_spec):
    current = current_of(default_spec)
    del current.managers["support"]
    plan = plan_bootstrap(default_spec, current)
    assert plan.domains_to_create == []
    assert plan.supervisors_to_create == ["support/sup-1"]


def test_plan_lists_every_conflict_with_its_path(default_spec):
    existing = parse_bootstrap({
        "global": {"resources": {"cpu": 500, "memory": "1Ti"}, "policy": {"max_children": 20}},
        "domains": [
            {"name": "research", "resources": {"cpu": 100, "memory": "100Gi"},
             "supervisors": [{"name": "sup-1", "resources": {"cpu": 10, "memory": "10Gi"}},
                             {"name": "sup-2", "resources": {"cpu": 20, "memory": "10Gi"}}]},
            {"name": "support", "resources": {"cpu": 100, "memory": "50Gi"},
             "supervisors": [{"name": "sup-1", "resources": {"cpu": 10, "memory": "10Gi"}}]},
        ],
    })
    plan = plan_bootstrap(default_spec, current_of(existing))
    assert [c.split(": ", 1)[0] for c in plan.conflicts] == [
        "global.resources", "global.policy", "domains[0].supervisors[1].resources", "domains[1].resources"]
    assert "has 500 CPU / 1Ti / 0 GPU, the file asks 1000 CPU / 1Ti / 0 GPU" in plan.conflicts[0]
    assert "supervisor research/sup-2 has 20 CPU" in plan.conflicts[2]
    assert "domain 'support' has 100 CPU / 50Gi" in plan.conflicts[3]
    assert plan.create_orchestrator is False
    assert plan.domains_to_create == []
    assert plan.supervisors_to_create == []


def test_plan_policy_only_difference_is_a_conflict(default_spec):
    other = default_spec.model_copy(update={"global_": default_spec.global_.model_copy(
        update={"policy": Policy(max_children=10, version=2)})})
    plan = plan_bootstrap(default_spec, current_of(other))
    assert [c.split(": ", 1)[0] for c in plan.conflicts] == ["global.policy"]


def test_plan_reports_domain_and_supervisor_policy_conflicts():
    spec = parse_bootstrap({"domains": [{"name": "a", "supervisors": [{"name": "s"}]}]})
    current = current_of(spec)
    changed = parse_bootstrap({"domains": [{"name": "a", "policy": {"max_children": 3},
                                            "supervisors": [{"name": "s", "policy": {"max_children": 2}}]}]})
    plan = plan_bootstrap(changed, current)
    assert [c.split(": ", 1)[0] for c in plan.conflicts] == ["domains[0].policy", "domains[0].supervisors[0].policy"]
    assert plan_bootstrap(spec, current).conflicts == []
