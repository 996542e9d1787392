"""Policy decisions: each rule, precedence Global > Domain > Supervisor, the effective policy, conflicts of a
child policy, the decision cache, and cross-domain messages."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetrarch.decisions import (
    UNBOUNDED,
    CacheStats,
    ChainLink,
    Decision,
    DecisionCache,
    EffectivePolicy,
    ImageRef,
    PolicyChain,
    PolicyCheck,
    Verdict,
    conflicts,
    count_denial,
    effective,
    evaluate,
    evaluate_message,
    judge_static,
)
from tetrarch.policy import (
    ADDS_AGENTS,
    LOADS_IMAGE,
    TAKES_RESOURCES,
    AgentLimits,
    EvolutionPolicy,
    ImagePolicy,
    MessagingPolicy,
    OperationType,
    Policy,
    ResourceCap,
    ShareLimits,
    template,
)
from tetrarch.resources import Resources

Op = OperationType
LEVELS = ("orchestrator", "manager", "supervisor")
ENTITIES = ("orchestrator", "research", "research/s1")
PROPS = settings(max_examples=80, deadline=None)


def chain_of(*policies: Policy, capacities: list[Resources] | None = None,
             agents: list[int] | None = None) -> list[ChainLink]:
    """A chain, top first, of up to three levels with the given policies."""
    caps = capacities or [Resources()] * len(policies)
    counts = agents or [0] * len(policies)
    return [ChainLink(level=LEVELS[i], entity=ENTITIES[i], policy=p, capacity=caps[i], agents=counts[i])
            for i, p in enumerate(policies)]


def with_rule_at(index: int, rule: Policy, capacity: Resources | None = None, agents: int = 0) -> list[ChainLink]:
    """A three-level chain of empty policies with ``rule`` at level ``index``."""
    policies = [Policy(version=3)] * 3
    policies[index] = rule
    caps = [Resources()] * 3
    if capacity is not None:
        caps[index] = capacity
    counts = [0] * 3
    counts[index] = agents
    return chain_of(*policies, capacities=caps, agents=counts)


def spawn(cpu: float | str = 0, memory: float | str = 0, gpu: int = 0, count: int = 1) -> PolicyCheck:
    op = Op.BATCH_SPAWN if count > 1 else Op.SPAWN
    return PolicyCheck(operation=op, resources=Resources.of(cpu=cpu, memory=memory, gpu=gpu), count=count)


def share(cpu: float | None = None, memory: float | None = None, gpu: float | None = None) -> AgentLimits:
    return AgentLimits(max_share=ShareLimits(cpu_pct=cpu, memory_pct=memory, gpu_pct=gpu))


# -- the seed's example: global 50%, domain 10%, supervisor 5% of their own CPU --------------------------------


def seed_chain(supervisor_pct: float = 5.0) -> list[ChainLink]:
    """Global 1000 CPU (50% per agent), domain 100 CPU (10%), supervisor 10 CPU (``supervisor_pct``)."""
    sup = template("standard", "supervisor")
    sup = sup.model_copy(update={"agent": share(cpu=supervisor_pct)})
    return chain_of(template("standard", "orchestrator"), template("standard", "manager"), sup,
                    capacities=[Resources.of(cpu=1000, memory="1Ti"), Resources.of(cpu=100, memory="100Gi"),
                                Resources.of(cpu=10, memory="10Gi")])


def test_seed_chain_caps_one_agent_at_half_a_cpu():
    chain = seed_chain()
    assert effective(chain).max_agent_resources == Resources(cpu_millis=500, memory_mib=UNBOUNDED, gpu=UNBOUNDED)
    ok = evaluate(spawn(cpu=0.5, memory="64Gi"), chain)  # no memory rule anywhere
    assert ok.allowed and ok.rule == "" and [v.allowed for v in ok.verdicts] == [True, True, True]
    no = evaluate(spawn(cpu=0.6), chain)
    assert not no.allowed
    assert (no.level, no.entity, no.rule) == ("supervisor", "research/s1", "agent.max_share")
    assert no.reason.startswith("supervisor policy v1 caps one agent at 500m CPU (agent.max_share)")
    assert "cpu needs 600m, has 500m" in no.reason
    assert [v.allowed for v in no.verdicts] == [True, True, False]
    # The agent's own "up to 1 CPU" is more than the supervisor lets one agent have.
    assert evaluate(spawn(cpu=1), chain).level == "supervisor"


def test_seed_chain_every_level_can_decide():
    chain = seed_chain(supervisor_pct=20.0)  # supervisor cap 2 CPU, domain 10 CPU, global 500 CPU
    assert evaluate(spawn(cpu=1.5), chain).allowed
    assert evaluate(spawn(cpu=2), chain).allowed  # the cap itself is allowed
    assert evaluate(spawn(cpu="2001m"), chain).level == "supervisor"
    d5 = evaluate(spawn(cpu=5), chain)
    assert (d5.allowed, d5.level, d5.rule) == (False, "supervisor", "agent.max_share")
    d11 = evaluate(spawn(cpu=11), chain)  # over the domain's 10 CPU and the supervisor's 2: the domain decides
    assert (d11.allowed, d11.level, d11.entity) == (False, "manager", "research")
    assert "10 CPU" in d11.reason
    assert [v.allowed for v in d11.verdicts] == [True, False, False]
    d600 = evaluate(spawn(cpu=600), chain)  # over everyone's cap: the global policy decides
    assert (d600.level, d600.rule) == ("orchestrator", "agent.max_share")
    assert "500 CPU" in d600.reason
    assert [v.allowed for v in d600.verdicts] == [False, False, False]
    assert [v.level for v in d600.verdicts] == list(LEVELS)
    # A supervisor letting one agent have its whole pool is still held to the domain's 10 CPU.
    whole = seed_chain(supervisor_pct=100.0)
    assert evaluate(spawn(cpu=10), whole).allowed
    assert evaluate(spawn(cpu=10.5), whole).level == "manager"


# -- each rule ------------------------------------------------------------------------------------------------

RULE_CASES: list[tuple[str, Policy, Resources | None, int, PolicyCheck, PolicyCheck, str]] = [
    # (rule, policy, capacity, agents, a denied check, the nearest allowed check, words of the reason)
    ("denied_operations", Policy(version=3, denied_operations=frozenset({Op.KILL})), None, 0,
     PolicyCheck(operation=Op.KILL), PolicyCheck(operation=Op.CHECKPOINT), "denies kill"),
    ("allowed_operations", Policy(version=3, allowed_operations=frozenset({Op.SPAWN, Op.CLONE})), None, 0,
     PolicyCheck(operation=Op.KILL), PolicyCheck(operation=Op.CLONE), "does not allow kill (allowed: clone, spawn)"),
    ("agent.max_resources",
     Policy(version=3, agent=AgentLimits(max_resources=Resources.of(cpu=1, memory="1Gi", gpu=1))), None, 0,
     spawn(cpu=1, memory="2Gi"), spawn(cpu=1, memory="1Gi", gpu=1), "memory needs 2Gi, has 1Gi"),
    ("agent.max_share", Policy(version=3, agent=share(cpu=10, gpu=50)), Resources.of(cpu=10, gpu=4), 0,
     spawn(cpu=1, gpu=3), spawn(cpu=1, gpu=2), "gpu needs 3, has 2"),
    ("messaging.send_to", Policy(version=3, messaging=MessagingPolicy(send_to=frozenset({"b"}))), None, 0,
     PolicyCheck(operation=Op.MESSAGE, domain="a", target_domain="c"),
     PolicyCheck(operation=Op.MESSAGE, domain="a", target_domain="b"), "from 'a' to 'c'"),
    ("images.trusted_signers", Policy(version=3, images=ImagePolicy(trusted_signers=frozenset({"k1"}))), None, 0,
     PolicyCheck(operation=Op.UPGRADE, image=ImageRef(name="calc", version="1.0", signer="k2")),
     PolicyCheck(operation=Op.UPGRADE, image=ImageRef(name="calc", version="1.0", signer="k1")),
     "does not trust the signer of calc@1.0 (k2)"),
    ("images.allowed_images", Policy(version=3, images=ImagePolicy(allowed_images=frozenset({"calc@1.*"}))), None, 0,
     PolicyCheck(operation=Op.SPAWN, image=ImageRef(name="calc", version="2.0")),
     PolicyCheck(operation=Op.SPAWN, image=ImageRef(name="calc", version="1.7")), "does not allow image calc@2.0"),
    ("evolution.allowed", Policy(version=3, evolution=EvolutionPolicy(allowed=False)), None, 0,
     PolicyCheck(operation=Op.EVOLVE), PolicyCheck(operation=Op.UPGRADE), "does not allow evolution"),
    ("evolution.min_interval_seconds", Policy(version=3, evolution=EvolutionPolicy(min_interval_seconds=3600)),
     None, 0, PolicyCheck(operation=Op.EVOLVE, seconds_since_last_evolution=3599.4),
     PolicyCheck(operation=Op.EVOLVE, seconds_since_last_evolution=3600), "one evolution per 3600s"),
    ("max_agents", Policy(version=3, max_agents=5), None, 3, spawn(count=3), spawn(count=2),
     "admits at most 5 agents; 3 exist and 3 more were asked"),
]


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize(("rule", "policy", "capacity", "agents", "denied", "allowed", "words"), RULE_CASES,
                         ids=[c[0] for c in RULE_CASES])
def test_each_rule_denies_at_its_level_with_its_name_and_reason(rule, policy, capacity, agents, denied, allowed,
                                                                 words, index):
    chain = with_rule_at(index, policy, capacity, agents)
    d = evaluate(denied, chain)
    assert not d.allowed
    assert (d.level, d.entity, d.rule) == (LEVELS[index], ENTITIES[index], rule)
    assert d.reason.startswith(f"{LEVELS[index]} policy v3 ")
    assert words in d.reason
    assert [v.allowed for v in d.verdicts] == [i != index for i in range(3)]
    ok = evaluate(allowed, chain)
    assert ok.allowed and (ok.level, ok.rule, ok.reason) == ("", "", "")
    assert all(v.allowed for v in ok.verdicts)


def test_absolute_and_share_caps_name_the_rule_that_was_exceeded():
    # Absolute 4 CPU; share 10% of 10 CPU = 1 CPU. Over the share only -> max_share; over both -> max_resources.
    chain = with_rule_at(1, Policy(agent=AgentLimits(max_resources=Resources.of(cpu=4, memory="4Gi"),
                                                     max_share=ShareLimits(cpu_pct=10))),
                         capacity=Resources.of(cpu=10))
    assert evaluate(spawn(cpu=1, memory="4Gi"), chain).allowed
    assert evaluate(spawn(cpu=2), chain).rule == "agent.max_share"
    assert evaluate(spawn(cpu=5), chain).rule == "agent.max_resources"
    assert evaluate(spawn(cpu=1, memory="5Gi"), chain).rule == "agent.max_resources"


def test_shares_are_of_the_links_own_capacity():
    policy = Policy(agent=share(cpu=10, memory=25))
    small = with_rule_at(2, policy, capacity=Resources.of(cpu=10, memory="8Gi"))
    big = with_rule_at(2, policy, capacity=Resources.of(cpu=100, memory="8Gi"))
    assert not evaluate(spawn(cpu=2), small).allowed
    assert evaluate(spawn(cpu=2), big).allowed
    assert evaluate(spawn(cpu=1, memory="2Gi"), small).allowed
    d = evaluate(spawn(cpu=1, memory="3Gi"), big)
    assert (d.rule, d.level) == ("agent.max_share", "supervisor") and "memory needs 3Gi, has 2Gi" in d.reason
    # A share of an empty pool admits nothing of that resource.
    empty = with_rule_at(0, Policy(agent=share(gpu=50)), capacity=Resources.of(cpu=8))
    assert not evaluate(spawn(gpu=1), empty).allowed
    assert evaluate(spawn(cpu=8), empty).allowed


def test_an_empty_allowed_set_allows_nothing():
    d = evaluate(PolicyCheck(operation=Op.KILL), with_rule_at(0, Policy(allowed_operations=frozenset())))
    assert d.rule == "allowed_operations" and "(allowed: none)" in d.reason


def test_unsigned_image_is_not_trusted_and_patterns_are_case_sensitive():
    chain = with_rule_at(1, Policy(images=ImagePolicy(trusted_signers=frozenset({"k1"}),
                                                      allowed_images=frozenset({"calc@*"}))))
    d = evaluate(PolicyCheck(operation=Op.SPAWN, image=ImageRef(name="calc", version="1")), chain)
    assert d.rule == "images.trusted_signers" and "(unsigned)" in d.reason
    d = evaluate(PolicyCheck(operation=Op.SPAWN, image=ImageRef(name="Calc", version="1", signer="k1")), chain)
    assert d.rule == "images.allowed_images"
    assert evaluate(PolicyCheck(operation=Op.SPAWN, image=ImageRef(name="calc", version="9", signer="k1")),
                    chain).allowed
    # An empty pattern set allows no image at all.
    none = with_rule_at(0, Policy(images=ImagePolicy(allowed_images=frozenset())))
    assert not evaluate(PolicyCheck(operation=Op.RESTORE, image=ImageRef(name="a", version="1")), none).allowed


def test_messages_within_a_domain_ignore_send_to():
    chain = with_rule_at(1, Policy(messaging=MessagingPolicy(send_to=frozenset())))
    assert evaluate(PolicyCheck(operation=Op.MESSAGE, domain="a", target_domain="a"), chain).allowed
    assert not evaluate(PolicyCheck(operation=Op.MESSAGE, domain="a", target_domain="b"), chain).allowed


def test_max_agents_counts_batches_and_only_operations_that_add_agents():
    chain = with_rule_at(2, Policy(max_agents=5), agents=3)
    assert evaluate(spawn(count=2), chain).allowed
    assert evaluate(spawn(count=3), chain).rule == "max_agents"
    full = with_rule_at(2, Policy(max_agents=5), agents=5)
    for op in ADDS_AGENTS:
        assert evaluate(PolicyCheck(operation=op), full).rule == "max_agents"
    for op in set(Op) - ADDS_AGENTS:
        assert evaluate(PolicyCheck(operation=op), full).allowed, op
    over = with_rule_at(0, Policy(max_agents=0))
    assert evaluate(spawn(), over).level == "orchestrator"


def test_operations_that_take_no_resources_ignore_resource_rules():
    zero = Policy(agent=AgentLimits(max_resources=Resources(), max_share=ShareLimits(cpu_pct=1)))
    chain = with_rule_at(0, zero, capacity=Resources.of(cpu=1))
    huge = Resources.of(cpu=10_000, memory="1Ti", gpu=64)
    for op in Op:
        d = evaluate(PolicyCheck(operation=op, resources=huge), chain)
        assert d.allowed is (op not in TAKES_RESOURCES), op
        if not d.allowed:
            assert d.rule == "agent.max_resources"
    # Taking resources without naming any is not judged against the caps.
    assert evaluate(PolicyCheck(operation=Op.SPAWN), chain).allowed


def test_image_and_evolution_rules_apply_only_to_their_operations():
    strict = Policy(images=ImagePolicy(trusted_signers=frozenset(), allowed_images=frozenset()),
                    evolution=EvolutionPolicy(allowed=False, min_interval_seconds=10**6))
    chain = with_rule_at(1, strict)
    image = ImageRef(name="calc", version="1")
    for op in Op:
        d = evaluate(PolicyCheck(operation=op, image=image, seconds_since_last_evolution=0), chain)
        assert d.allowed is (op not in LOADS_IMAGE and op is not Op.EVOLVE), op
    # Never evolved yet: the interval has nothing to measure.
    interval = with_rule_at(1, Policy(evolution=EvolutionPolicy(min_interval_seconds=60)))
    assert evaluate(PolicyCheck(operation=Op.EVOLVE), interval).allowed
    assert evaluate(PolicyCheck(operation=Op.EVOLVE, seconds_since_last_evolution=59), interval).rule == \
        "evolution.min_interval_seconds"


def test_a_check_refuses_reads_and_bad_counts():
    with pytest.raises(ValueError):
        PolicyCheck(operation="status")
    with pytest.raises(ValueError):
        PolicyCheck(operation=Op.SPAWN, count=0)
    with pytest.raises(ValueError):
        PolicyCheck(operation=Op.SPAWN, extra=1)  # type: ignore[call-arg]


# -- precedence -----------------------------------------------------------------------------------------------


def test_when_several_levels_deny_the_top_one_decides_and_all_verdicts_are_kept():
    chain = chain_of(Policy(allowed_operations=frozenset({Op.KILL})),
                     Policy(denied_operations=frozenset({Op.SPAWN})),
                     Policy(max_agents=0))
    d = evaluate(spawn(), chain)
    assert (d.level, d.rule) == ("orchestrator", "allowed_operations")
    assert [(v.level, v.allowed, v.rule) for v in d.verdicts] == [
        ("orchestrator", False, "allowed_operations"), ("manager", False, "denied_operations"),
        ("supervisor", False, "max_agents")]
    # Without the global rule the domain decides; without both the supervisor's count does.
    assert evaluate(spawn(), chain_of(Policy(), *[link.policy for link in chain[1:]])).level == "manager"
    assert evaluate(spawn(), chain_of(Policy(), Policy(), chain[2].policy)).rule == "max_agents"


def test_a_count_denial_above_beats_a_static_denial_below():
    chain = chain_of(Policy(max_agents=2), Policy(), Policy(denied_operations=frozenset({Op.SPAWN})),
                     agents=[2, 0, 0])
    d = evaluate(spawn(), chain)
    assert (d.level, d.rule) == ("orchestrator", "max_agents")
    assert [v.rule for v in d.verdicts] == ["max_agents", "", "denied_operations"]
    # A level denied statically keeps that reason even when its count would deny too.
    both = chain_of(Policy(max_agents=0, denied_operations=frozenset({Op.SPAWN})))
    assert evaluate(spawn(), both).rule == "denied_operations"


def test_an_empty_chain_allows():
    d = evaluate(spawn(cpu=1000), [])
    assert d == Decision(allowed=True)


# -- hypothesis strategies ------------------------------------------------------------------------------------

DOMAINS = ("a", "b", "c")
SIGNERS = ("k1", "k2", "k3")
PATTERNS = ("calc@*", "calc@1.*", "calc@?.0", "sum@*", "sum@2.0", "*")
IMAGE_NAMES = ("calc", "sum")
IMAGE_VERSIONS = ("1.0", "1.5", "2.0")

pcts = st.none() | st.sampled_from([1.0, 5.0, 10.0, 20.0, 50.0, 100.0]) | st.floats(0.5, 100)
caps = st.builds(Resources, cpu_millis=st.integers(0, 4000), memory_mib=st.integers(0, 4000), gpu=st.integers(0, 3))
pools = st.builds(Resources, cpu_millis=st.integers(0, 40_000), memory_mib=st.integers(0, 40_000),
                  gpu=st.integers(0, 8))
op_sets = st.frozensets(st.sampled_from(list(Op)))


def name_sets(universe: tuple[str, ...]) -> st.SearchStrategy[frozenset[str] | None]:
    return st.none() | st.frozensets(st.sampled_from(universe))


policies = st.builds(
    Policy,
    version=st.integers(1, 50),
    max_agents=st.none() | st.integers(0, 12),
    agent=st.builds(AgentLimits, max_resources=st.none() | caps,
                    max_share=st.none() | st.builds(ShareLimits, cpu_pct=pcts, memory_pct=pcts, gpu_pct=pcts)),
    allowed_operations=st.none() | op_sets,
    denied_operations=st.frozensets(st.sampled_from(list(Op)), max_size=3),
    messaging=st.builds(MessagingPolicy, send_to=name_sets(DOMAINS), accept_from=name_sets(DOMAINS)),
    images=st.builds(ImagePolicy, trusted_signers=name_sets(SIGNERS), allowed_images=name_sets(PATTERNS)),
    evolution=st.builds(EvolutionPolicy, allowed=st.none() | st.booleans(),
                        min_interval_seconds=st.none() | st.integers(0, 5000)),
)


@st.composite
def chains(draw: st.DrawFn, min_size: int = 1) -> list[ChainLink]:
    size = draw(st.integers(min_size, 3))
    return [ChainLink(level=LEVELS[i], entity=ENTITIES[i], policy=draw(policies), capacity=draw(pools),
                      agents=draw(st.integers(0, 12))) for i in range(size)]


checks = st.builds(
    PolicyCheck,
    operation=st.sampled_from(list(Op)),
    domain=st.none() | st.sampled_from(DOMAINS),
    target_domain=st.none() | st.sampled_from(DOMAINS),
    resources=st.none() | caps,
    count=st.integers(1, 3),
    image=st.none() | st.builds(ImageRef, name=st.sampled_from(IMAGE_NAMES), version=st.sampled_from(IMAGE_VERSIONS),
                                signer=st.none() | st.sampled_from(SIGNERS)),
    seconds_since_last_evolution=st.none() | st.integers(0, 6000).map(float),
)


def own_cap(link: ChainLink) -> Resources | None:
    """The per-agent cap of one link, computed here independently of decisions._agent_cap."""
    p, pool = link.policy, link.capacity
    cap = [UNBOUNDED] * 3
    stated = False
    if p.agent.max_resources is not None:
        stated = True
        m = p.agent.max_resources
        cap = [UNBOUNDED if v is None else v for v in (m.cpu_millis, m.memory_mib, m.gpu)]
    if p.agent.max_share is not None:
        stated = True
        s = p.agent.max_share
        for i, (pct, amount) in enumerate(((s.cpu_pct, pool.cpu_millis), (s.memory_pct, pool.memory_mib),
                                           (s.gpu_pct, pool.gpu))):
            if pct is not None:
                cap[i] = min(cap[i], int(amount * pct / 100))
    return Resources(cpu_millis=cap[0], memory_mib=cap[1], gpu=cap[2]) if stated else None


def permitted(eff: EffectivePolicy) -> frozenset[Op]:
    return (eff.allowed_operations if eff.allowed_operations is not None else frozenset(Op)) - eff.denied_operations


def allowed_by_effective(check: PolicyCheck, eff: EffectivePolicy) -> bool:
    """A reference judge over the effective policy (static rules only), written independently of judge_static."""
    op = check.operation
    if op not in permitted(eff):
        return False
    if (op in TAKES_RESOURCES and check.resources is not None and eff.max_agent_resources is not None
            and not check.resources.fits_in(eff.max_agent_resources)):
        return False
    if (op is Op.MESSAGE and check.domain and check.target_domain and check.domain != check.target_domain
            and eff.send_to is not None and check.target_domain not in eff.send_to):
        return False
    if op in LOADS_IMAGE and check.image is not None:
        if eff.trusted_signers is not None and check.image.signer not in eff.trusted_signers:
            return False
        if not all(any(fnmatchcase(check.image.ref, p) for p in pats) for pats in eff.image_patterns):
            return False
    if op is Op.EVOLVE:
        if not eff.evolution_allowed:
            return False
        since = check.seconds_since_last_evolution
        if since is not None and since < eff.evolution_min_interval_seconds:
            return False
    return True


# -- properties of evaluate and effective ---------------------------------------------------------------------


@PROPS
@given(chains())
def test_effective_is_never_looser_than_any_link(chain):
    eff = effective(chain)
    for link in chain:
        p = link.policy
        if p.max_agents is not None:
            assert eff.max_agents is not None and eff.max_agents <= p.max_agents
        cap = own_cap(link)
        if cap is not None:
            assert eff.max_agent_resources is not None and eff.max_agent_resources.fits_in(cap)
        if p.allowed_operations is not None:
            assert eff.allowed_operations is not None and eff.allowed_operations <= p.allowed_operations
        assert p.denied_operations <= eff.denied_operations
        for mine, theirs in ((eff.send_to, p.messaging.send_to), (eff.accept_from, p.messaging.accept_from),
                             (eff.trusted_signers, p.images.trusted_signers)):
            if theirs is not None:
                assert mine is not None and mine <= theirs
        if p.images.allowed_images is not None:
            assert p.images.allowed_images in eff.image_patterns
        if p.evolution.allowed is False:
            assert eff.evolution_allowed is False
        assert eff.evolution_min_interval_seconds >= (p.evolution.min_interval_seconds or 0)
    # ... and no tighter than the tightest link: each value in force is some link's own.
    if eff.max_agents is not None:
        assert eff.max_agents in {link.policy.max_agents for link in chain}
    if not chain or all(own_cap(link) is None for link in chain):
        assert eff.max_agent_resources is None
    assert eff.denied_operations == frozenset().union(*(link.policy.denied_operations for link in chain))
    assert eff.evolution_allowed is all(link.policy.evolution.allowed is not False for link in chain)


@PROPS
@given(chains(), checks)
def test_evaluate_static_part_agrees_with_the_effective_policy(chain, check):
    static_ok = all(judge_static(check, link).allowed for link in chain)
    assert static_ok is allowed_by_effective(check, effective(chain))


@PROPS
@given(chains(), checks)
def test_the_decision_is_the_first_denying_level(chain, check):
    d = evaluate(check, chain)
    expected: list[Verdict] = []
    for link in chain:
        v = judge_static(check, link)
        if v.allowed:
            v = count_denial(check, link) or v
        expected.append(v)
    assert d.verdicts == expected
    assert [v.level for v in d.verdicts] == [link.level for link in chain]
    denials = [v for v in expected if not v.allowed]
    assert d.allowed is (not denials)
    if denials:
        first = denials[0]
        assert (d.level, d.entity, d.rule, d.reason) == (first.level, first.entity, first.rule, first.reason)
        assert d.rule and d.reason.startswith(f"{d.level} policy v")
    else:
        assert (d.level, d.entity, d.rule, d.reason) == ("", "", "", "")
    # Live counts: only operations that add agents, only past max_agents.
    for link, v in zip(chain, d.verdicts, strict=True):
        if v.rule == "max_agents":
            assert check.operation in ADDS_AGENTS
            limit = link.policy.max_agents
            assert limit is not None and link.agents + check.count > limit


# Loosening and tightening one policy: each function takes a link and hypothesis' data and returns the link changed.
Mutation = Callable[[ChainLink, st.DataObject], ChainLink]


def _policy(link: ChainLink, **update: Any) -> ChainLink:
    p = link.policy
    return link.model_copy(update={"policy": p.model_copy(update={**update, "version": p.version + 1})})


def _sub(data: st.DataObject, s: frozenset[Any]) -> frozenset[Any]:
    return frozenset(x for x in s if data.draw(st.booleans()))


def _more(a: Resources, b: Resources) -> Resources:
    return a + b


def _less(data: st.DataObject, a: Resources) -> Resources:
    return Resources(cpu_millis=data.draw(st.integers(0, a.cpu_millis)),
                     memory_mib=data.draw(st.integers(0, a.memory_mib)), gpu=data.draw(st.integers(0, a.gpu)))


def _looser_cap(a: ResourceCap, b: Resources) -> ResourceCap:
    """A looser cap: every capped component raised by ``b`` (uncapped ones stay uncapped)."""
    return ResourceCap(cpu_millis=None if a.cpu_millis is None else a.cpu_millis + b.cpu_millis,
                       memory_mib=None if a.memory_mib is None else a.memory_mib + b.memory_mib,
                       gpu=None if a.gpu is None else a.gpu + b.gpu)


def _tighter_cap(data: st.DataObject, a: ResourceCap) -> ResourceCap:
    """A tighter cap: every component at most what it was (an uncapped one may become capped)."""
    def tighter(v: int | None) -> int:
        return data.draw(st.integers(0, 10**6 if v is None else v))
    return ResourceCap(cpu_millis=tighter(a.cpu_millis), memory_mib=tighter(a.memory_mib), gpu=tighter(a.gpu))


def _raise_pct(data: st.DataObject, pct: float | None) -> float | None:
    return None if pct is None or data.draw(st.booleans()) else min(100.0, pct + data.draw(st.floats(0, 100)))


def _lower_pct(data: st.DataObject, pct: float | None) -> float | None:
    return data.draw(st.floats(0.5, pct if pct is not None else 100))


LOOSEN: dict[str, Mutation] = {
    "max_agents": lambda ln, d: _policy(ln, max_agents=None if ln.policy.max_agents is None or d.draw(st.booleans())
                                        else ln.policy.max_agents + d.draw(st.integers(0, 5))),
    "max_resources": lambda ln, d: _policy(ln, agent=ln.policy.agent.model_copy(update={"max_resources": (
        None if ln.policy.agent.max_resources is None or d.draw(st.booleans())
        else _looser_cap(ln.policy.agent.max_resources, d.draw(caps)))})),
    "max_share": lambda ln, d: _policy(ln, agent=ln.policy.agent.model_copy(update={"max_share": (
        None if ln.policy.agent.max_share is None or d.draw(st.booleans())
        else ShareLimits(cpu_pct=_raise_pct(d, ln.policy.agent.max_share.cpu_pct),
                         memory_pct=_raise_pct(d, ln.policy.agent.max_share.memory_pct),
                         gpu_pct=_raise_pct(d, ln.policy.agent.max_share.gpu_pct)))})),
    "capacity": lambda ln, d: ln.model_copy(update={"capacity": _more(ln.capacity, d.draw(pools))}),
    "agents": lambda ln, d: ln.model_copy(update={"agents": d.draw(st.integers(0, ln.agents))}),
    "allowed_operations": lambda ln, d: _policy(ln, allowed_operations=(
        None if ln.policy.allowed_operations is None or d.draw(st.booleans())
        else ln.policy.allowed_operations | d.draw(op_sets))),
    "denied_operations": lambda ln, d: _policy(ln, denied_operations=_sub(d, ln.policy.denied_operations)),
    "send_to": lambda ln, d: _policy(ln, messaging=ln.policy.messaging.model_copy(update={"send_to": (
        None if ln.policy.messaging.send_to is None or d.draw(st.booleans())
        else ln.policy.messaging.send_to | d.draw(st.frozensets(st.sampled_from(DOMAINS))))})),
    "trusted_signers": lambda ln, d: _policy(ln, images=ln.policy.images.model_copy(update={"trusted_signers": (
        None if ln.policy.images.trusted_signers is None or d.draw(st.booleans())
        else ln.policy.images.trusted_signers | d.draw(st.frozensets(st.sampled_from(SIGNERS))))})),
    "allowed_images": lambda ln, d: _policy(ln, images=ln.policy.images.model_copy(update={"allowed_images": (
        None if ln.policy.images.allowed_images is None or d.draw(st.booleans())
        else ln.policy.images.allowed_images | d.draw(st.frozensets(st.sampled_from(PATTERNS))))})),
    "evolution": lambda ln, d: _policy(ln, evolution=EvolutionPolicy(
        allowed=d.draw(st.sampled_from([None, True])) if ln.policy.evolution.allowed is False
        else ln.policy.evolution.allowed,
        min_interval_seconds=None if ln.policy.evolution.min_interval_seconds is None or d.draw(st.booleans())
        else d.draw(st.integers(0, ln.policy.evolution.min_interval_seconds)))),
}

TIGHTEN: dict[str, Mutation] = {
    "max_agents": lambda ln, d: _policy(ln, max_agents=d.draw(st.integers(
        0, ln.policy.max_agents if ln.policy.max_agents is not None else 12))),
    "max_resources": lambda ln, d: _policy(ln, agent=ln.policy.agent.model_copy(update={"max_resources": (
        ResourceCap.model_validate(d.draw(caps)) if ln.policy.agent.max_resources is None
        else _tighter_cap(d, ln.policy.agent.max_resources))})),
    "max_share": lambda ln, d: _policy(ln, agent=ln.policy.agent.model_copy(update={"max_share": ShareLimits(
        cpu_pct=_lower_pct(d, (ln.policy.agent.max_share or ShareLimits()).cpu_pct),
        memory_pct=_lower_pct(d, (ln.policy.agent.max_share or ShareLimits()).memory_pct),
        gpu_pct=_lower_pct(d, (ln.policy.agent.max_share or ShareLimits()).gpu_pct))})),
    "capacity": lambda ln, d: ln.model_copy(update={"capacity": _less(d, ln.capacity)}),
    "agents": lambda ln, d: ln.model_copy(update={"agents": ln.agents + d.draw(st.integers(0, 5))}),
    "allowed_operations": lambda ln, d: _policy(ln, allowed_operations=_sub(
        d, ln.policy.allowed_operations if ln.policy.allowed_operations is not None else frozenset(Op))),
    "denied_operations": lambda ln, d: _policy(ln, denied_operations=ln.policy.denied_operations | d.draw(op_sets)),
    "send_to": lambda ln, d: _policy(ln, messaging=ln.policy.messaging.model_copy(update={"send_to": _sub(
        d, ln.policy.messaging.send_to if ln.policy.messaging.send_to is not None else frozenset(DOMAINS))})),
    "trusted_signers": lambda ln, d: _policy(ln, images=ln.policy.images.model_copy(update={"trusted_signers": _sub(
        d, ln.policy.images.trusted_signers if ln.policy.images.trusted_signers is not None
        else frozenset(SIGNERS))})),
    "allowed_images": lambda ln, d: _policy(ln, images=ln.policy.images.model_copy(update={"allowed_images": _sub(
        d, ln.policy.images.allowed_images if ln.policy.images.allowed_images is not None
        else frozenset(PATTERNS))})),
    "evolution": lambda ln, d: _policy(ln, evolution=EvolutionPolicy(
        allowed=False if d.draw(st.booleans()) else ln.policy.evolution.allowed,
        min_interval_seconds=(ln.policy.evolution.min_interval_seconds or 0) + d.draw(st.integers(0, 5000)))),
}


@settings(max_examples=150, deadline=None)
@given(chains(), checks, st.sampled_from(sorted(LOOSEN)), st.data())
def test_loosening_one_policy_never_denies_what_was_allowed(chain, check, which, data):
    i = data.draw(st.integers(0, len(chain) - 1))
    changed = list(chain)
    changed[i] = LOOSEN[which](chain[i], data)
    before, after = evaluate(check, chain), evaluate(check, changed)
    if before.allowed:
        assert after.allowed, (which, after.reason)
    if not after.allowed:  # what the looser chain denies, the stricter denied too
        assert not before.allowed


@settings(max_examples=150, deadline=None)
@given(chains(), checks, st.sampled_from(sorted(TIGHTEN)), st.data())
def test_tightening_one_policy_never_allows_what_was_denied(chain, check, which, data):
    i = data.draw(st.integers(0, len(chain) - 1))
    changed = list(chain)
    changed[i] = TIGHTEN[which](chain[i], data)
    before, after = evaluate(check, chain), evaluate(check, changed)
    if not before.allowed:
        assert not after.allowed, which
    # The deciding level can only move up when a policy tightens.
    if not before.allowed and not after.allowed:
        assert LEVELS.index(after.level) <= LEVELS.index(before.level)


ANY_OPERATION: dict[str, Any] = {"allowed_operations": None, "denied_operations": frozenset()}


@PROPS
@given(chains(), st.integers(1, 4000), st.data())
def test_tightening_past_a_request_denies_it(chain, cpu, data):
    check = PolicyCheck(operation=Op.SPAWN, resources=Resources(cpu_millis=cpu))
    i = data.draw(st.integers(0, len(chain) - 1))
    link = chain[i]
    # max_share below the request: a share of 0.05% of a pool of 1000x the request is half the request.
    by_share = list(chain)
    by_share[i] = _policy(link.model_copy(update={"capacity": Resources(cpu_millis=1000 * cpu)}),
                          agent=AgentLimits(max_share=ShareLimits(cpu_pct=0.05)), **ANY_OPERATION)
    d = evaluate(check, by_share)
    assert not d.allowed and d.verdicts[i].rule == "agent.max_share"
    assert LEVELS.index(d.level) <= i
    # An absolute cap one millicore below the request.
    by_cap = list(chain)
    by_cap[i] = _policy(link, agent=AgentLimits(max_resources=Resources(cpu_millis=cpu - 1, memory_mib=UNBOUNDED,
                                                                         gpu=UNBOUNDED)), **ANY_OPERATION)
    d = evaluate(check, by_cap)
    assert not d.allowed and d.verdicts[i].rule == "agent.max_resources"
    # max_agents at the live count; the operation denied outright.
    full = list(chain)
    full[i] = _policy(link, max_agents=link.agents, denied_operations=frozenset())
    assert not evaluate(check, full).allowed
    assert not evaluate(check, full).verdicts[i].allowed
    denied = list(chain)
    denied[i] = _policy(link, denied_operations=frozenset({Op.SPAWN}))
    assert evaluate(check, denied).verdicts[i].rule == "denied_operations"


# -- conflicts ------------------------------------------------------------------------------------------------

PARENT = Policy(
    max_agents=10,
    agent=AgentLimits(max_resources=Resources.of(cpu=2, memory="2Gi", gpu=1)),
    allowed_operations=frozenset({Op.SPAWN, Op.KILL, Op.MESSAGE, Op.EVOLVE}),
    denied_operations=frozenset({Op.KILL}),
    messaging=MessagingPolicy(send_to=frozenset({"a", "b"}), accept_from=frozenset({"a"})),
    images=ImagePolicy(trusted_signers=frozenset({"k1"}), allowed_images=frozenset({"calc@*", "sum@1.*"})),
    evolution=EvolutionPolicy(allowed=True, min_interval_seconds=3600),
)
PARENT_EFF = effective(chain_of(PARENT, capacities=[Resources.of(cpu=100)]))

LOOSENINGS: list[tuple[Policy, str]] = [
    (Policy(max_agents=11), "max_agents: 11 is above the 10 allowed above it"),
    (Policy(agent=AgentLimits(max_resources=Resources.of(cpu=3, memory="1Gi"))),
     "agent: lets one agent have more cpu than allowed above it (needs 3, has 2)"),
    (Policy(agent=share(gpu=50)), "agent: lets one agent have more gpu than allowed above it (needs 2, has 1)"),
    (Policy(allowed_operations=frozenset({Op.SPAWN, Op.KILL})),
     "allowed_operations: allows kill, which is not allowed above it"),
    (Policy(allowed_operations=frozenset({Op.SPAWN, Op.MERGE})),
     "allowed_operations: allows merge, which is not allowed above it"),
    (Policy(messaging=MessagingPolicy(send_to=frozenset({"a", "c"}))),
     "messaging.send_to: allows 'c', which is not allowed above it"),
    (Policy(messaging=MessagingPolicy(accept_from=frozenset({"b"}))),
     "messaging.accept_from: allows 'b', which is not allowed above it"),
    (Policy(images=ImagePolicy(trusted_signers=frozenset({"k1", "k2"}))),
     "images.trusted_signers: allows 'k2', which is not allowed above it"),
    (Policy(images=ImagePolicy(allowed_images=frozenset({"calc@1.*", "sum@*"}))),
     "images.allowed_images: 'sum@*' is not within what is allowed above it"),
    (Policy(evolution=EvolutionPolicy(min_interval_seconds=60)),
     "evolution.min_interval_seconds: 60s is shorter than the 3600s required above it"),
]


@pytest.mark.parametrize(("child", "conflict"), LOOSENINGS, ids=[c[1].split(":")[0] for c in LOOSENINGS])
def test_each_loosening_is_a_conflict(child, conflict):
    assert conflicts(child, Resources.of(cpu=10, gpu=4), PARENT_EFF) == [conflict]


def test_evolution_allowed_below_a_parent_that_forbids_it_is_a_conflict():
    parent = effective(chain_of(Policy(evolution=EvolutionPolicy(allowed=False))))
    assert conflicts(Policy(evolution=EvolutionPolicy(allowed=True)), Resources(), parent) == [
        "evolution.allowed: allows evolution, which is not allowed above it"]
    assert conflicts(Policy(evolution=EvolutionPolicy(allowed=False)), Resources(), parent) == []
    assert conflicts(Policy(evolution=EvolutionPolicy(allowed=None)), Resources(), parent) == []


def test_every_conflict_is_listed_at_once():
    three = Policy(max_agents=50, messaging=MessagingPolicy(send_to=frozenset({"z"})),
                   evolution=EvolutionPolicy(min_interval_seconds=1))
    found = conflicts(three, Resources(), PARENT_EFF)
    assert len(found) == 3
    assert [c.split(":")[0] for c in found] == ["max_agents", "messaging.send_to", "evolution.min_interval_seconds"]
    everything = Policy(
        max_agents=11, agent=AgentLimits(max_resources=Resources.of(cpu=3, memory="3Gi", gpu=2)),
        allowed_operations=frozenset({Op.KILL, Op.MERGE}),
        messaging=MessagingPolicy(send_to=frozenset({"c", "d"}), accept_from=frozenset({"b"})),
        images=ImagePolicy(trusted_signers=frozenset({"k2"}), allowed_images=frozenset({"*"})),
        evolution=EvolutionPolicy(min_interval_seconds=0))
    found = conflicts(everything, Resources(), PARENT_EFF)
    assert len(found) == 1 + 3 + 2 + 2 + 1 + 1 + 1 + 1
    assert {c.split(":")[0] for c in found} == {
        "max_agents", "agent", "allowed_operations", "messaging.send_to", "messaging.accept_from",
        "images.trusted_signers", "images.allowed_images", "evolution.min_interval_seconds"}


def test_a_child_that_only_tightens_or_inherits_has_no_conflicts():
    tighter = Policy(
        max_agents=10,
        agent=AgentLimits(max_resources=Resources.of(cpu=1, memory="2Gi"), max_share=ShareLimits(cpu_pct=50)),
        allowed_operations=frozenset({Op.SPAWN}), denied_operations=frozenset({Op.MESSAGE, Op.MERGE}),
        messaging=MessagingPolicy(send_to=frozenset({"b"}), accept_from=frozenset()),
        images=ImagePolicy(trusted_signers=frozenset({"k1"}), allowed_images=frozenset({"calc@1.*", "sum@1.2"})),
        evolution=EvolutionPolicy(allowed=False, min_interval_seconds=7200))
    assert conflicts(tighter, Resources.of(cpu=100), PARENT_EFF) == []
    assert conflicts(Policy(), Resources.of(cpu=100), PARENT_EFF) == []
    # A share of a small pool is within an absolute cap.
    assert conflicts(Policy(agent=share(cpu=10)), Resources.of(cpu=20), PARENT_EFF) == []
    # Under a parent with no rules nothing a child states can loosen anything.
    assert conflicts(PARENT.model_copy(update={"max_agents": 10**6}), Resources(), effective([])) == []


def test_a_share_of_one_resource_does_not_conflict_on_the_others():
    # The seed's supervisor (5% of its CPU) under a domain with an absolute per-agent cap: memory and GPU are
    # left unset by the child and inherit; only its CPU is compared.
    parent = effective(chain_of(Policy(agent=AgentLimits(max_resources=Resources.of(cpu=2, memory="2Gi", gpu=1)))))
    assert conflicts(template("standard", "supervisor"), Resources.of(cpu=10, memory="10Gi"), parent) == []
    found = conflicts(template("standard", "supervisor"), Resources.of(cpu=100, memory="10Gi"), parent)
    assert found == ["agent: lets one agent have more cpu than allowed above it (needs 5, has 2)"]


def test_an_operation_the_child_allows_and_denies_itself_is_not_a_conflict():
    child = Policy(allowed_operations=frozenset({Op.SPAWN, Op.KILL}), denied_operations=frozenset({Op.KILL}))
    assert conflicts(child, Resources(), PARENT_EFF) == []


def test_conflicts_are_judged_against_the_whole_parent_chain():
    parents = chain_of(Policy(messaging=MessagingPolicy(send_to=frozenset({"a", "b"}))),
                       Policy(messaging=MessagingPolicy(send_to=frozenset({"a"}))))
    assert conflicts(Policy(messaging=MessagingPolicy(send_to=frozenset({"b"}))), Resources(), effective(parents)) \
        == ["messaging.send_to: allows 'b', which is not allowed above it"]
    seed = seed_chain()[:2]  # global cap 500 CPU, domain 10 CPU
    assert conflicts(Policy(agent=share(cpu=50)), Resources.of(cpu=20), effective(seed)) == []
    assert conflicts(Policy(agent=share(cpu=50)), Resources.of(cpu=30), effective(seed)) == [
        "agent: lets one agent have more cpu than allowed above it (needs 15, has 10)"]


@pytest.mark.parametrize(("child", "parent", "within"), [
    ("calc@1.*", "calc@*", True),
    ("calc@1.2", "calc@1.*", True),
    ("calc@?.0", "calc@*", True),
    ("calc@*", "calc@*", True),
    ("*", "calc@*", False),
    ("calc@*", "calc@1.*", False),
    ("sum@*", "calc@*", False),
    # A parent's class matches the child's wildcard as a literal character: the child is not within it.
    ("calc@*", "calc@[!a]*", False),
    ("calc@?", "calc@[?]", False),
    ("calc@[12]", "calc@[12]", True),
])
def test_image_pattern_containment(child, parent, within):
    parent_eff = effective(chain_of(Policy(images=ImagePolicy(allowed_images=frozenset({parent})))))
    found = conflicts(Policy(images=ImagePolicy(allowed_images=frozenset({child}))), Resources(), parent_eff)
    assert (found == []) is within


GLOB = "ab*?[]!"
#: Patterns built from pieces that make containment subtle: classes that match wildcards literally, unclosed brackets.
glob_patterns = st.lists(st.sampled_from(["a", "b", "*", "?", "!", "[", "]", "[ab]", "[!a]", "[*]", "[?]", "[]a]"]),
                         max_size=4).map("".join)


@settings(max_examples=300, deadline=None)
@given(glob_patterns, glob_patterns)
def test_an_image_pattern_without_conflict_admits_no_name_its_parent_refuses(child, parent):
    parent_eff = effective(chain_of(Policy(images=ImagePolicy(allowed_images=frozenset({parent})))))
    found = conflicts(Policy(images=ImagePolicy(allowed_images=frozenset({child}))), Resources(), parent_eff)
    if found:
        return
    for size in range(5):
        for chars in itertools.product(GLOB, repeat=size):
            name = "".join(chars)
            if fnmatchcase(name, child):
                assert fnmatchcase(name, parent), (name, child, parent)


def rules_not_in_force(child: Policy, extended: EffectivePolicy, child_cap: Resources | None) -> set[str]:
    """The rules the child states whose value is not the one in force below it (the parent's is tighter)."""
    out: set[str] = set()
    if child.max_agents is not None and extended.max_agents != child.max_agents:
        out.add("max_agents")
    if child_cap is not None:
        assert extended.max_agent_resources is not None
        for own, in_force in ((child_cap.cpu_millis, extended.max_agent_resources.cpu_millis),
                              (child_cap.memory_mib, extended.max_agent_resources.memory_mib),
                              (child_cap.gpu, extended.max_agent_resources.gpu)):
            if own < UNBOUNDED and in_force != own:
                out.add("agent")
    if child.allowed_operations is not None and \
            permitted(extended) != child.allowed_operations - child.denied_operations:
        out.add("allowed_operations")
    for name, mine, theirs in (("messaging.send_to", child.messaging.send_to, extended.send_to),
                               ("messaging.accept_from", child.messaging.accept_from, extended.accept_from),
                               ("images.trusted_signers", child.images.trusted_signers, extended.trusted_signers)):
        if mine is not None and theirs != mine:
            out.add(name)
    if child.evolution.allowed is True and not extended.evolution_allowed:
        out.add("evolution.allowed")
    interval = child.evolution.min_interval_seconds
    if interval is not None and extended.evolution_min_interval_seconds != interval:
        out.add("evolution.min_interval_seconds")
    return out


@settings(max_examples=150, deadline=None)
@given(chains(min_size=1), policies, pools)
def test_a_child_conflicts_exactly_where_its_own_rule_would_not_be_in_force(parents, child, pool):
    parents = parents[:2]
    child_link = ChainLink(level=LEVELS[len(parents)], entity="child", policy=child, capacity=pool)
    extended = effective([*parents, child_link])
    found = {c.split(":")[0] for c in conflicts(child, pool, effective(parents))}
    found.discard("images.allowed_images")  # pattern containment is checked by name enumeration above
    assert found == rules_not_in_force(child, extended, own_cap(child_link))


@PROPS
@given(chains(min_size=1), policies, pools, checks)
def test_a_valid_child_never_admits_more_than_its_parents(parents, child, pool, check):
    parents = parents[:2]
    child_link = ChainLink(level=LEVELS[len(parents)], entity="child", policy=child, capacity=pool)
    if evaluate(check, [*parents, child_link]).allowed:
        assert evaluate(check, parents).allowed
    if conflicts(child, pool, effective(parents)):
        return
    # A valid child's effective policy is its own rules wherever it states one.
    extended = effective([*parents, child_link])
    if child.max_agents is not None:
        assert extended.max_agents == child.max_agents
    for mine, theirs in ((child.messaging.send_to, extended.send_to),
                         (child.images.trusted_signers, extended.trusted_signers)):
        if mine is not None:
            assert theirs == mine


# -- the decision cache ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached_chain(version: int = 1, denied: frozenset[Op] = frozenset(), agents: int = 0,
                 capacity: Resources | None = None) -> PolicyChain:
    return PolicyChain(chain_of(
        template("standard", "orchestrator"),
        Policy(version=version, max_agents=3, denied_operations=denied),
        template("standard", "supervisor"),
        capacities=[Resources.of(cpu=1000), Resources.of(cpu=100), capacity or Resources.of(cpu=10)],
        agents=[0, agents, 0]))


