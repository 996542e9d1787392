"""Inputs and outputs of the resource operations: allocate, release, balance, reclaim, enforce quotas.

Part of the public API like :mod:`tetrarch.operations`: every model here is exported as JSON Schema
and can be given to the ``temporal`` CLI as plain JSON.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from tetrarch.decisions import ChainLink
from tetrarch.models import ChildView, PoolView
from tetrarch.policy import QuotaAction
from tetrarch.pools import Grant
from tetrarch.resources import Resources


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default="", description="Idempotency key; defaults to the operation's workflow id.")


class AllocateRequest(_Request):
    """An agent asks for more resources (the seed's ``requestResources`` / example 3).

    Served by the agent's supervisor, then borrowed from its domain, then from the global pool; refused
    as a whole (nothing kept) if the three together cannot pay it.
    """

    domain: str
    agent: str
    resources: Resources
    supervisor: str | None = Field(default=None, description="The agent's supervisor (looked up when left out).")


class AllocationCheck(BaseModel):
    """Where an allocation goes, and the policies above its supervisor (judged by the supervisor's
    reserve, atomically with the agent's live total, before anything is reserved)."""

    supervisor: str
    above: list[ChainLink] = Field(description="The orchestrator's and the manager's links, top first.")


class AllocationResult(BaseModel):
    """An allocation: how much, and which level paid how much of it."""

    allocation_id: str
    key: str
    domain: str
    supervisor: str
    agent: str
    resources: Resources
    parts: dict[str, Resources] = Field(description="Level -> what it paid from its own pool.")
    served_by: str = Field(description="The highest level that paid a part ('supervisor' if it paid alone).")
    agent_total: Resources = Field(description="Everything the agent holds after this allocation.")
    created: bool = True


class ReleaseRequest(_Request):
    """Give resources back: one allocation, or (``allocation_id`` left out) every extra allocation of the agent.

    An agent's spawn allocation is released when it is stopped, not here, unless ``include_spawn`` is set.
    """

    domain: str
    agent: str
    allocation_id: str | None = None
    include_spawn: bool = False


class ReleaseResult(BaseModel):
    """What went back, and to which level."""

    domain: str
    agent: str
    released: list[str] = Field(default_factory=list, description="Allocation keys released (empty if none held).")
    returned: dict[str, Resources] = Field(default_factory=dict, description="Level -> what returned to its pool.")


class AllocationsView(BaseModel):
    """An agent's allocations as its supervisor records them."""

    domain: str
    supervisor: str
    agent: ChildView
    grants: list[Grant]


class BalanceRequest(_Request):
    """Move free nominal capacity between a domain's supervisors toward those that borrow (demand)."""

    domain: str
    dry_run: bool = False


class CapacityMove(BaseModel):
    """One move of nominal capacity from a supervisor with free capacity to one that borrows."""

    source: str
    target: str
    resources: Resources


class BalanceResult(BaseModel):
    """The moves planned, and those done (none on a dry run)."""

    domain: str
    planned: list[CapacityMove] = Field(default_factory=list)
    done: list[CapacityMove] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list, description="Moves that could not be made, and why.")


class ReclaimRequest(_Request):
    """A level wants back capacity it lent out: the global level (no domain) or a domain."""

    domain: str | None = None
    resources: Resources


class ReclaimResult(BaseModel):
    """What a reclaim got back, from whom, and whether the level now has what it wanted free."""

    target: str
    wanted: Resources
    released: list[str] = Field(default_factory=list, description="Idle allocations given back.")
    preempted: list[str] = Field(default_factory=list, description="Agents stopped (preempt mode).")
    satisfied: bool
    free: Resources
    refusing_new_loans: bool = Field(default=False, description="Refuse mode: lending paused until enough is back.")
    problems: list[str] = Field(default_factory=list, description="Borrowers that could not be preempted, and why.")


class QuotaWatch(_Request):
    """Watch one overuse of one agent: after the grace, act on it if it lasts (``enforceAgentQuotas``)."""

    domain: str
    supervisor: str
    agent: str
    since: datetime


class QuotaOutcome(BaseModel):
    """What quota enforcement did about one overuse."""

    agent: str
    action: QuotaAction | None = Field(default=None, description="The action taken (None: the overuse ended).")
    used: Resources | None = None
    allocated: Resources | None = None
    decided_by: str | None = Field(default=None, description="The level whose rule chose the action.")


class PoolsView(BaseModel):
    """Every level's pool: the orchestrator, each domain and each supervisor."""

    pools: dict[str, PoolView] = Field(description="Entity id -> its pool.")
