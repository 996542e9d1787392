"""Activity inputs: a target entity plus the request it is to receive.

Operation workflows reach a level through activities (DESIGN.md decision 3); each activity takes
one of these models, naming the entity by :class:`LevelRef` and carrying the entity-level request.
"""

from __future__ import annotations

from pydantic import BaseModel

from tetrarch.agent import StopAgent
from tetrarch.decisions import PolicyCheck
from tetrarch.level import (
    AdmitAgents,
    BeginRemoval,
    ChildRef,
    ConfigureLevel,
    ReconfigureChild,
    RegisterChild,
    ReleaseAgents,
    SetPolicy,
)
from tetrarch.models import LevelRef


class RegisterChildCall(BaseModel):
    """Admit a child at ``target``."""

    target: LevelRef
    request: RegisterChild


class ReconfigureChildCall(BaseModel):
    """Resize or re-police a child at ``target``."""

    target: LevelRef
    request: ReconfigureChild


class ChildCall(BaseModel):
    """Act on one child of ``target`` (begin/cancel removal, unregister)."""

    target: LevelRef
    request: ChildRef


class ConfigureCall(BaseModel):
    """Change ``target``'s own capacity or policy."""

    target: LevelRef
    request: ConfigureLevel


class RemovalCall(BaseModel):
    """Begin, cancel or finish the removal of ``target`` itself."""

    target: LevelRef
    request: BeginRemoval


class StopAgentCall(BaseModel):
    """Stop the agent ``target``."""

    target: LevelRef
    request: StopAgent


class ReadHierarchy(BaseModel):
    """Read the orchestrator and the managers of these domains."""

    domains: list[str]


class AdmitCall(BaseModel):
    """Count agents in at ``target``, judged by its policy."""

    target: LevelRef
    request: AdmitAgents


class ReleaseCall(BaseModel):
    """Count agents out at ``target``."""

    target: LevelRef
    request: ReleaseAgents


class SetPolicyCall(BaseModel):
    """Replace ``target``'s policy."""

    target: LevelRef
    request: SetPolicy


class JudgeCall(BaseModel):
    """Ask ``target`` for its verdict on an operation."""

    target: LevelRef
    check: PolicyCheck


class DiscardAgentCall(BaseModel):
    """Compensation of an agent start: stop the agent ``target`` only if request ``owner`` started it."""

    target: LevelRef
    owner: str
