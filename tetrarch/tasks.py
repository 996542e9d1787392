"""What a task may use, from what its agent was allocated: the allocation becomes OS limits.

Memory is the agent's memory allocation (the child's whole address space); CPU time is its cores
times the task's wall-clock limit (an agent allocated half a core may burn half of the task's time).
An agent allocated less memory than an interpreter needs, or no CPU, cannot run tasks at all, and is
told so rather than failing every task.
"""

from __future__ import annotations

from runtime.sandbox import MIN_MEMORY_MIB, TaskLimits
from tetrarch.errors import InvalidRequest
from tetrarch.resources import Resources, format_memory


def task_limits(allocation: Resources, timeout_seconds: float) -> TaskLimits:
    """The limits of one task attempt of an agent holding ``allocation``."""
    if allocation.memory_mib < MIN_MEMORY_MIB:
        raise InvalidRequest(f"the agent holds {format_memory(allocation.memory_mib)} of memory; a task needs at "
                             f"least {MIN_MEMORY_MIB}Mi (the interpreter's own): allocate more first", level="agent")
    if allocation.cpu_millis <= 0:
        raise InvalidRequest("the agent holds no CPU; allocate some before running tasks", level="agent")
    cores = allocation.cpu_millis / 1000
    return TaskLimits(memory_mib=allocation.memory_mib, cpu_seconds=max(0.1, cores * timeout_seconds),
                      wall_seconds=timeout_seconds)
