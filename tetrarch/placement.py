"""Manager-level placement and balancing (the seed's ``optimizeAgentPlacement`` and
``balanceSupervisorLoad``): pure choices over the pools of a domain's supervisors.
"""

from __future__ import annotations

from pydantic import BaseModel

from tetrarch.models import PoolView
from tetrarch.policy import PlacementStrategy
from tetrarch.pools import component_min
from tetrarch.resource_ops import CapacityMove
from tetrarch.resources import KINDS, Resources


class Candidate(BaseModel):
    """A supervisor a new agent could go to."""

    name: str
    active: bool = True
    pool: PoolView


def _headroom(pool: PoolView, request: Resources) -> float:
    """Mean share of capacity left free after placing ``request`` (over the kinds the supervisor has)."""
    shares = []
    for kind in KINDS:
        cap = getattr(pool.capacity, kind)
        if cap > 0:
            shares.append((getattr(pool.free, kind) - getattr(request, kind)) / cap)
    return sum(shares) / len(shares) if shares else 0.0


def place(candidates: list[Candidate], request: Resources, strategy: PlacementStrategy) -> str | None:
    """The supervisor for a new agent asking ``request``, or None when the domain has no active supervisor.

    Among supervisors whose free pool fits the request, bin-pack takes the fullest (least headroom after)
    and spread the emptiest. When none fits, the one with the most headroom, so the least is borrowed.
    Ties go to the first name, so the choice is the same on every replay.
    """
    active = sorted((c for c in candidates if c.active), key=lambda c: c.name)
    if not active:
        return None
    fits = [c for c in active if request.fits_in(c.pool.free)]
    if not fits:
        return max(active, key=lambda c: _headroom(c.pool, request)).name
    if strategy is PlacementStrategy.BIN_PACK:
        return min(fits, key=lambda c: _headroom(c.pool, request)).name
    return max(fits, key=lambda c: _headroom(c.pool, request)).name


def plan_balance(pools: dict[str, PoolView]) -> list[CapacityMove]:
    """Moves of free nominal capacity toward supervisors that borrow, never below what a donor has granted.

    A supervisor's demand is what it borrows from its domain beyond what it has free again (a move
    does not refinance loans already made, so capacity moved before still counts, and a second run
    right after the first moves nothing); its spare is what it has free beyond what it borrows. The
    neediest (largest first, then by name) take from the donors with the most spare first.
    """
    need = {n: _excess(p.borrowed, p.free) for n, p in pools.items()}
    spare = {n: _excess(p.free, p.borrowed) for n, p in pools.items()}
    need = {n: r for n, r in need.items() if not r.is_zero()}
    spare = {n: r for n, r in spare.items() if not r.is_zero()}
    moves: list[CapacityMove] = []
    for target in sorted(need, key=lambda n: (_size(need[n]), n)):
        for source in sorted(spare, key=lambda n: (_size(spare[n]), n)):
            if source == target:
                continue
            amount = component_min(need[target], spare[source])
            if amount.is_zero():
                continue
            moves.append(CapacityMove(source=source, target=target, resources=amount))
            need[target] = need[target].minus(amount)
            spare[source] = spare[source].minus(amount)
            if need[target].is_zero():
                break
    return moves


def _excess(a: Resources, b: Resources) -> Resources:
    """Component-wise ``max(a - b, 0)``."""
    return Resources(**{k: max(0, getattr(a, k) - getattr(b, k)) for k in KINDS})


def _size(r: Resources) -> tuple[int, int, int]:
    """A sort key putting the largest vector first (GPU, then CPU, then memory)."""
    return (-r.gpu, -r.cpu_millis, -r.memory_mib)


class PlacementInfo(BaseModel):
    """What a spawn needs to place an agent: the domain's supervisors and its placement strategy."""

    candidates: list[Candidate]
    strategy: PlacementStrategy
