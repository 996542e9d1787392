"""Resource vectors: exact integer arithmetic over CPU, memory and GPU.

CPU is held in millicores and memory in MiB so that sums and differences are exact (no float drift
in pool ledgers). Users write quantities the Kubernetes way (``cpu: 2``, ``cpu: 500m``,
``memory: 10Gi``); :func:`parse_cpu` and :func:`parse_memory` turn them into the canonical units.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails

_MEMORY_UNITS = {"": 1 / (1024 * 1024), "Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024,
                 "K": 1000 / (1024 * 1024), "M": 1000**2 / 1024**2, "G": 1000**3 / 1024**2,
                 "T": 1000**4 / 1024**2}
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT]i?)B?)?\s*$")  # a bare "B" (bytes) is refused
_CPU_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(m?)\s*$")


def parse_cpu(value: Any) -> int:
    """Parse a CPU quantity (``2``, ``0.5``, ``"500m"``) into millicores; raise ValueError if bad."""
    if isinstance(value, bool):
        raise ValueError("cpu must be a number of cores or a quantity like '500m'")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"cpu must be a finite number (got {value})")
        if value < 0:
            raise ValueError(f"cpu must not be negative (got {value})")
        return round(value * 1000)
    if isinstance(value, str):
        m = _CPU_RE.match(value)
        if not m:
            raise ValueError(f"cpu quantity {value!r} is not a number of cores or millicores like '500m'")
        number = float(m.group(1))
        return round(number) if m.group(2) == "m" else round(number * 1000)
    raise ValueError(f"cpu must be a number or a string, not {type(value).__name__}")


def parse_memory(value: Any) -> int:
    """Parse a memory quantity (``"1Gi"``, ``"512Mi"``, ``"1Ti"``; a bare number is MiB) into MiB."""
    if isinstance(value, bool):
        raise ValueError("memory must be a quantity like '1Gi'")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"memory must be a finite number (got {value})")
        if value < 0:
            raise ValueError(f"memory must not be negative (got {value})")
        return round(value)
    if isinstance(value, str):
        m = _MEMORY_RE.match(value)
        if not m:
            raise ValueError(f"memory quantity {value!r} is not like '512Mi', '10Gi' or '1Ti'")
        unit = m.group(2) or "Mi"
        return round(float(m.group(1)) * _MEMORY_UNITS[unit])
    raise ValueError(f"memory must be a number of MiB or a string, not {type(value).__name__}")


def format_cpu(millicores: int) -> str:
    """Render millicores for people: ``2`` cores or ``500m``."""
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def format_memory(mib: int) -> str:
    """Render MiB for people with the largest exact binary unit."""
    for unit, size in (("Ti", 1024 * 1024), ("Gi", 1024)):
        if mib >= size and mib % size == 0:
            return f"{mib // size}{unit}"
    return f"{mib}Mi"


def accept_quantities(model: type[BaseModel], data: Any) -> Any:
    """Turn ``cpu``/``memory`` quantities into ``cpu_millis``/``memory_mib`` before ``model`` validates.

    Each bad quantity is reported at its own path (``resources.cpu``), together with every other
    problem of the same input, so that a file lists all its problems at once.
    """
    if not isinstance(data, dict) or ("cpu" not in data and "memory" not in data):
        return data
    out = dict(data)
    errors: list[InitErrorDetails] = []
    for key, canonical, parse in (("cpu", "cpu_millis", parse_cpu), ("memory", "memory_mib", parse_memory)):
        if key not in out:
            continue
        value = out.pop(key)
        try:
            if canonical in out:
                raise ValueError(f"give either {key!r} or {canonical!r}, not both")
            out[canonical] = parse(value)
        except ValueError as e:
            errors.append(InitErrorDetails(type="value_error", loc=(key,), input=value, ctx={"error": str(e)}))
    if errors:
        try:  # the other fields' problems too
            model.model_validate(out)
        except ValidationError as e:
            errors += [InitErrorDetails(type=d["type"], loc=d["loc"], input=d["input"], ctx=d.get("ctx", {}))
                       for d in e.errors()]
        raise ValidationError.from_exception_data(model.__name__, errors)
    return out


class Resources(BaseModel):
    """A resource vector. Canonical fields are integers; ``cpu``/``memory`` quantities are accepted on input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_millis: int = Field(default=0, ge=0, description="CPU in millicores (1000 = one core).")
    memory_mib: int = Field(default=0, ge=0, description="Memory in MiB.")
    gpu: int = Field(default=0, ge=0, description="Whole GPUs.")

    @model_validator(mode="before")
    @classmethod
    def _accept_quantities(cls, data: Any) -> Any:
        """Accept ``{"cpu": "2", "memory": "4Gi"}`` as well as the canonical field names."""
        return accept_quantities(cls, data)

    @classmethod
    def of(cls, cpu: float | str = 0, memory: float | str = 0, gpu: int = 0) -> Resources:
        """Build from human quantities: ``Resources.of(cpu=10, memory="10Gi")``."""
        return cls(cpu_millis=parse_cpu(cpu), memory_mib=parse_memory(memory), gpu=gpu)

    def _values(self) -> tuple[int, ...]:
        return tuple(getattr(self, k) for k in KINDS)

    @classmethod
    def _of_values(cls, values: tuple[int, ...] | list[int]) -> Resources:
        """From component values already known valid (sums and differences of valid vectors): built
        without validation, which made pool arithmetic the bulk of an entity's Update (and of its
        replay, which the SDK's two-second deadlock check then cut short on a large supervisor)."""
        fields: dict[str, Any] = dict(zip(KINDS, values, strict=True))
        return cls.model_construct(**fields)

    def __add__(self, other: Resources) -> Resources:
        return Resources._of_values([a + b for a, b in zip(self._values(), other._values(), strict=True)])

    def minus(self, other: Resources) -> Resources:
        """Component-wise difference; raises ValueError if any component would go negative."""
        if not other.fits_in(self):
            raise ValueError(f"cannot subtract {other.human()} from {self.human()}")
        return Resources._of_values([a - b for a, b in zip(self._values(), other._values(), strict=True)])

    def fits_in(self, other: Resources) -> bool:
        """True when every component of self is at most the same component of ``other``."""
        return all(a <= b for a, b in zip(self._values(), other._values(), strict=True))

    def shortfall(self, available: Resources) -> dict[str, str]:
        """The components by which self exceeds ``available``, rendered for people (empty if it fits)."""
        out: dict[str, str] = {}
        for kind, need, has in zip(KINDS, self._values(), available._values(), strict=True):
            if need > has:
                name, fmt = KIND_NAMES[kind]
                out[name] = f"needs {fmt(need)}, has {fmt(has)}"
        return out

    def is_zero(self) -> bool:
        """True when nothing is requested."""
        return not any(self._values())

    def human(self) -> str:
        """Short human rendering: ``10 CPU / 10Gi / 0 GPU``."""
        return " / ".join(KIND_NAMES[k][1](v) + KIND_UNITS[k] for k, v in zip(KINDS, self._values(), strict=True))


#: The kinds of a resource vector, in field order. A new kind is one more integer field on
#: :class:`Resources` with a name and a formatter here; pools, grants and audits handle every kind.
KINDS: tuple[str, ...] = tuple(Resources.model_fields)
#: Each kind's name in messages, and how its quantity is shown.
KIND_NAMES: dict[str, tuple[str, Callable[[int], str]]] = {
    "cpu_millis": ("cpu", format_cpu), "memory_mib": ("memory", format_memory), "gpu": ("gpu", str)}
KIND_UNITS: dict[str, str] = {"cpu_millis": " CPU", "memory_mib": "", "gpu": " GPU"}


def total(items: list[Resources]) -> Resources:
    """Sum of a list of resource vectors (one pass, one vector built)."""
    return Resources._of_values([sum(getattr(item, kind) for item in items) for kind in KINDS])
