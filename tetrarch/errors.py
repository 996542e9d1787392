"""Domain errors: what went wrong, which level refused it, and whether retrying can help.

Pure logic raises these; the Temporal layer turns them into non-retryable ``ApplicationError``s
whose ``type`` is :attr:`TetrarchError.code` and whose details carry :class:`ErrorInfo`, so a client
sees the same code, level and message however deep the refusal happened.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorInfo(BaseModel):
    """Structured description of a refusal, carried as the ApplicationError's details."""

    code: str = Field(description="Error type, e.g. NotFound, Conflict, HasChildren, InvalidRequest.")
    level: str = Field(description="The level that refused: orchestrator, manager, supervisor, agent or client.")
    entity: str = Field(default="", description="Workflow id of the refusing entity, if any.")
    message: str
    problems: list[str] = Field(default_factory=list, description="Every individual problem found.")
    data: dict[str, Any] = Field(default_factory=dict)


class TetrarchError(Exception):
    """Base of every domain error. Non-retryable unless a subclass says otherwise."""

    code = "TetrarchError"
    retryable = False

    def __init__(self, message: str, *, level: str = "", entity: str = "",
                 problems: list[str] | None = None, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.level = level
        self.entity = entity
        self.problems = problems or []
        self.data = data or {}

    def info(self) -> ErrorInfo:
        """This error as a serialisable :class:`ErrorInfo`."""
        return ErrorInfo(code=self.code, level=self.level, entity=self.entity, message=self.message,
                         problems=self.problems, data=self.data)

    def __str__(self) -> str:
        where = f"{self.level} refused: " if self.level else ""
        return f"{where}{self.message}"


class NotFound(TetrarchError):
    """A named domain, supervisor or agent does not exist."""

    code = "NotFound"


class Conflict(TetrarchError):
    """The thing exists with a different definition, or is in a state that forbids the operation."""

    code = "Conflict"


class HasChildren(TetrarchError):
    """Removal of a level that still manages children, without asking to drain."""

    code = "HasChildren"


class InvalidRequest(TetrarchError):
    """The request itself is malformed (bad name, impossible numbers)."""

    code = "InvalidRequest"


class CapacityExceeded(TetrarchError):
    """The parent's pool cannot carve out what the child asks for."""

    code = "CapacityExceeded"


class LimitExceeded(TetrarchError):
    """A policy limit (maximum domains, supervisors or agents) would be exceeded."""

    code = "LimitExceeded"


class PolicyDenied(TetrarchError):
    """A level's policy refuses the operation; ``data`` names the rule (and ``level`` the deciding level)."""

    code = "PolicyDenied"


class PolicyConflict(TetrarchError):
    """A policy that would loosen what the levels above enforce; ``problems`` lists every conflict."""

    code = "PolicyConflict"


class InvalidBootstrap(TetrarchError):
    """A bootstrap file is malformed; ``problems`` lists every error with its path in the file."""

    code = "InvalidBootstrap"


ERROR_TYPES: dict[str, type[TetrarchError]] = {
    cls.code: cls for cls in (TetrarchError, NotFound, Conflict, HasChildren, InvalidRequest,
                              CapacityExceeded, LimitExceeded, InvalidBootstrap, PolicyDenied,
                              PolicyConflict)
}


def error_from_info(info: ErrorInfo) -> TetrarchError:
    """Rebuild the typed error from its serialised form (used by clients)."""
    from tetrarch.images import IMAGE_ERROR_TYPES  # images import this module: look them up late

    cls = ERROR_TYPES.get(info.code) or IMAGE_ERROR_TYPES.get(info.code, TetrarchError)
    err = cls(info.message, level=info.level, entity=info.entity, problems=info.problems, data=info.data)
    err.code = info.code
    return err
