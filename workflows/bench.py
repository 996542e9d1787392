"""Workflows for the bench command's ceiling: what the bare server does with no logic of ours."""

from __future__ import annotations

from temporalio import workflow


@workflow.defn(name="BenchNoop")
class NoopWorkflow:
    """Returns at once: start-to-result latency of a workflow is the server's floor."""

    @workflow.run
    async def run(self) -> None:
        return None


@workflow.defn(name="BenchEntity")
class NoopEntityWorkflow:
    """An entity that takes Updates and does nothing with them: one Update's round trip."""

    def __init__(self) -> None:
        self.touched = 0
        self.done = False

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.done and workflow.all_handlers_finished())
        return self.touched

    @workflow.update
    def touch(self) -> int:
        """Count and return."""
        self.touched += 1
        return self.touched

    @workflow.query
    def count(self) -> int:
        """A query's round trip."""
        return self.touched

    @workflow.signal
    def stop(self) -> None:
        """Let the run finish."""
        self.done = True
