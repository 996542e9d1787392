"""Workflows for the bench command's ceiling: what the bare server does with no logic of ours."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


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
    def ping(self) -> None:
        """A signal's round trip: counted like an Update, but the sender does not wait for it."""
        self.touched += 1

    @workflow.signal
    def stop(self) -> None:
        """Let the run finish."""
        self.done = True


@activity.defn(name="bench_noop_activity")
async def noop_activity() -> None:
    """Does nothing: an activity's round trip is all it costs."""


@workflow.defn(name="BenchOneActivity")
class OneActivityWorkflow:
    """Runs one no-op activity (``local`` picks a local activity), then returns."""

    @workflow.run
    async def run(self, local: bool) -> None:
        if local:
            await workflow.execute_local_activity(noop_activity, start_to_close_timeout=timedelta(seconds=10))
        else:
            await workflow.execute_activity(noop_activity, start_to_close_timeout=timedelta(seconds=10))
