"""Naming: levels, entity workflow ids, task queues and search attribute names.

One id scheme for every entity (DESIGN.md decision 1): ``orchestrator``, ``manager/<domain>``,
``supervisor/<domain>/<name>``, ``agent/<domain>/<name>``. Names are DNS labels so that they are
safe in ids, search attributes and file names alike.
"""

from __future__ import annotations

import re
from enum import StrEnum

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)

ORCHESTRATOR_ID = "orchestrator"


class Level(StrEnum):
    """The four levels of the hierarchy, top to bottom."""

    ORCHESTRATOR = "orchestrator"
    MANAGER = "manager"
    SUPERVISOR = "supervisor"
    AGENT = "agent"

    @property
    def child(self) -> Level | None:
        """The level this one manages, or None for agents."""
        order = list(Level)
        i = order.index(self)
        return order[i + 1] if i + 1 < len(order) else None


def is_valid_name(name: str) -> bool:
    """True when ``name`` is a lowercase DNS label (1-63 chars, a-z, 0-9, '-', no edge dashes)."""
    return bool(_NAME_RE.match(name))


def manager_id(domain: str) -> str:
    """Workflow id of the manager entity of ``domain``."""
    return f"manager/{domain}"


def supervisor_id(domain: str, name: str) -> str:
    """Workflow id of supervisor ``name`` in ``domain``."""
    return f"supervisor/{domain}/{name}"


def agent_id(domain: str, name: str) -> str:
    """Workflow id of agent ``name`` in ``domain`` (agent names are unique per domain)."""
    return f"agent/{domain}/{name}"


class SearchAttr:
    """Names of the search attributes the server must have registered (all Keyword)."""

    LEVEL = "HierarchyLevel"  # not "Level": the visibility query parser treats level as a keyword
    DOMAIN = "Domain"
    SUPERVISOR = "Supervisor"
    AGENT_STATUS = "AgentStatus"
    OPERATION = "Operation"

    ALL: tuple[str, ...] = (LEVEL, DOMAIN, SUPERVISOR, AGENT_STATUS, OPERATION)


class TaskQueues:
    """The task queue of every level; an optional prefix lets several deployments share a namespace."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def for_level(self, level: Level) -> str:
        """Task queue name of ``level``."""
        return f"{self.prefix}{level.value}"

    @property
    def orchestrator(self) -> str:
        return self.for_level(Level.ORCHESTRATOR)

    @property
    def manager(self) -> str:
        return self.for_level(Level.MANAGER)

    @property
    def supervisor(self) -> str:
        return self.for_level(Level.SUPERVISOR)

    @property
    def agent(self) -> str:
        return self.for_level(Level.AGENT)
