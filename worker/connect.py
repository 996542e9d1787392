"""Connecting to Temporal with the project's data converter (pydantic v2 models on the wire)."""

from __future__ import annotations

import os

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"


def address_from_env() -> str | None:
    """``TEMPORAL_ADDRESS`` if set: an existing server to use instead of starting one."""
    return os.environ.get("TEMPORAL_ADDRESS") or None


async def connect(address: str, namespace: str = DEFAULT_NAMESPACE) -> Client:
    """A client that speaks pydantic models (DESIGN.md decision 9)."""
    return await Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter)