def test_hits_misses_and_hit_rate():
    clock = FakeClock()
    cache = DecisionCache(clock, ttl_seconds=5)
    assert cache.stats() == CacheStats(hits=0, misses=0, size=0, ttl_seconds=5)
    assert cache.stats().hit_rate == 0.0
    chain = cached_chain()
    first = cache.evaluate(spawn(cpu=0.1), chain)
    assert first.allowed and not first.cached
    second = cache.evaluate(spawn(cpu=0.1), chain)  # an equal check built afresh
    assert second.allowed and second.cached
    cache.evaluate(spawn(cpu=0.1), chain)
    cache.evaluate(spawn(cpu=0.2), chain)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.size) == (2, 2, 2)
    assert stats.hit_rate == 0.5


def test_entries_expire_after_the_ttl():
    clock = FakeClock()
    cache = DecisionCache(clock, ttl_seconds=1)
    chain = cached_chain()
    check = PolicyCheck(operation=Op.KILL)
    assert not cache.evaluate(check, chain).cached
    clock.now += 0.75
    assert cache.evaluate(check, chain).cached
    clock.now += 0.25  # exactly the TTL after the entry was made: stale
    assert not cache.evaluate(check, chain).cached
    clock.now += 0.5
    assert cache.evaluate(check, chain).cached
    assert (cache.hits, cache.misses) == (2, 2)


