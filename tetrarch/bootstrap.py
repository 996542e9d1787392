"""Bootstrap files: the initial hierarchy as YAML or JSON, validated whole before anything is applied.

:func:`load_bootstrap` parses and validates a file and raises :class:`InvalidBootstrap` listing
every problem with its path in the file (``domains[0].supervisors[1].resources.cpu``).
:func:`plan_bootstrap` compares a valid file with what exists and lists conflicts and the steps
still to do, so applying the same file twice changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tetrarch.errors import InvalidBootstrap
from tetrarch.models import LevelView
from tetrarch.names import is_valid_name
from tetrarch.policy import DEFAULT_AGENT_RESOURCES, Policy
from tetrarch.resources import Resources, total

DEFAULT_BOOTSTRAP = Path(__file__).with_name("default_hierarchy.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisorEntry(_Strict):
    """A supervisor of a domain, with the demo agents it starts with."""

    name: str
    resources: Resources = Field(default_factory=lambda: Resources.of(cpu=10, memory="10Gi"))
    policy: Policy = Field(default_factory=Policy)
    agents: int = Field(default=0, ge=0, description="Demo agents to spawn, named <supervisor>-agent-<n>.")
    agent_resources: Resources = Field(default_factory=lambda: DEFAULT_AGENT_RESOURCES)
    agent_image: str | None = Field(default=None, description="The signed image the demo agents run.")


class DomainEntry(_Strict):
    """A domain (tenant) and its supervisors."""

    name: str
    resources: Resources = Field(default_factory=lambda: Resources.of(cpu=100, memory="100Gi"))
    policy: Policy = Field(default_factory=Policy)
    supervisors: list[SupervisorEntry] = Field(default_factory=list)


class GlobalEntry(_Strict):
    """The orchestrator's global pool and policy."""

    resources: Resources = Field(default_factory=lambda: Resources.of(cpu=1000, memory="1Ti"))
    policy: Policy = Field(default_factory=Policy)


class HierarchySpec(_Strict):
    """A whole hierarchy: the global level and every domain below it."""

    version: int = Field(default=1, ge=1, le=1)
    global_: GlobalEntry = Field(default_factory=GlobalEntry, alias="global")
    domains: list[DomainEntry] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("global" if part == "global_" else str(part))
    return out or "<root>"


#: A domain entry as checked: its index in the file, the entry, and its supervisors with their indices.
_Indexed = tuple[int, "DomainEntry", list[tuple[int, "SupervisorEntry"]]]


def spec_problems(spec: HierarchySpec) -> list[str]:
    """Problems pydantic cannot see: names, duplicates, children larger than their parents."""
    return _semantic_problems(spec.global_, [(i, d, list(enumerate(d.supervisors)))
                                             for i, d in enumerate(spec.domains)])


