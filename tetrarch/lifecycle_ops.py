"""Inputs and outputs of the lifecycle operations (checkpoint, restore, clone, upgrade, specialize).

Public API like :mod:`tetrarch.operations`: exported as JSON Schema, usable from the ``temporal`` CLI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tetrarch.images import Narrowing
from tetrarch.resources import Resources


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default="", description="Idempotency key; defaults to the operation's workflow id.")


class CheckpointRequest(_Request):
    """Checkpoint a running agent."""

    domain: str
    name: str
    label: str = ""


class RestoreRequest(_Request):
    """Start agent ``name`` from a checkpoint of ``source`` (default: itself, once stopped)."""

    domain: str
    name: str
    source: str | None = None
    checkpoint: str | None = Field(default=None, description="A checkpoint id; default: the latest (the final one).")
    supervisor: str | None = Field(default=None, description="Restore under another supervisor of the domain.")


class CloneRequest(_Request):
    """A new agent ``name`` with a copy of running agent ``source``'s state and image."""

    domain: str
    source: str
    name: str
    supervisor: str | None = None


class UpgradeRequest(_Request):
    """Switch a running agent to a newer signed version of its image."""

    domain: str
    name: str
    image: str = Field(description="The new version: name@version in the image store, or a path.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameter overrides for the new version.")


class SpecializeRequest(_Request):
    """Narrow a running agent's intents and parameters within its image."""

    domain: str
    name: str
    narrowing: Narrowing
    params: dict[str, Any] = Field(default_factory=dict)


class MergeRequest(_Request):
    """Merge running agents of one domain into a new agent ``name``: their states combined (the image's
    merge rule), their spawn allocations summed; the originals are stopped once it runs.

    An entry ``other-domain/agent`` names an agent of another domain, which is refused.
    """

    domain: str
    agents: list[str] = Field(min_length=2)
    name: str
    supervisor: str | None = None


class SplitRequest(_Request):
    """Split a running agent into ``parts`` new agents ``<name>-1..N``: its state dealt out (the image's
    split rule), its spawn allocation divided; the original is stopped once they run."""

    domain: str
    name: str
    parts: int


class LifecycleResult(BaseModel):
    """What a lifecycle operation did."""

    operation: str
    domain: str
    agents: list[str] = Field(description="The agents it made or changed.")
    supervisor: str | None = None
    checkpoint: str | None = None
    image: str | None = None
    previous_image: str | None = None
    intents: list[str] = Field(default_factory=list)


class SelfRequest(BaseModel):
    """An agent asks its supervisor for a lifecycle operation on itself (``requestLifecycleOperation``):
    judged by the policies like any other; ``clone`` and ``split`` name the result(s)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = ""
    operation: Literal["checkpoint", "clone", "split", "stop"]
    name: str | None = Field(default=None, description="clone: the new agent's name.")
    parts: int | None = Field(default=None, description="split: how many parts.")
    reason: str = ""


class SelfRequestResult(BaseModel):
    """The operation started for the agent: its workflow id, to follow in the UI or wait for."""

    operation: str
    workflow_id: str


class CoordinatedOp(BaseModel):
    """One operation of a coordinated set."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["spawn", "stop", "checkpoint", "clone", "upgrade", "specialize"]
    agent: str = Field(description="The agent it acts on (spawn, clone: the new one).")
    source: str | None = Field(default=None, description="clone: the agent copied.")
    image: str | None = Field(default=None, description="spawn, upgrade: the image.")
    resources: Resources | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list, description="spawn: agents it needs.")
    narrowing: Narrowing | None = Field(default=None, description="specialize: what the agent keeps.")


class CoordinateRequest(_Request):
    """``coordinateAgentOperations``: operations on agents of one supervisor, applied as one saga in
    dependency order, all or none (what was done is undone if one fails)."""

    domain: str
    supervisor: str
    operations: list[CoordinatedOp] = Field(min_length=1, max_length=100)


class CoordinateResult(BaseModel):
    """The operations in the order they ran."""

    domain: str
    supervisor: str
    order: list[str] = Field(description="'<op> <agent>' in the order applied.")