def test_a_changed_policy_is_never_judged_by_the_old_decision():
    clock = FakeClock()
    cache = DecisionCache(clock, ttl_seconds=3600)
    check = spawn(cpu=0.1)
    v1 = cached_chain(version=1)
    assert cache.evaluate(check, v1).allowed
    assert cache.evaluate(check, v1).cached
    v2 = cached_chain(version=2, denied=frozenset({Op.SPAWN}))
    assert v2.key != v1.key
    d = cache.evaluate(check, v2)  # the very next decision, well within the TTL
    assert not d.cached and not d.allowed
    assert (d.level, d.rule) == ("manager", "denied_operations") and "v2" in d.reason
    assert cache.misses == 2
    # A pool that changes (shares are of it) is a new key too.
    bigger = cached_chain(version=1, capacity=Resources.of(cpu=100))
    assert bigger.key != v1.key
    assert not cache.evaluate(spawn(cpu=1), cached_chain()).allowed  # 5% of 10 CPU
    assert cache.evaluate(spawn(cpu=1), bigger).allowed  # 5% of 100 CPU


def test_live_counts_are_never_served_from_the_cache():
    clock = FakeClock()
    cache = DecisionCache(clock, ttl_seconds=3600)
    check = spawn(count=2)
    assert cache.evaluate(check, cached_chain(agents=1)).allowed
    crowded = cached_chain(agents=2)
    assert crowded.key == cached_chain(agents=1).key  # counts are not part of the key
    d = cache.evaluate(check, crowded)
    assert d.cached and cache.hits == 1
    assert not d.allowed and (d.level, d.rule) == ("manager", "max_agents")
    assert "2 exist and 2 more were asked" in d.reason
    # ... and the entry still holds the static verdicts: fewer agents, allowed again from the cache.
    again = cache.evaluate(check, cached_chain(agents=0))
    assert again.allowed and again.cached
    assert cache.stats().misses == 1


