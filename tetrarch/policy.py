"""Level policy: the limits each management level enforces on what it manages.

This is the foundation's policy model: a versioned set of limits that every level checks when it
admits a child. The full policy hierarchy (operations, cross-domain routes, signers, evolution,
precedence and caching) grows from this model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tetrarch.resources import Resources


class Policy(BaseModel):
    """Limits a level enforces. ``None`` means no limit at this level."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(default=1, ge=1, description="Bumped on every change of the policy.")
    max_children: int | None = Field(
        default=None, ge=0,
        description="Most children this level admits (domains, supervisors or agents).")
    default_agent_resources: Resources | None = Field(
        default=None, description="What an agent gets when its spawn request names no resources.")


DEFAULT_AGENT_RESOURCES = Resources.of(cpu=1, memory="1Gi")