def _semantic_problems(g: GlobalEntry, domains: list[_Indexed],
                       all_names: list[tuple[int, str]] | None = None) -> list[str]:
    """Semantic checks over the entries that are well-formed, reported at their paths in the file.

    ``all_names`` (index, name) of every domain entry, well-formed or not, for the duplicate check.
    """
    problems: list[str] = []
    names = all_names if all_names is not None else [(i, d.name) for i, d, _ in domains]
    seen_domains: set[str] = set()
    duplicates: dict[int, str] = {}
    for i, name in names:
        if name in seen_domains:
            duplicates[i] = name
        seen_domains.add(name)

    def fits(child: Resources, parent: Resources, where: str, what: str) -> None:
        for k, v in child.shortfall(parent).items():
            problems.append(f"{where}: {what} {k} {v}")

    for i, d, supervisors in domains:
        dp = f"domains[{i}]"
        if not is_valid_name(d.name):
            problems.append(f"{dp}.name: {d.name!r} is not a lowercase DNS label")
        if duplicates.pop(i, None) is not None:
            problems.append(f"{dp}.name: domain {d.name!r} appears twice")
        fits(d.resources, g.resources, f"{dp}.resources", "domain larger than the global pool:")
        seen_sups: set[str] = set()
        for j, s in supervisors:
            sp = f"{dp}.supervisors[{j}]"
            if not is_valid_name(s.name):
                problems.append(f"{sp}.name: {s.name!r} is not a lowercase DNS label")
            if s.name in seen_sups:
                problems.append(f"{sp}.name: supervisor {s.name!r} appears twice in domain {d.name!r}")
            seen_sups.add(s.name)
            fits(s.resources, d.resources, f"{sp}.resources", "supervisor larger than its domain:")
            agents_total = total([s.agent_resources] * s.agents)
            fits(agents_total, s.resources, f"{sp}.agents",
                 f"{s.agents} agents of {s.agent_resources.human()} exceed the supervisor:")
            if s.policy.max_children is not None and s.agents > s.policy.max_children:
                problems.append(f"{sp}.agents: {s.agents} agents exceed policy max_children "
                                f"{s.policy.max_children}")
        fits(total([s.resources for _, s in supervisors]), d.resources, f"{dp}.supervisors",
             "supervisors together exceed the domain:")
        if d.policy.max_children is not None and len(supervisors) > d.policy.max_children:
            problems.append(f"{dp}.supervisors: {len(supervisors)} exceed policy max_children "
                            f"{d.policy.max_children}")
    problems += [f"domains[{i}].name: domain {name!r} appears twice" for i, name in duplicates.items()]
    fits(total([d.resources for _, d, _ in domains]), g.resources, "domains",
         "domains together exceed the global pool:")
    if g.policy.max_children is not None and len(domains) > g.policy.max_children:
        problems.append(f"domains: {len(domains)} exceed global policy max_children "
                        f"{g.policy.max_children}")
    return problems


def _check_pieces(data: dict[str, Any]) -> list[str]:
    """Validate each section on its own so that shape errors and semantic problems are all reported.

    Every well-formed domain and supervisor still takes part in the semantic checks, so a file
    with a negative CPU in one domain and a duplicate name in another lists both at once.
    """
    problems: list[str] = []

    def check(model: type[_M], value: Any, prefix: str) -> _M | None:
        try:
            return model.model_validate(value)
        except ValidationError as e:
            for err in e.errors():
                loc = _path(err["loc"])
                where = prefix if loc == "<root>" else (f"{prefix}.{loc}" if prefix else loc)
                problems.append(f"{where or '<root>'}: {err['msg']}")
            return None

    head = check(HierarchySpec, {k: v for k, v in data.items() if k != "domains"}, "")
    raw_domains = data.get("domains") or []
    if not isinstance(raw_domains, list):
        problems.append(f"domains: must be a list, not {type(raw_domains).__name__}")
        raw_domains = []
    domains: list[_Indexed] = []
    names = [(i, raw["name"]) for i, raw in enumerate(raw_domains)
             if isinstance(raw, dict) and isinstance(raw.get("name"), str)]
    for i, raw in enumerate(raw_domains):
        dp = f"domains[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{dp}: must be a mapping, not {type(raw).__name__}")
            continue
        raw_sups = raw.get("supervisors") or []
        d = check(DomainEntry, {k: v for k, v in raw.items() if k != "supervisors"}, dp)
        if not isinstance(raw_sups, list):
            problems.append(f"{dp}.supervisors: must be a list, not {type(raw_sups).__name__}")
            raw_sups = []
        sups = [(j, s) for j, raw_s in enumerate(raw_sups)
                if (s := check(SupervisorEntry, raw_s, f"{dp}.supervisors[{j}]")) is not None]
        if d is not None:
            domains.append((i, d, sups))
    if head is not None:
        problems += _semantic_problems(head.global_, domains, names)
    return problems


_M = TypeVar("_M", bound=BaseModel)