def test_the_cache_stays_bounded_and_drops_stale_entries_first():
    clock = FakeClock()
    cache = DecisionCache(clock, ttl_seconds=1, max_entries=4)
    chain = cached_chain()
    for n in range(50):
        cache.evaluate(PolicyCheck(operation=Op.KILL, agent=f"a{n}"), chain)
        assert cache.stats().size <= 4
    cache = DecisionCache(clock, ttl_seconds=1, max_entries=4)
    for n in range(3):
        cache.evaluate(PolicyCheck(operation=Op.KILL, agent=f"old{n}"), chain)
    clock.now += 10  # those three are stale now
    cache.evaluate(PolicyCheck(operation=Op.KILL, agent="fresh"), chain)
    assert cache.stats().size == 4
    cache.evaluate(PolicyCheck(operation=Op.KILL, agent="newest"), chain)  # full: the stale three go
    assert cache.stats().size == 2
    assert cache.evaluate(PolicyCheck(operation=Op.KILL, agent="fresh"), chain).cached


@PROPS
@given(chains(), checks, st.data())
def test_cached_and_uncached_decisions_agree(chain, check, data):
    cache = DecisionCache(FakeClock(), ttl_seconds=60)
    pc = PolicyChain(chain)
    first = cache.evaluate(check, pc)
    second = cache.evaluate(check, pc)
    plain = evaluate(check, chain)
    assert not first.cached and second.cached and not plain.cached
    assert first == plain
    assert second.model_copy(update={"cached": False}) == plain
    # With other live counts the cached answer still equals a fresh one.
    counts = [data.draw(st.integers(0, 12)) for _ in chain]
    recounted = [link.model_copy(update={"agents": n}) for link, n in zip(chain, counts, strict=True)]
    third = cache.evaluate(check, PolicyChain(recounted))
    assert third.cached
    assert third.model_copy(update={"cached": False}) == evaluate(check, recounted)


