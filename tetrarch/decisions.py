"""Policy decisions: evaluate an operation against the chain Global > Domain > Supervisor > Agent.

:func:`evaluate` is the one function that decides: it asks every level of the chain, top first,
and the first level that denies decides (its rule and reason are named); each level's verdict is
kept so a what-if check can print the whole chain. Agent-level capabilities are permissive by
default (the seed), so a chain ends at the supervisor.

:func:`effective` combines a chain into the most restrictive policy in force at its bottom;
:func:`conflicts` lists every way a child policy would loosen its parent's; :class:`DecisionCache`
caches decisions for a TTL, keyed by the versions of every policy in the chain, so that a changed
policy is never judged by a decision made under the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from functools import cached_property
from math import floor
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, computed_field

from tetrarch.policy import (
    ADDS_AGENTS,
    DEFAULT_QUOTA_GRACE_SECONDS,
    LOADS_IMAGE,
    QUOTA_ACTIONS,
    TAKES_RESOURCES,
    OperationType,
    Policy,
    QuotaAction,
)
from tetrarch.resources import Resources, format_cpu, format_memory


class ChainLink(BaseModel):
    """One level of a policy chain: who it is, its policy, its pool, and the agents below it now."""

    model_config = ConfigDict(frozen=True)

    level: str
    entity: str
    policy: Policy
    capacity: Resources = Field(default_factory=Resources, description="The level's own pool (for shares).")
    agents: int = Field(default=0, ge=0, description="Agents in this level's subtree right now.")


class ImageRef(BaseModel):
    """The image an operation would load."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    signer: str | None = Field(default=None, description="Public key (hex) that signed it.")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class PolicyCheck(BaseModel):
    """An operation to judge, with what the rules look at."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: OperationType
    domain: str | None = None
    supervisor: str | None = None
    agent: str | None = None
    resources: Resources | None = Field(default=None, description="Per agent, for operations that take resources.")
    count: int = Field(default=1, ge=1, description="Agents added (batch spawn, split).")
    target_domain: str | None = Field(default=None, description="Receiving domain of a message.")
    image: ImageRef | None = None
    seconds_since_last_evolution: float | None = Field(default=None, ge=0)

    @cached_property
    def _hash(self) -> int:
        return hash((self.operation, self.domain, self.supervisor, self.agent, self.resources, self.count,
                     self.target_domain, self.image, self.seconds_since_last_evolution))

    def __hash__(self) -> int:
        """Hashed once: a check is the cache's key, and pydantic would hash every field on every lookup."""
        return self._hash

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy, with the cached hash dropped: pydantic copies ``__dict__``, and a changed copy would keep the
        original's hash (equal checks with different hashes miss the cache)."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("_hash", None)
        return copied


class Verdict(BaseModel):
    """One level's answer."""

    model_config = ConfigDict(frozen=True)

    level: str
    entity: str
    allowed: bool
    rule: str = ""
    reason: str = ""


class Decision(BaseModel):
    """The chain's answer: allowed or not, which level decided, by which rule and why (immutable: the
    cache hands the same one to every hit)."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    level: str = ""
    entity: str = ""
    rule: str = ""
    reason: str = ""
    verdicts: list[Verdict] = Field(default_factory=list)
    cached: bool = False


# -- one level ------------------------------------------------------------------------------------------


def _agent_cap(link: ChainLink) -> Resources | None:
    """The most one agent may hold under ``link``'s own rules (absolute and share combined)."""
    limits = link.policy.agent
    cap = limits.max_resources.bounded(UNBOUNDED) if limits.max_resources is not None else None
    share = limits.max_share
    if share is not None:
        from_share = Resources(
            cpu_millis=floor(link.capacity.cpu_millis * share.cpu_pct / 100) if share.cpu_pct else UNBOUNDED,
            memory_mib=floor(link.capacity.memory_mib * share.memory_pct / 100) if share.memory_pct else UNBOUNDED,
            gpu=floor(link.capacity.gpu * share.gpu_pct / 100) if share.gpu_pct else UNBOUNDED)
        cap = from_share if cap is None else _min(cap, from_share)
    return cap


UNBOUNDED = 10**18


def cap_human(cap: Resources) -> str:
    """A per-agent cap for people, naming only the components that are limited."""
    parts = []
    if cap.cpu_millis < UNBOUNDED:
        parts.append(f"{format_cpu(cap.cpu_millis)} CPU")
    if cap.memory_mib < UNBOUNDED:
        parts.append(format_memory(cap.memory_mib))
    if cap.gpu < UNBOUNDED:
        parts.append(f"{cap.gpu} GPU")
    return " / ".join(parts) or "no limit"