def parse_bootstrap(data: Any, source: str = "<input>") -> HierarchySpec:
    """Validate already-parsed data; raise InvalidBootstrap listing every problem with its path."""
    try:
        spec = HierarchySpec.model_validate(data)
        problems = spec_problems(spec)
    except ValidationError:
        problems = _check_pieces(data) if isinstance(data, dict) else [f"<root>: must be a mapping, not "
                                                                        f"{type(data).__name__}"]
    if problems:
        raise InvalidBootstrap(f"{source} is not a valid hierarchy ({len(problems)} problem(s))",
                               level="client", problems=problems)
    return spec


def load_bootstrap(path: str | Path) -> HierarchySpec:
    """Read a YAML or JSON bootstrap file and validate it whole."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidBootstrap(f"cannot read {p}: {e.strerror}", level="client") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise InvalidBootstrap(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}",
                               level="client", problems=[str(e)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidBootstrap(f"{p} must hold a mapping at the top level", level="client",
                               problems=[f"<root>: got {type(data).__name__}"])
    return parse_bootstrap(data, str(p))


class CurrentHierarchy(BaseModel):
    """What exists now: the orchestrator's view and each existing domain's manager view."""

    orchestrator: LevelView | None = None
    managers: dict[str, LevelView] = Field(default_factory=dict)


class HierarchyPlan(BaseModel):
    """The difference between a file and what exists."""

    conflicts: list[str] = Field(default_factory=list)
    create_orchestrator: bool = False
    domains_to_create: list[str] = Field(default_factory=list)
    supervisors_to_create: list[str] = Field(default_factory=list, description="As <domain>/<name>.")
    unchanged: list[str] = Field(default_factory=list)


def plan_bootstrap(spec: HierarchySpec, current: CurrentHierarchy) -> HierarchyPlan:
    """List what applying ``spec`` would create, and every conflict with what exists."""
    plan = HierarchyPlan()
    orch = current.orchestrator
    if orch is None:
        plan.create_orchestrator = True
    else:
        if orch.pool.capacity != spec.global_.resources:
            plan.conflicts.append(f"global.resources: the orchestrator has {orch.pool.capacity.human()}, "
                                  f"the file asks {spec.global_.resources.human()}")
        if orch.policy != spec.global_.policy:
            plan.conflicts.append("global.policy: differs from the orchestrator's policy in force")
        plan.unchanged.append("orchestrator")
    existing_domains = {c.name: c for c in orch.children} if orch else {}
    for i, d in enumerate(spec.domains):
        child = existing_domains.get(d.name)
        if child is None:
            plan.domains_to_create.append(d.name)
            plan.supervisors_to_create += [f"{d.name}/{s.name}" for s in d.supervisors]
            continue
        if child.resources != d.resources:
            plan.conflicts.append(f"domains[{i}].resources: domain {d.name!r} has {child.resources.human()}, "
                                  f"the file asks {d.resources.human()}")
        if child.policy != d.policy:
            plan.conflicts.append(f"domains[{i}].policy: differs from domain {d.name!r}'s policy in force")
        plan.unchanged.append(f"domain {d.name}")
        manager = current.managers.get(d.name)
        sups = {c.name: c for c in manager.children} if manager else {}
        for j, s in enumerate(d.supervisors):
            existing = sups.get(s.name)
            if existing is None:
                plan.supervisors_to_create.append(f"{d.name}/{s.name}")
            elif existing.resources != s.resources:
                plan.conflicts.append(
                    f"domains[{i}].supervisors[{j}].resources: supervisor {d.name}/{s.name} has "
                    f"{existing.resources.human()}, the file asks {s.resources.human()}")
            elif existing.policy != s.policy:
                plan.conflicts.append(f"domains[{i}].supervisors[{j}].policy: differs from supervisor "
                                      f"{d.name}/{s.name}'s policy in force")
            else:
                plan.unchanged.append(f"supervisor {d.name}/{s.name}")
    return plan