def test_a_changed_copy_of_a_hashed_check_hashes_like_an_equal_check():
    check = PolicyCheck(operation=Op.SPAWN)
    hash(check)  # the hash is computed once and kept
    changed = check.model_copy(update={"count": 5})
    fresh = PolicyCheck(operation=Op.SPAWN, count=5)
    assert changed == fresh and hash(changed) == hash(fresh)
    cache = DecisionCache(FakeClock())
    cache.evaluate(fresh, cached_chain())
    assert cache.evaluate(changed, cached_chain()).cached


# -- cross-domain messages ------------------------------------------------------------------------------------


def message_chains(orchestrator: Policy | None = None, sender_domain: Policy | None = None,
                   sender_sup: Policy | None = None, receiver_domain: Policy | None = None,
                   receiver_sup: Policy | None = None) -> tuple[list[ChainLink], list[ChainLink]]:
    orch = ChainLink(level="orchestrator", entity="orchestrator", policy=orchestrator or Policy())
    sender = [orch, ChainLink(level="manager", entity="a", policy=sender_domain or Policy()),
              ChainLink(level="supervisor", entity="a/s1", policy=sender_sup or Policy())]
    receiver = [orch, ChainLink(level="manager", entity="b", policy=receiver_domain or Policy()),
                ChainLink(level="supervisor", entity="b/s1", policy=receiver_sup or Policy())]
    return sender, receiver