def _min(a: Resources, b: Resources) -> Resources:
    return Resources(cpu_millis=min(a.cpu_millis, b.cpu_millis), memory_mib=min(a.memory_mib, b.memory_mib),
                     gpu=min(a.gpu, b.gpu))


def judge_static(check: PolicyCheck, link: ChainLink) -> Verdict:
    """``link``'s verdict on everything that does not depend on live counts (cacheable)."""
    p, op = link.policy, check.operation

    def deny(rule: str, reason: str) -> Verdict:
        return Verdict(level=link.level, entity=link.entity, allowed=False, rule=rule, reason=reason)

    if op in p.denied_operations:
        return deny("denied_operations", f"{link.level} policy v{p.version} denies {op.value}")
    if p.allowed_operations is not None and op not in p.allowed_operations:
        return deny("allowed_operations", f"{link.level} policy v{p.version} does not allow {op.value} "
                                          f"(allowed: {', '.join(sorted(p.allowed_operations)) or 'none'})")
    if op in TAKES_RESOURCES and check.resources is not None:
        cap = _agent_cap(link)
        if cap is not None:
            short = check.resources.shortfall(cap)
            if short:
                rule = "agent.max_resources"
                share = p.agent.max_share
                if share is not None and p.agent.max_resources is None:
                    rule = "agent.max_share"
                elif share is not None:
                    absolute = p.agent.max_resources
                    assert absolute is not None
                    rule = ("agent.max_resources" if check.resources.shortfall(absolute.bounded(UNBOUNDED))
                            else "agent.max_share")
                detail = "; ".join(f"{k} {v}" for k, v in short.items())
                return deny(rule, f"{link.level} policy v{p.version} caps one agent at {cap_human(cap)} "
                                  f"({rule}): {detail}")
    if op is OperationType.MESSAGE and check.target_domain is not None and check.domain is not None \
            and check.target_domain != check.domain:
        send_to = p.messaging.send_to
        if send_to is not None and check.target_domain not in send_to:
            return deny("messaging.send_to", f"{link.level} policy v{p.version} does not allow messages "
                                             f"from {check.domain!r} to {check.target_domain!r}")
    if op in LOADS_IMAGE and check.image is not None:
        img = check.image
        signers = p.images.trusted_signers
        if signers is not None and img.signer not in signers:
            return deny("images.trusted_signers", f"{link.level} policy v{p.version} does not trust the signer "
                                                  f"of {img.ref} ({(img.signer or 'unsigned')[:16]})")
        allowed = p.images.allowed_images
        if allowed is not None and not any(fnmatchcase(img.ref, pat) for pat in allowed):
            return deny("images.allowed_images", f"{link.level} policy v{p.version} does not allow image "
                                                 f"{img.ref}")
    if op is OperationType.EVOLVE:
        evo = p.evolution
        if evo.allowed is False:
            return deny("evolution.allowed", f"{link.level} policy v{p.version} does not allow evolution")
        since = check.seconds_since_last_evolution
        if evo.min_interval_seconds and since is not None and since < evo.min_interval_seconds:
            return deny("evolution.min_interval_seconds",
                        f"{link.level} policy v{p.version} allows one evolution per {evo.min_interval_seconds}s; "
                        f"the last was {since:.0f}s ago")
    return Verdict(level=link.level, entity=link.entity, allowed=True)


def count_denial(check: PolicyCheck, link: ChainLink) -> Verdict | None:
    """``link``'s denial on the live counts (never cached), or None when the counts allow it."""
    limit = link.policy.max_agents
    if limit is not None and check.operation in ADDS_AGENTS and link.agents + check.count > limit:
        return Verdict(level=link.level, entity=link.entity, allowed=False, rule="max_agents",
                       reason=f"{link.level} policy v{link.policy.version} admits at most {limit} agents; "
                              f"{link.agents} exist and {check.count} more were asked")
    return None


def _decide(verdicts: list[Verdict], cached: bool = False) -> Decision:
    for v in verdicts:
        if not v.allowed:
            return Decision(allowed=False, level=v.level, entity=v.entity, rule=v.rule, reason=v.reason,
                            verdicts=verdicts, cached=cached)
    return Decision(allowed=True, verdicts=verdicts, cached=cached)


def _with_counts(check: PolicyCheck, chain: Sequence[ChainLink], static: list[Verdict]) -> list[Verdict] | None:
    """The static verdicts with each level's count denial put in; None when no count denies."""
    out: list[Verdict] | None = None
    for i, link in enumerate(chain):
        if static[i].allowed:
            denial = count_denial(check, link)
            if denial is not None:
                if out is None:
                    out = list(static)
                out[i] = denial
    return out


