"""Run one agent task in a separate process under OS-enforced limits.

The public API lives in :mod:`runtime.sandbox` (:func:`~runtime.sandbox.run_task` and its models);
:mod:`runtime.child` is the program the sandbox starts. This package module imports nothing eagerly:
``python -m runtime.child`` imports it first, and everything loaded here would be loaded into every
child before its limits are applied (pydantic alone adds ~9 MiB of address space). The names below
are resolved on first use instead.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.sandbox import (
        MIN_MEMORY_MIB,
        Reason,
        TaskLimits,
        TaskOutcome,
        TaskRequest,
        TaskUsage,
        run_task,
        run_task_sync,
    )

__all__ = [
    "MIN_MEMORY_MIB",
    "Reason",
    "TaskLimits",
    "TaskOutcome",
    "TaskRequest",
    "TaskUsage",
    "run_task",
    "run_task_sync",
]


def __getattr__(name: str) -> Any:
    """Load :mod:`runtime.sandbox` lazily, when one of its public names is first asked for."""
    if name in __all__:
        return getattr(importlib.import_module("runtime.sandbox"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