A_TO_B = PolicyCheck(operation=Op.MESSAGE, domain="a", target_domain="b")


def send_to(*domains: str) -> Policy:
    return Policy(messaging=MessagingPolicy(send_to=frozenset(domains)))


def accept_from(*domains: str) -> Policy:
    return Policy(messaging=MessagingPolicy(accept_from=frozenset(domains)))


def test_a_message_between_permissive_domains_is_allowed():
    d = evaluate_message(A_TO_B, *message_chains())
    assert d.allowed
    assert [(v.level, v.entity) for v in d.verdicts] == [
        ("orchestrator", "orchestrator"), ("manager", "a"), ("supervisor", "a/s1"), ("manager", "b"),
        ("supervisor", "b/s1")]


@pytest.mark.parametrize(("where", "policy", "level", "entity", "rule"), [
    ("orchestrator", send_to("c"), "orchestrator", "orchestrator", "messaging.send_to"),
    ("sender_domain", send_to("c"), "manager", "a", "messaging.send_to"),
    ("sender_sup", send_to(), "supervisor", "a/s1", "messaging.send_to"),
    ("receiver_domain", accept_from("c"), "manager", "b", "messaging.accept_from"),
    ("receiver_sup", accept_from(), "supervisor", "b/s1", "messaging.accept_from"),
    ("orchestrator", accept_from("c"), "orchestrator", "orchestrator", "messaging.accept_from"),
    ("receiver_domain", Policy(denied_operations=frozenset({Op.MESSAGE})), "manager", "b", "denied_operations"),
    ("sender_sup", Policy(allowed_operations=frozenset({Op.SPAWN})), "supervisor", "a/s1", "allowed_operations"),
])
def test_each_message_rule_denies_at_its_level(where, policy, level, entity, rule):
    d = evaluate_message(A_TO_B, *message_chains(**{where: policy}))
    assert not d.allowed
    assert (d.level, d.entity, d.rule) == (level, entity, rule)
    assert d.reason.startswith(f"{level} policy v1 ")
    if rule == "messaging.accept_from":
        assert "'a'" in d.reason
    if rule == "messaging.send_to":
        assert "from 'a' to 'b'" in d.reason
    assert sum(not v.allowed for v in d.verdicts) == 1