def evaluate(check: PolicyCheck, chain: Sequence[ChainLink]) -> Decision:
    """Judge ``check`` against ``chain`` (top level first): the first level that denies decides."""
    static = [judge_static(check, link) for link in chain]
    return _decide(_with_counts(check, chain, static) or static)


class PolicyChain:
    """A chain of links (top first) with its cache key computed once: every policy's version and pool."""

    __slots__ = ("key", "links")

    def __init__(self, links: Sequence[ChainLink]) -> None:
        self.links = tuple(links)
        # A string: it hashes once and then carries its hash, which a tuple of models would not.
        self.key = "|".join(f"{link.entity}:v{link.policy.version}:{link.capacity.cpu_millis}:"
                            f"{link.capacity.memory_mib}:{link.capacity.gpu}" for link in self.links)


# -- cache ----------------------------------------------------------------------------------------------


class CacheStats(BaseModel):
    """How the decision cache is doing."""

    hits: int = 0
    misses: int = 0
    size: int = 0
    ttl_seconds: float = 0.1

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hit_rate(self) -> float:
        """Hits over all lookups (0 before the first)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DecisionCache:
    """Static verdicts cached for ``ttl_seconds``, keyed by the check and every policy version in the chain.

    Live counts (max_agents) are judged afresh every time, so a hit can never admit past a limit. A
    policy change bumps that policy's version, which changes the key: the next check after any change
    misses and is judged by the new policy. ``clock`` is injected (``time.monotonic`` in a process,
    ``workflow.time`` in a workflow) so that the cache is deterministic where it must be.
    """

    def __init__(self, clock: Callable[[], float], ttl_seconds: float = 0.1, max_entries: int = 10_000) -> None:
        self.clock = clock
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        # key -> (time judged, static verdicts, the decision to return when no count denies)
        self._entries: dict[tuple[object, ...], tuple[float, list[Verdict], Decision]] = {}
        self.hits = 0
        self.misses = 0

    def evaluate(self, check: PolicyCheck, chain: PolicyChain) -> Decision:
        """Like :func:`evaluate`, serving the static part from the cache while it is fresh."""
        key = (check, chain.key)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.ttl:
            self.hits += 1
            static, decision = entry[1], entry[2]
        else:
            self.misses += 1
            static = [judge_static(check, link) for link in chain.links]
            decision = _decide(static, cached=True)
            if len(self._entries) >= self.max_entries:
                self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[key] = (now, static, decision)
            decision = decision.model_copy(update={"cached": False})
        if check.operation not in ADDS_AGENTS:
            return decision
        with_counts = _with_counts(check, chain.links, static)
        return decision if with_counts is None else _decide(with_counts, cached=decision.cached)

    def stats(self) -> CacheStats:
        """Hits, misses and size so far."""
        return CacheStats(hits=self.hits, misses=self.misses, size=len(self._entries), ttl_seconds=self.ttl)


# -- combining and validating ---------------------------------------------------------------------------


class EffectivePolicy(BaseModel):
    """The most restrictive combination of a chain: what is in force at its bottom level."""

    max_agents: int | None = None
    max_agent_resources: Resources | None = None
    allowed_operations: frozenset[OperationType] | None = None
    denied_operations: frozenset[OperationType] = frozenset()
    send_to: frozenset[str] | None = None
    accept_from: frozenset[str] | None = None
    trusted_signers: frozenset[str] | None = None
    image_patterns: list[frozenset[str]] = Field(
        default_factory=list, description="An image must match one pattern of every set.")
    evolution_allowed: bool = True
    evolution_min_interval_seconds: int = 0
    quota_action: QuotaAction = QuotaAction.FLAG
    quota_grace_seconds: float = DEFAULT_QUOTA_GRACE_SECONDS
    decided_by: dict[str, str] = Field(default_factory=dict, description="Rule -> the level whose value is in force.")


def _tighter_set(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def effective(chain: list[ChainLink]) -> EffectivePolicy:
    """Combine a chain (top first) into the policy in force at its bottom: every rule at its tightest."""
    eff = EffectivePolicy()
    by = eff.decided_by
    for link in chain:
        p = link.policy
        if p.max_agents is not None and (eff.max_agents is None or p.max_agents < eff.max_agents):
            eff.max_agents, by["max_agents"] = p.max_agents, link.level
        cap = _agent_cap(link)
        if cap is not None:
            before = eff.max_agent_resources
            eff.max_agent_resources = cap if before is None else _min(before, cap)
            if eff.max_agent_resources != before:
                by["agent"] = link.level
        if p.allowed_operations is not None:
            eff.allowed_operations = (p.allowed_operations if eff.allowed_operations is None
                                      else eff.allowed_operations & p.allowed_operations)
        eff.denied_operations = eff.denied_operations | p.denied_operations
        eff.send_to = _tighter_set(eff.send_to, p.messaging.send_to)
        eff.accept_from = _tighter_set(eff.accept_from, p.messaging.accept_from)
        eff.trusted_signers = _tighter_set(eff.trusted_signers, p.images.trusted_signers)
        if p.images.allowed_images is not None:
            eff.image_patterns.append(p.images.allowed_images)
        if p.evolution.allowed is False:
            eff.evolution_allowed, by["evolution.allowed"] = False, link.level
        if (p.evolution.min_interval_seconds or 0) > eff.evolution_min_interval_seconds:
            eff.evolution_min_interval_seconds = p.evolution.min_interval_seconds or 0
            by["evolution.min_interval_seconds"] = link.level
        action = p.resources.quota_action
        if action is not None and QUOTA_ACTIONS.index(action) > QUOTA_ACTIONS.index(eff.quota_action):
            eff.quota_action, by["resources.quota_action"] = action, link.level
        grace = p.resources.quota_grace_seconds
        if grace is not None and grace < eff.quota_grace_seconds:
            eff.quota_grace_seconds, by["resources.quota_grace_seconds"] = grace, link.level
    return eff


_ANY, _STAR = object(), object()


def _glob_tokens(pattern: str) -> list[object]:
    """``pattern`` as fnmatch reads it: literal characters, ``_ANY`` (``?`` or any ``[...]`` class, one
    character) and ``_STAR``. Reading a class as "any one character" over-approximates what it matches."""
    out: list[object] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] is not _STAR:
                out.append(_STAR)
        elif c == "?":
            out.append(_ANY)
        elif c == "[":
            j = i  # the closing bracket, found the way fnmatch.translate finds it
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("[")  # unclosed: a literal bracket
            else:
                out.append(_ANY)
                i = j + 1
        else:
            out.append(c)
    return out


def _pattern_within(child: str, parent: str) -> bool:
    """True only if every name ``child`` matches is matched by ``parent`` (sound, not complete: doubtful
    cases count as outside, so a child can never widen its parent's images by a pattern trick).

    Matching the child pattern as a plain string against the parent's (``fnmatchcase(child, parent)``)
    is not sound: the parent's ``[!a]`` or ``[*]`` matches the child's ``*`` as a literal character.
    """
    if not any(ch in child for ch in "*?["):
        return fnmatchcase(child, parent)  # a plain name: exact
    if child == parent:
        return True
    if "[" in parent:
        return False  # classes in the parent: only the identical pattern is known to be within
    c, p = _glob_tokens(child), _glob_tokens(parent)
    memo: dict[tuple[int, int], bool] = {}

    def within(i: int, j: int) -> bool:  # is c[i:] within p[j:]?
        if (i, j) not in memo:
            if i == len(c):
                result = all(t is _STAR for t in p[j:])
            elif j == len(p):
                result = False
            elif p[j] is _STAR:  # the parent's star matches nothing here, or swallows the child's token
                result = within(i, j + 1) or within(i + 1, j)
            elif c[i] is _STAR:
                result = False
            elif p[j] is _ANY or (c[i] is not _ANY and c[i] == p[j]):
                result = within(i + 1, j + 1)
            else:
                result = False
            memo[(i, j)] = result
        return memo[(i, j)]

    return within(0, 0)


def conflicts(child: Policy, child_capacity: Resources, parent: EffectivePolicy) -> list[str]:
    """Every way ``child`` would loosen what its ancestors enforce (empty: it only tightens or inherits).

    Rules the child leaves unset inherit and never conflict; only what it states is compared.
    """
    out: list[str] = []
    if child.max_agents is not None and parent.max_agents is not None and child.max_agents > parent.max_agents:
        out.append(f"max_agents: {child.max_agents} is above the {parent.max_agents} allowed above it")
    own_cap = _agent_cap(ChainLink(level="child", entity="", policy=child, capacity=child_capacity))
    if own_cap is not None and parent.max_agent_resources is not None:
        # A component the child leaves unlimited (a share of some other resource only) inherits: no conflict.
        unset = {k for k, v in (("cpu", own_cap.cpu_millis), ("memory", own_cap.memory_mib), ("gpu", own_cap.gpu))
                 if v >= UNBOUNDED}
        for k, v in own_cap.shortfall(parent.max_agent_resources).items():
            if k not in unset:
                out.append(f"agent: lets one agent have more {k} than allowed above it ({v})")
    if child.allowed_operations is not None:
        allows = child.allowed_operations - child.denied_operations  # what the child itself denies it does not allow
        beyond = allows - (parent.allowed_operations if parent.allowed_operations is not None else allows)
        beyond |= allows & parent.denied_operations
        for op in sorted(beyond):
            out.append(f"allowed_operations: allows {op.value}, which is not allowed above it")
    for name, mine, theirs in (("messaging.send_to", child.messaging.send_to, parent.send_to),
                               ("messaging.accept_from", child.messaging.accept_from, parent.accept_from),
                               ("images.trusted_signers", child.images.trusted_signers, parent.trusted_signers)):
        if mine is not None and theirs is not None:
            for extra in sorted(mine - theirs):
                out.append(f"{name}: allows {extra[:24]!r}, which is not allowed above it")
    if child.images.allowed_images is not None:
        for pattern in sorted(child.images.allowed_images):
            for parent_set in parent.image_patterns:
                if not any(_pattern_within(pattern, p) for p in parent_set):
                    out.append(f"images.allowed_images: {pattern!r} is not within what is allowed above it")
                    break
    if child.evolution.allowed is True and not parent.evolution_allowed:
        out.append("evolution.allowed: allows evolution, which is not allowed above it")
    mine_interval = child.evolution.min_interval_seconds
    if mine_interval is not None and mine_interval < parent.evolution_min_interval_seconds:
        out.append(f"evolution.min_interval_seconds: {mine_interval}s is shorter than the "
                   f"{parent.evolution_min_interval_seconds}s required above it")
    action = child.resources.quota_action
    if action is not None and QUOTA_ACTIONS.index(action) < QUOTA_ACTIONS.index(parent.quota_action):
        out.append(f"resources.quota_action: {action.value} is milder than the {parent.quota_action.value} "
                   "required above it")
    grace = child.resources.quota_grace_seconds
    if grace is not None and grace > parent.quota_grace_seconds:
        out.append(f"resources.quota_grace_seconds: {grace:g}s is longer than the "
                   f"{parent.quota_grace_seconds:g}s allowed above it")
    return out


def judge_accept(check: PolicyCheck, link: ChainLink) -> Verdict:
    """A receiving level's verdict on a cross-domain message: does it accept from the sender's domain?"""
    accept = link.policy.messaging.accept_from
    if check.domain is not None and check.domain != check.target_domain and accept is not None \
            and check.domain not in accept:
        return Verdict(level=link.level, entity=link.entity, allowed=False, rule="messaging.accept_from",
                       reason=f"{link.level} policy v{link.policy.version} does not accept messages from "
                              f"{check.domain!r}")
    return Verdict(level=link.level, entity=link.entity, allowed=True)


def evaluate_message(check: PolicyCheck, sender: list[ChainLink], receiver: list[ChainLink]) -> Decision:
    """A cross-domain message, judged as the seed's example 2: the sender's chain top-down (with the
    ``accept_from`` of the levels shared with the receiver), then the receiver's levels below the shared
    orchestrator (their ``accept_from`` and operation rules)."""
    receiving = {link.entity for link in receiver}
    verdicts = []
    for link in sender:
        v = judge_static(check, link)
        if v.allowed and link.entity in receiving:
            # A level over both domains (the orchestrator): its accept_from binds every domain below it, the
            # receiver's too, as effective() combines it; skipping it here would let it go unenforced.
            v = judge_accept(check, link)
        verdicts.append(v)
    shared = {link.entity for link in sender}
    for link in receiver:
        if link.entity in shared:
            continue
        v = judge_accept(check, link)
        verdicts.append(v if not v.allowed else judge_static(check.model_copy(update={"target_domain": None}),
                                                             link))
    return _decide(verdicts)


def agents_refused(link: ChainLink, agents: Sequence[tuple[str, Resources]]) -> list[str]:
    """The running agents ``link``'s policy would not admit now: too large for its per-agent cap, or
    beyond its max_agents (the most recent ones in the order given), each with the reason."""
    out: list[str] = []
    cap = _agent_cap(link)
    if cap is not None:
        for name, resources in agents:
            short = resources.shortfall(cap)
            if short:
                out.append(f"{name}: holds more than the {cap_human(cap)} cap ("
                           + "; ".join(f"{k} {v}" for k, v in short.items()) + ")")
    limit = link.policy.max_agents
    if limit is not None and len(agents) > limit:
        out += [f"{name}: beyond max_agents {limit}" for name, _ in agents[limit:]]
    return out
