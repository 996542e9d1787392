"""Connecting to Temporal with the project's data converter (pydantic v2 models on the wire)."""

from __future__ import annotations

import dataclasses
import logging

import pydantic
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverter, PayloadConverter
from temporalio.exceptions import ApplicationError
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"


class ValidationFailureConverter(DefaultFailureConverter):
    """Fails bad input for good: a pydantic ``ValidationError`` becomes a non-retryable ApplicationError.

    Workflows list ``ValidationError`` in ``failure_exception_types`` so bad input fails the workflow
    instead of retrying its task; without this the failure would still be marked retryable, and a
    retry policy (of a child, or given by the starter) would run the same bad input again.
    """

    def to_failure(self, exception: BaseException, payload_converter: PayloadConverter,
                   failure: Failure) -> None:
        if isinstance(exception, pydantic.ValidationError):
            err = ApplicationError(str(exception), type="ValidationError", non_retryable=True)
            err.__traceback__ = exception.__traceback__
            exception = err
        super().to_failure(exception, payload_converter, failure)


#: The project's data converter: pydantic models on the wire, bad input non-retryable.
DATA_CONVERTER = dataclasses.replace(pydantic_data_converter, failure_converter_class=ValidationFailureConverter)


def with_project_failures(converter: DataConverter) -> DataConverter:
    """``converter`` with the project's failure converter (keeps its payload converter and codec)."""
    if converter.failure_converter_class is ValidationFailureConverter:
        return converter
    return dataclasses.replace(converter, failure_converter_class=ValidationFailureConverter)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The process's Temporal runtime, forwarding the SDK core's log lines to Python logging.

    Without this the core writes its warnings (retries while a server is away, for instance) to
    stdout, where they would mix with the command line's JSON output; forwarded, they go wherever
    Python logging goes (stderr for the command line).
    """
    global _runtime  # noqa: PLW0603 - one runtime per process, created on first use
    if _runtime is None:
        _runtime = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")))))
    return _runtime


async def connect(address: str, namespace: str = DEFAULT_NAMESPACE) -> Client:
    """A client that speaks pydantic models (DESIGN.md decision 9)."""
    return await Client.connect(address, namespace=namespace, data_converter=DATA_CONVERTER, runtime=runtime())