def test_a_receivers_own_rules_for_sending_do_not_apply_to_what_it_receives():
    sender, receiver = message_chains(receiver_domain=send_to(), receiver_sup=accept_from("a"))
    assert evaluate_message(A_TO_B, sender, receiver).allowed
    # The sender's accept_from is not asked either.
    assert evaluate_message(A_TO_B, *message_chains(sender_domain=accept_from())).allowed


def test_message_precedence_sender_chain_first_then_receiver():
    d = evaluate_message(A_TO_B, *message_chains(sender_sup=send_to("c"), receiver_domain=accept_from("c")))
    assert (d.level, d.entity) == ("supervisor", "a/s1")
    assert [v.entity for v in d.verdicts if not v.allowed] == ["a/s1", "b"]
    d = evaluate_message(A_TO_B, *message_chains(orchestrator=send_to("c"), receiver_sup=accept_from()))
    assert (d.level, d.rule) == ("orchestrator", "messaging.send_to")


def test_messages_within_one_domain_are_not_judged_by_domain_lists():
    orch = ChainLink(level="orchestrator", entity="orchestrator", policy=accept_from("z"))
    dom = ChainLink(level="manager", entity="a", policy=Policy(messaging=MessagingPolicy(
        send_to=frozenset(), accept_from=frozenset())))
    sender = [orch, dom, ChainLink(level="supervisor", entity="a/s1", policy=send_to())]
    receiver = [orch, dom, ChainLink(level="supervisor", entity="a/s2", policy=accept_from())]
    d = evaluate_message(PolicyCheck(operation=Op.MESSAGE, domain="a", target_domain="a"), sender, receiver)
    assert d.allowed and len(d.verdicts) == 4


# Rules are sparse (half the levels below the orchestrator state none), so that one rule often decides alone.
domain_lists = st.sampled_from([None, None, frozenset(), frozenset({"a"}), frozenset({"b"}), frozenset({"a", "b"}),
                                frozenset({"b", "c"}), frozenset({"a", "c"}), frozenset(DOMAINS)])
ruled_message_policies = st.builds(
    Policy,
    allowed_operations=st.sampled_from([None] * 5 + [frozenset({Op.MESSAGE}), frozenset({Op.SPAWN})]),
    denied_operations=st.sampled_from([frozenset()] * 6 + [frozenset({Op.MESSAGE})]),
    messaging=st.builds(MessagingPolicy, send_to=domain_lists, accept_from=domain_lists),
)
message_policies = st.just(Policy()) | ruled_message_policies


@settings(max_examples=500, deadline=None)
@given(ruled_message_policies, message_policies, message_policies, message_policies, message_policies,
       st.sampled_from(DOMAINS), st.sampled_from(DOMAINS))
def test_a_message_is_allowed_exactly_when_both_effective_policies_allow_it(orch, sa, ss, rd, rs, src, dst):
    sender, receiver = message_chains(orch, sa, ss, rd, rs)
    check = PolicyCheck(operation=Op.MESSAGE, domain=src, target_domain=dst)
    sending, receiving = effective(sender), effective(receiver)
    cross = src != dst
    expected = (Op.MESSAGE in permitted(sending) and Op.MESSAGE in permitted(receiving)
                and (not cross or sending.send_to is None or dst in sending.send_to)
                and (not cross or receiving.accept_from is None or src in receiving.accept_from))
    d = evaluate_message(check, sender, receiver)
    assert d.allowed is expected
    if not d.allowed:
        first = next(v for v in d.verdicts if not v.allowed)
        assert (d.level, d.entity, d.rule) == (first.level, first.entity, first.rule)
