"""Signed agent images: a manifest, the image's code, and an Ed25519 signature over its digest.

An image is a directory (or a ``.tar.gz`` archive of one) holding ``manifest.yaml``
(:class:`ImageManifest`), the Python code its entrypoint names, and ``SIGNATURE.json``
(:class:`Signature`). :func:`image_digest` hashes every file but the signature; :func:`sign_image`
signs that digest; :func:`verify_image` checks, in this order, that the image is signed, that its
content still has the signed digest, that the signature verifies, that the signer is trusted, that
the manifest is valid and that the entrypoint exists. Image code is never imported or executed here:
entrypoints are checked with :mod:`ast`.

Every refusal is an :class:`ImageRefused` with its own ``code`` (``ImageUnsigned``,
``ImageTampered``, ...), raised at ``level="supervisor"``, the level that loads images. A runtime
should load code from :func:`open_verified`: a fresh copy of exactly the digested files, so nothing
changed or added after verification (a stale ``__pycache__``, say) is ever run.

Nothing here imports Temporal: supervisors call it from activities, the CLI directly.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Self

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# jsonschema ships no type information and types-jsonschema is not a dependency of the project.
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped]
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tetrarch import decisions
from tetrarch.errors import Conflict, TetrarchError
from tetrarch.names import is_valid_name
from tetrarch.resources import Resources

MANIFEST_FILE = "manifest.yaml"
SIGNATURE_FILE = "SIGNATURE.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
#: Most an archive may unpack to, and most members it may hold: images are small code bundles.
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 10_000
#: The level that loads images, and so the level that refuses them.
IMAGE_LEVEL = "supervisor"

SEMVER_PATTERN = r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$"
_SEMVER_RE = re.compile(SEMVER_PATTERN)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
HOOK_PATTERN = rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$"
_HOOK_RE = re.compile(HOOK_PATTERN)
_INTENT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_PARAMETER_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_HEX64 = r"^[0-9a-f]{64}$"
_HEX64_RE = re.compile(_HEX64)
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# -- errors ------------------------------------------------------------------------------------------------


class ImageRefused(TetrarchError):
    """An image the supervisor will not load; ``code`` says why and the message names the image."""

    code = "ImageRefused"

    def __init__(self, message: str, *, level: str = IMAGE_LEVEL, entity: str = "",
                 problems: list[str] | None = None, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, level=level, entity=entity, problems=problems, data=data)


class ImageError(ImageRefused):
    """Not an image at all: missing, not a directory or archive, or holding a symlink or special file."""

    code = "ImageError"


class ImageUnsafeArchive(ImageError):
    """An archive member that could write outside the image: absolute path, ``..``, link or device."""

    code = "ImageUnsafeArchive"


class ImageUnsigned(ImageRefused):
    """The image has no ``SIGNATURE.json``."""

    code = "ImageUnsigned"


class ImageUntrusted(ImageRefused):
    """The signature is valid, but its signer is not one of the trusted signers."""

    code = "ImageUntrusted"


class ImageTampered(ImageRefused):
    """The content no longer has the signed digest, or the signature does not verify."""

    code = "ImageTampered"


class ImageBadManifest(ImageRefused):
    """``manifest.yaml`` is missing, not YAML, or invalid; ``problems`` lists every error with its path."""

    code = "ImageBadManifest"


class ImageBadEntrypoint(ImageRefused):
    """The entrypoint (or a state hook) names a module file that is missing or has no such top-level ``def``."""

    code = "ImageBadEntrypoint"


class UnknownIntent(TetrarchError):
    """A task names an intent its agent's image does not declare."""

    code = "UnknownIntent"


class TaskInputInvalid(TetrarchError):
    """A task's input does not satisfy its intent's ``input_schema``; ``problems`` has every error's path."""

    code = "TaskInputInvalid"


class TaskOutputInvalid(TetrarchError):
    """An agent's output does not satisfy its intent's ``output_schema``."""

    code = "TaskOutputInvalid"


class ParameterInvalid(TetrarchError):
    """Parameter overrides the image does not accept: unknown name, wrong type, out of range."""

    code = "ParameterInvalid"


class SpecializeWidens(TetrarchError):
    """A specialization asks for more than the image offers (an intent, a capability or a wider range)."""

    code = "SpecializeWidens"


class SpecializeInvalid(TetrarchError):
    """A specialization that is within the image but impossible (no intent left, an empty range)."""

    code = "SpecializeInvalid"


class KeyInvalid(TetrarchError):
    """A signing key or public key that cannot be read or is not Ed25519."""

    code = "KeyInvalid"


#: Every error type of this module by code, for clients rebuilding typed errors (see ``error_from_info``).
IMAGE_ERROR_TYPES: dict[str, type[TetrarchError]] = {
    cls.code: cls for cls in (ImageRefused, ImageError, ImageUnsafeArchive, ImageUnsigned, ImageUntrusted,
                              ImageTampered, ImageBadManifest, ImageBadEntrypoint, UnknownIntent,
                              TaskInputInvalid, TaskOutputInvalid, ParameterInvalid, SpecializeWidens,
                              SpecializeInvalid, KeyInvalid)
}


# -- small helpers -----------------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.10.2"`` as ``(1, 10, 2)``, so versions compare numerically; ValueError if not ``MAJOR.MINOR.PATCH``."""
    m = _SEMVER_RE.match(text)
    if not m:
        raise ValueError(f"version {text!r} is not MAJOR.MINOR.PATCH (like '1.2.3')")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _check_name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError(f"{value!r} is not a lowercase DNS label (a-z, 0-9, '-', 1-63 characters)")
    return value


def _check_version(value: str) -> str:
    parse_version(value)
    return value


def _check_hook(value: str) -> str:
    if not _HOOK_RE.match(value):
        raise ValueError(f"{value!r} is not 'module:function' (like 'agent:handle')")
    return value


def _loc_path(loc: Iterable[int | str], prefix: str = "") -> str:
    """A location as ``intents.summarize.input_schema`` or ``evaluation[1].intent``."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "<root>"


def _check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` if it is a valid JSON Schema (draft 2020-12), else ValueError naming the bad keyword."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"not a valid JSON Schema (draft 2020-12) at {_loc_path(e.path, 'schema')}: "
                         f"{e.message}") from None
    return schema


def _schema_problems(schema: dict[str, Any], data: Any, prefix: str) -> list[str]:
    """Every way ``data`` breaks ``schema``, each as ``path: message``, in path order."""
    errors = Draft202012Validator(schema).iter_errors(data)
    found = sorted((_loc_path(e.absolute_path, prefix), str(e.message)) for e in errors)
    return [f"{where}: {message}" for where, message in found]


# -- the manifest ------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: A parameter value: JSON scalars only, so parameters travel through any payload unchanged.
Scalar = bool | int | float | str
ParameterType = Literal["int", "float", "str", "bool"]


def _type_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is not of parameter type ``kind`` (None if it is). Booleans are not numbers."""
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else f"{value!r} is not of type {kind}"


def _value_problem(kind: str, minimum: float | None, maximum: float | None, choices: list[Any] | None,
                   value: Any) -> str | None:
    """Why ``value`` is not acceptable for a parameter of this type, range and choices (None if it is)."""
    problem = _type_problem(kind, value)
    if problem:
        return problem
    if minimum is not None and value < minimum:
        return f"{value!r} is below the minimum {minimum}"
    if maximum is not None and value > maximum:
        return f"{value!r} is above the maximum {maximum}"
    if choices is not None and value not in choices:
        return f"{value!r} is not one of {choices}"
    return None


class IntentSpec(_Strict):
    """One kind of task the image's agents accept. Inputs are checked against ``input_schema`` before
    the agent sees them, so an agent's code can trust the shape of what it gets."""

    description: str = ""
    input_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="JSON Schema (draft 2020-12) of the task input.")
    output_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the output (None: not checked).")

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """A schema that is itself invalid would reject (or accept) everything: refuse it up front."""
        return None if value is None else _check_schema(value)


class ParameterSpec(_Strict):
    """A knob of the image, set per agent at spawn (and narrowed by ``specialize``).

    ``minimum``/``maximum`` apply to numbers only; ``default`` must itself be acceptable, so an agent
    spawned without overrides always gets valid parameters. Fields are validated in order, so the
    checks of ``default`` see the type, range and choices above it.
    """

    type: ParameterType
    description: str = ""
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: list[Scalar] | None = Field(default=None, description="The only values allowed (None: any in range).")
    default: Scalar

    @field_validator("minimum", "maximum")
    @classmethod
    def _numbers_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        """A range only means something for numbers, and must not be empty."""
        if value is None:
            return None
        kind = info.data.get("type")
        if kind is not None and kind not in ("int", "float"):
            raise ValueError(f"a {kind} parameter has no {info.field_name} (only int and float do)")
        lo = info.data.get("minimum")
        if info.field_name == "maximum" and lo is not None and value < lo:
            raise ValueError(f"maximum {value} is below minimum {lo}")
        return value

    @field_validator("choices")
    @classmethod
    def _choices_fit(cls, value: list[Scalar] | None, info: ValidationInfo) -> list[Scalar] | None:
        """Every choice has the parameter's type and lies in its range."""
        kind = info.data.get("type")
        if value is None or kind is None:
            return value
        if not value:
            raise ValueError("choices must not be empty (leave it out to allow any value)")
        problems = [p for v in value if (p := _value_problem(kind, info.data.get("minimum"),
                                                             info.data.get("maximum"), None, v))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("default")
    @classmethod
    def _default_fits(cls, value: Scalar, info: ValidationInfo) -> Scalar:
        """The default obeys the parameter's own type, range and choices."""
        kind = info.data.get("type")
        if kind is None:
            return value
        problem = _value_problem(kind, info.data.get("minimum"), info.data.get("maximum"),
                                 info.data.get("choices"), value)
        if problem:
            raise ValueError(f"default {problem}")
        return float(value) if kind == "float" else value

    def problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be this parameter's value (None if it can)."""
        return _value_problem(self.type, self.minimum, self.maximum, self.choices, value)


class EvalTask(_Strict):
    """A task with its expected output, used to evaluate an image (and its upgrades).

    ``score``: ``exact`` (the output equals ``expected``), ``contains`` (every key, item or substring
    of ``expected`` is in the output), or None: exact when ``expected`` is given, else the task need
    only succeed with an output its schema accepts.
    """

    intent: str
    description: str = ""
    input: dict[str, Any] = Field(default_factory=dict)
    expected: Any | None = None
    score: Literal["exact", "contains"] | None = None

    @model_validator(mode="after")
    def _score_needs_expected(self) -> Self:
        """A score without an expected output has nothing to compare against."""
        if self.score is not None and self.expected is None:
            raise ValueError(f"score {self.score!r} needs an expected output")
        return self


class StateRules(_Strict):
    """How an agent's state is combined by ``merge`` and divided by ``split``.

    ``merge: union`` unions the list at ``split_key`` (keeping first-seen order) and lets later agents'
    other keys win; ``split: even`` deals the list at ``split_key`` out round-robin. A ``module:function``
    names a hook in the image instead (checked like the entrypoint).
    """

    merge: str = Field(default="union", description="'union' or 'module:function'.")
    split: str = Field(default="even", description="'even' or 'module:function'.")
    split_key: str = Field(default="work_items", min_length=1,
                           description="The list in the state that an even split partitions.")

    @field_validator("merge")
    @classmethod
    def _merge_rule(cls, value: str) -> str:
        return value if value == "union" else _check_hook(value)

    @field_validator("split")
    @classmethod
    def _split_rule(cls, value: str) -> str:
        return value if value == "even" else _check_hook(value)

    def hooks(self) -> dict[str, str]:
        """The state hooks that name code in the image, by their path in the manifest."""
        out = {}
        if self.merge != "union":
            out["state.merge"] = self.merge
        if self.split != "even":
            out["state.split"] = self.split
        return out


#: Context key under which :func:`parse_manifest` says it checks references itself (on the raw data,
#: so that they are listed even when other sections fail to validate).
_REFERENCES_CHECKED = "references_checked"


class ImageRef(_Strict):
    """``name@version`` of an image; accepts and serialises as that string."""

    name: str
    version: str

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        """Accept ``"summarizer@1.0.0"`` as well as ``{"name": ..., "version": ...}``."""
        if isinstance(data, str):
            name, sep, version = data.partition("@")
            if not sep:
                raise ValueError(f"image reference {data!r} is not name@version")
            return {"name": name, "version": version}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return _check_version(value)

    @model_serializer
    def _as_text(self) -> str:
        return str(self)

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """``ImageRef.parse("summarizer@1.0.0")``; pydantic's ValidationError if malformed."""
        return cls.model_validate(text)

    @property
    def semver(self) -> tuple[int, int, int]:
        """The version as numbers, for ordering."""
        return parse_version(self.version)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


class ImageManifest(_Strict):
    """What an image is and offers: ``manifest.yaml`` at its root."""

    name: str = Field(description="Lowercase DNS label.")
    version: str = Field(description="MAJOR.MINOR.PATCH, compared numerically.")
    entrypoint: str = Field(description="'module:function', the module relative to the image root ('agent:handle').")
    description: str = ""
    intents: dict[str, IntentSpec] = Field(min_length=1, description="The kinds of task its agents accept.")
    default_resources: Resources = Field(
        default_factory=Resources, description="What an agent of this image asks for (zero: the level's default).")
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    evaluation: list[EvalTask] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list, description="What its agents can do, for routing.")
    state: StateRules = Field(default_factory=StateRules)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return _check_version(value)

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        return _check_hook(value)

    @field_validator("intents")
    @classmethod
    def _intent_names(cls, value: dict[str, IntentSpec]) -> dict[str, IntentSpec]:
        bad = [k for k in value if not _INTENT_RE.match(k)]
        if bad:
            raise ValueError(f"intent names must be lowercase words (a-z, 0-9, '-', '_'): {bad}")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, value: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        bad = [k for k in value if not _PARAMETER_RE.match(k)]
        if bad:
            raise ValueError(f"parameter names must be lowercase identifiers: {bad}")
        return value

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: list[str]) -> list[str]:
        if any(not c.strip() for c in value):
            raise ValueError("capabilities must not be empty strings")
        if len(set(value)) != len(value):
            raise ValueError(f"capabilities are listed twice: {sorted({c for c in value if value.count(c) > 1})}")
        return value

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> Self:
        """Evaluation tasks name declared intents (unless :func:`parse_manifest` checks that itself)."""
        if not (info.context or {}).get(_REFERENCES_CHECKED):
            problems = reference_problems(self.model_dump(mode="json"))
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @property
    def ref(self) -> ImageRef:
        """``name@version``."""
        return ImageRef(name=self.name, version=self.version)

    @property
    def semver(self) -> tuple[int, int, int]:
        """The version as numbers, for ordering (``1.10.0`` is newer than ``1.9.0``)."""
        return parse_version(self.version)


def reference_problems(data: Any) -> list[str]:
    """Cross-references of a raw manifest: each evaluation task names a declared intent, and its input
    (and exact expected output) satisfy that intent's schemas. Sections of the wrong shape are skipped
    (their shape errors are reported by the model)."""
    if not isinstance(data, dict) or not isinstance(data.get("evaluation"), list):
        return []
    intents = data.get("intents")
    if not isinstance(intents, dict):
        return []
    problems: list[str] = []
    for i, task in enumerate(data["evaluation"]):
        name = task.get("intent") if isinstance(task, dict) else None
        if not isinstance(name, str):
            continue
        if name not in intents:
            declared = ", ".join(sorted(str(k) for k in intents)) or "none"
            problems.append(f"evaluation[{i}].intent: unknown intent {name!r} (declared: {declared})")
            continue
        problems += _eval_schema_problems(i, task, intents[name])
    return problems


def _eval_schema_problems(i: int, task: dict[str, Any], intent: Any) -> list[str]:
    """An evaluation task's input, and its expected output when scored exactly, against the intent's schemas."""
    if not isinstance(intent, dict):
        return []
    out: list[str] = []
    checks = [("input", intent.get("input_schema", {"type": "object"}), task.get("input", {}))]
    if task.get("expected") is not None and task.get("score") in (None, "exact"):
        checks.append(("expected", intent.get("output_schema"), task["expected"]))
    for field, schema, value in checks:
        if not isinstance(schema, dict):
            continue
        try:
            _check_schema(schema)
        except ValueError:
            continue  # reported at the intent
        out += _schema_problems(schema, value, f"evaluation[{i}].{field}")
    return out


def parse_manifest(data: Any, image: str = "<manifest>") -> ImageManifest:
    """Validate a manifest's data; :class:`ImageBadManifest` lists every problem with its path."""
    if not isinstance(data, dict):
        raise ImageBadManifest(f"image {image}: {MANIFEST_FILE} must be a mapping, not {type(data).__name__}",
                               problems=[f"<root>: got {type(data).__name__}"], data={"image": image})
    problems: list[str] = []
    manifest = None
    try:
        manifest = ImageManifest.model_validate(data, context={_REFERENCES_CHECKED: True})
    except ValidationError as e:
        problems += [f"{_loc_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    problems += reference_problems(data)
    if problems or manifest is None:
        first = problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)"
        raise ImageBadManifest(f"image {image}: {MANIFEST_FILE} is invalid ({len(problems)} problem(s)): {first}",
                               problems=problems, data={"image": image})
    return manifest


def load_manifest(root: str | Path, image: str | None = None) -> ImageManifest:
    """Read and validate ``manifest.yaml`` of the image directory ``root``."""
    path = Path(root) / MANIFEST_FILE
    image = image or str(root)
    if path.is_symlink() or not path.is_file():
        raise ImageBadManifest(f"image {image} has no {MANIFEST_FILE}", data={"image": image})
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as e:
        raise ImageBadManifest(f"image {image}: {MANIFEST_FILE} is not valid YAML ({e})".replace("\n", " "),
                               problems=[str(e)], data={"image": image}) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImageBadManifest(f"image {image}: cannot read {MANIFEST_FILE} ({e})", data={"image": image}) from None
    return parse_manifest(data, image)


# -- entrypoints, checked without running anything -----------------------------------------------------


def module_file(root: str | Path, module: str) -> Path | None:
    """The file of dotted ``module`` inside the image (``pkg.mod``: ``pkg/mod.py`` or ``pkg/mod/__init__.py``)."""
    parts = module.split(".")
    base = Path(root).joinpath(*parts[:-1])
    for candidate in (base / f"{parts[-1]}.py", base / parts[-1] / "__init__.py"):
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    return None


def _hook_problem(root: Path, hook: str) -> str | None:
    """Why ``module:function`` does not name a top-level ``def`` in the image (None if it does)."""
    module, _, function = hook.partition(":")
    path = module_file(root, module)
    rel = module.replace(".", "/") + ".py"
    if path is None:
        return f"module {module!r} not found (no {rel} in the image)"
    rel = path.relative_to(root).as_posix()
    try:
        tree = ast.parse(path.read_bytes(), filename=rel)
    except SyntaxError as e:
        return f"{rel} does not parse (line {e.lineno}: {e.msg})"
    except (OSError, ValueError) as e:
        return f"{rel} cannot be read ({e})"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return None
        if isinstance(node, ast.AsyncFunctionDef) and node.name == function:
            return f"{rel}: {function} is `async def`; it must be a plain `def`"
    return f"{rel} has no top-level `def {function}`"


def check_entrypoint(root: str | Path, manifest: ImageManifest, image: str | None = None) -> None:
    """The entrypoint and state hooks each name a top-level ``def`` in a module file of the image."""
    image = image or f"{manifest.ref} ({root})"
    hooks = {"entrypoint": manifest.entrypoint, **manifest.state.hooks()}
    problems = [f"{where}: {p}" for where, hook in hooks.items() if (p := _hook_problem(Path(root), hook))]
    if problems:
        raise ImageBadEntrypoint(f"image {image}: " + "; ".join(problems), problems=problems,
                                 data={"image": image})


def check_image(path: str | Path) -> ImageManifest:
    """The manifest of an image (directory or archive) whose files, manifest and entrypoint are valid.
    Does not look at the signature (see :func:`verify_image`)."""
    with open_image(path) as root:
        _image_files(root, str(path))
        manifest = load_manifest(root, str(path))
        check_entrypoint(root, manifest, f"{manifest.ref} ({path})")
        return manifest


# -- digest ------------------------------------------------------------------------------------------------


def _skipped(rel: PurePosixPath) -> bool:
    """Bytecode caches are not part of an image (Python writes them when the code is imported)."""
    return "__pycache__" in rel.parts or rel.suffix == ".pyc"


def _image_files(root: Path, image: str) -> list[tuple[str, Path]]:
    """Every digested file of the image as (relative POSIX path, path), sorted; symlinks and special files refused."""
    if root.is_symlink() or not root.is_dir():
        raise ImageError(f"image {image}: not a directory", data={"image": image})
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = PurePosixPath(path.relative_to(root).as_posix())
            if _skipped(rel) or str(rel) == SIGNATURE_FILE:
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise ImageError(f"image {image}: {rel} is a symlink (images hold regular files only)",
                                 data={"image": image, "file": str(rel)})
            if stat.S_ISREG(mode):
                out.append((str(rel), path))
            elif not stat.S_ISDIR(mode):
                raise ImageError(f"image {image}: {rel} is not a regular file", data={"image": image, "file": str(rel)})
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    return sorted(out)


def image_digest(root: str | Path) -> str:
    """SHA-256 (hex) of every file of the image directory ``root`` except ``SIGNATURE.json`` and bytecode.

    Files are taken in sorted relative-path order; for each, its POSIX relative path, a NUL, its length
    in decimal, a NUL and its bytes are hashed, so renaming, adding, removing or changing any file
    (by one byte) changes the digest. Symlinks are refused (:class:`ImageError`).
    """
    h = hashlib.sha256()
    for rel, path in _image_files(Path(root), str(root)):
        content = path.read_bytes()
        h.update(rel.encode("utf-8") + b"\0" + str(len(content)).encode("ascii") + b"\0")
        h.update(content)
    return h.hexdigest()


# -- archives ----------------------------------------------------------------------------------------------


def is_archive(path: str | Path) -> bool:
    """True when ``path`` names a ``.tar.gz`` (or ``.tgz``) archive rather than a directory."""
    return str(path).endswith(ARCHIVE_SUFFIXES)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` is unsafe (None if it is a plain file or directory inside the image)."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"{name!r}: absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return f"{name!r}: '..' in path"
    if member.issym() or member.islnk():
        return f"{name!r}: link (to {member.linkname!r})"
    if member.isdev():
        return f"{name!r}: device or fifo"
    if not (member.isfile() or member.isdir()):
        return f"{name!r}: not a regular file or directory"
    return None


def _safe_members(tar: tarfile.TarFile, archive: str) -> list[tuple[PurePosixPath, tarfile.TarInfo]]:
    """The members to extract, each with its relative path; :class:`ImageUnsafeArchive` lists every unsafe one."""
    members = tar.getmembers()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise ImageUnsafeArchive(f"image {archive}: more than {MAX_ARCHIVE_MEMBERS} members", data={"image": archive})
    problems = [p for m in members if (p := _member_problem(m))]
    if problems:
        raise ImageUnsafeArchive(f"image {archive}: unsafe archive members: " + "; ".join(problems),
                                 problems=problems, data={"image": archive})
    out: list[tuple[PurePosixPath, tarfile.TarInfo]] = []
    seen: set[PurePosixPath] = set()
    size = 0
    for m in members:
        rel = PurePosixPath(m.name)
        if not rel.parts or rel == PurePosixPath(".") or _skipped(rel):
            continue
        if m.isfile():
            if rel in seen:
                raise ImageUnsafeArchive(f"image {archive}: {rel} appears twice", data={"image": archive})
            seen.add(rel)
            size += m.size
        out.append((rel, m))
    if size > MAX_ARCHIVE_BYTES:
        raise ImageUnsafeArchive(f"image {archive}: unpacks to more than {MAX_ARCHIVE_BYTES} bytes",
                                 data={"image": archive})
    return out


def _extract(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` (plain files and directories only) and return the image root:
    ``dest`` itself, or its single top-level directory when the manifest is inside one."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for rel, member in _safe_members(tar, str(archive)):
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise ImageUnsafeArchive(f"image {archive}: {rel} has no content", data={"image": str(archive)})
                with source, target.open("xb") as sink:
                    shutil.copyfileobj(source, sink)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ImageError(f"image {archive}: not a readable .tar.gz archive ({e})",
                         data={"image": str(archive)}) from None
    entries = list(dest.iterdir())
    if not (dest / MANIFEST_FILE).exists() and len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Path]:
    """The image directory at ``path``: the directory itself, or an archive unpacked safely into a
    temporary directory that is removed on exit (absolute paths, ``..``, links and devices refused)."""
    p = Path(path)
    if is_archive(p):
        if not p.is_file():
            raise ImageError(f"image {p}: no such archive", data={"image": str(p)})
        with tempfile.TemporaryDirectory(prefix="tetrarch-image-") as tmp:
            yield _extract(p, Path(tmp))
        return
    if p.is_symlink() or not p.is_dir():
        raise ImageError(f"image {p}: no such directory (an image is a directory or a .tar.gz archive of one)",
                         data={"image": str(p)})
    yield p


def pack_image(root: str | Path, archive: str | Path) -> Path:
    """Write the image directory ``root`` (its digested files and signature) as a ``.tar.gz``.

    The archive is reproducible (sorted, zero times and owners) and holds the files at its top level.
    """
    src, out = Path(root), Path(archive)
    if not is_archive(out):
        raise ImageError(f"image {src}: the archive name must end in .tar.gz or .tgz (got {out})",
                         data={"image": str(src)})
    if out.resolve().is_relative_to(src.resolve()):
        raise ImageError(f"image {src}: write the archive outside the image (it would become part of it)",
                         data={"image": str(src)})
    files = _image_files(src, str(src))
    signature = src / SIGNATURE_FILE
    if signature.is_file() and not signature.is_symlink():
        files = sorted([*files, (SIGNATURE_FILE, signature)])
    with out.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in files:
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    return out


# -- keys --------------------------------------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, str]:
    """A new Ed25519 signing key: (private key as unencrypted PKCS8 PEM, public key as 64 hex chars)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, _public_hex(key)


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _private_key(private_pem: bytes, source: str = "private key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeyInvalid(f"{source} is not an unencrypted PEM private key ({e})", level="client") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyInvalid(f"{source} is a {type(key).__name__}, not an Ed25519 key", level="client")
    return key


def public_key_hex(private_pem: bytes) -> str:
    """The public key (64 hex chars) of an Ed25519 private key in PEM."""
    return _public_hex(_private_key(private_pem))


def parse_public_key(text: str, source: str = "public key") -> str:
    """A public key as 64 lowercase hex chars; :class:`KeyInvalid` if it is not one."""
    value = text.strip().lower()
    if not _HEX64_RE.match(value):
        raise KeyInvalid(f"{source} is not an Ed25519 public key (64 hex characters)", level="client")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    except ValueError as e:
        raise KeyInvalid(f"{source} is not an Ed25519 public key ({e})", level="client") from None
    return value


def load_private_key(path: str | Path) -> bytes:
    """The PEM of an Ed25519 private key file (``NAME.key``), checked to be one."""
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise KeyInvalid(f"cannot read private key {path}: {e.strerror}", level="client") from None
    _private_key(pem, f"private key {path}")
    return pem


def load_public_key(path: str | Path) -> str:
    """The public key (hex) in a ``NAME.pub`` file."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyInvalid(f"cannot read public key {path} ({e})", level="client") from None
    return parse_public_key(text, f"public key {path}")


def write_keypair(directory: str | Path, name: str) -> tuple[Path, Path, str]:
    """Generate a key pair as ``NAME.key`` (PEM, mode 0600) and ``NAME.pub`` (hex) in ``directory``;
    never overwrites a key. Returns (key file, public key file, public key hex)."""
    if not _KEY_NAME_RE.match(name):
        raise KeyInvalid(f"key name {name!r} must be letters, digits, '.', '-' or '_'", level="client")
    folder = Path(directory)
    key_path, pub_path = folder / f"{name}.key", folder / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise Conflict(f"{p} already exists; not overwriting a key", level="client")
    pem, public = generate_keypair()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_text(public + "\n")
    return key_path, pub_path, public


# -- signing and verifying ---------------------------------------------------------------------------------


class Signature(_Strict):
    """``SIGNATURE.json``: an Ed25519 signature of the image digest's 32 bytes."""

    digest: str = Field(pattern=_HEX64, description="SHA-256 of the image (see image_digest), hex.")
    signer: str = Field(pattern=_HEX64, description="Ed25519 public key of the signer, hex.")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="Ed25519 signature of the digest bytes, hex.")
    signed_at: datetime


class VerifiedImage(_Strict):
    """An image whose signature, trust, manifest and entrypoint all checked out."""

    manifest: ImageManifest
    digest: str
    signer: str
    signed_at: datetime
    path: Path = Field(description="What was verified: the directory, or the archive.")
    ref: ImageRef

    def policy_ref(self) -> decisions.ImageRef:
        """The image as policy checks see it (name, version, signer)."""
        return decisions.ImageRef(name=self.manifest.name, version=self.manifest.version, signer=self.signer)


def sign_image(root: str | Path, private_pem: bytes, *, now: datetime | None = None) -> Signature:
    """Sign the image directory ``root``: check its manifest and entrypoint, then write ``SIGNATURE.json``.

    Archives are refused: sign the directory, then :func:`pack_image` it.
    """
    if is_archive(root):
        raise ImageError(f"image {root}: sign the image directory, then pack it (archives are not signed in "
                         "place)", data={"image": str(root)})
    key = _private_key(private_pem)
    check_image(root)
    digest = image_digest(root)
    sig = Signature(digest=digest, signer=_public_hex(key), signature=key.sign(bytes.fromhex(digest)).hex(),
                    signed_at=now or datetime.now(UTC))
    (Path(root) / SIGNATURE_FILE).write_text(sig.model_dump_json(indent=2) + "\n")
    return sig


def read_signature(root: str | Path, image: str | None = None) -> Signature:
    """``SIGNATURE.json`` of the image directory ``root``: :class:`ImageUnsigned` if there is none,
    :class:`ImageTampered` if it is malformed."""
    image = image or str(root)
    path = Path(root) / SIGNATURE_FILE
    if path.is_symlink():
        raise ImageError(f"image {image}: {SIGNATURE_FILE} is a symlink", data={"image": image})
    if not path.is_file():
        raise ImageUnsigned(f"image {image} is unsigned (no {SIGNATURE_FILE})", data={"image": image})
    try:
        return Signature.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = [f"{_loc_path(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ImageTampered(f"image {image}: {SIGNATURE_FILE} is malformed: " + "; ".join(problems),
                            problems=problems, data={"image": image}) from None


def _verify_root(root: Path, trusted_signers: frozenset[str] | None, image: str) -> VerifiedImage:
    """Verify the unpacked image directory ``root`` (``image`` names it in messages)."""
    sig = read_signature(root, image)
    digest = image_digest(root)
    data = {"image": image, "digest": digest, "signer": sig.signer}
    if digest != sig.digest:
        raise ImageTampered(f"image {image} changed after it was signed: its digest is {digest}, "
                            f"the signed digest {sig.digest}", data=data)
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig.signer)).verify(
            bytes.fromhex(sig.signature), bytes.fromhex(sig.digest))
    except (InvalidSignature, ValueError):
        raise ImageTampered(f"image {image}: the signature does not verify with its signer's key {sig.signer}",
                            data=data) from None
    if trusted_signers is not None and sig.signer not in {s.strip().lower() for s in trusted_signers}:
        raise ImageUntrusted(f"image {image} is signed by {sig.signer}, which is not one of the "
                             f"{len(trusted_signers)} trusted signer(s)", data=data)
    manifest = load_manifest(root, image)
    check_entrypoint(root, manifest, f"{manifest.ref} ({image})")
    return VerifiedImage(manifest=manifest, digest=digest, signer=sig.signer, signed_at=sig.signed_at,
                         path=root, ref=manifest.ref)


def verify_image(path: str | Path, trusted_signers: frozenset[str] | None = None) -> VerifiedImage:
    """Verify the image directory or archive at ``path``; ``trusted_signers`` None trusts any valid signer.

    Raises, in the order checked: :class:`ImageError`/:class:`ImageUnsafeArchive` (not an image),
    :class:`ImageUnsigned`, :class:`ImageTampered`, :class:`ImageUntrusted`, :class:`ImageBadManifest`,
    :class:`ImageBadEntrypoint`.
    """
    with open_image(path) as root:
        verified = _verify_root(root, trusted_signers, str(path))
    return verified.model_copy(update={"path": Path(path)})


@contextlib.contextmanager
def open_verified(path: str | Path, trusted_signers: frozenset[str] | None = None) -> Iterator[VerifiedImage]:
    """Verify an image and yield it with ``path`` at a private copy of exactly its digested files (and
    signature), removed on exit: what a runtime loads is what was verified, whatever happens to
    ``path`` afterwards, and no bytecode cache left beside the code is ever used."""
    with open_image(path) as root, tempfile.TemporaryDirectory(prefix="tetrarch-verified-") as tmp:
        copy = Path(tmp) / "image"
        files = _image_files(root, str(path))
        for rel, src in [*files, (SIGNATURE_FILE, root / SIGNATURE_FILE)]:
            if src.is_symlink() or not src.is_file():
                continue  # no signature: _verify_root says so
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        copy.mkdir(exist_ok=True)
        yield _verify_root(copy, trusted_signers, str(path))


# -- tasks, parameters and specialization ------------------------------------------------------------------


def _intent(manifest: ImageManifest, intent: str) -> IntentSpec:
    spec = manifest.intents.get(intent)
    if spec is None:
        known = ", ".join(sorted(manifest.intents))
        raise UnknownIntent(f"image {manifest.ref} has no intent {intent!r} (it has: {known})", level="agent",
                            data={"image": str(manifest.ref), "intent": intent})
    return spec


def validate_intent_input(manifest: ImageManifest, intent: str, data: Any) -> None:
    """Check a task's input against its intent's schema: :class:`UnknownIntent` or
    :class:`TaskInputInvalid` (every error with its path, like ``input.sentences``)."""
    spec = _intent(manifest, intent)
    problems = (["input: must be an object"] if not isinstance(data, dict)
                else _schema_problems(spec.input_schema, data, "input"))
    if problems:
        raise TaskInputInvalid(f"task input for intent {intent!r} of image {manifest.ref} is invalid: "
                               + "; ".join(problems), level="agent", problems=problems,
                               data={"image": str(manifest.ref), "intent": intent})


def validate_intent_output(manifest: ImageManifest, intent: str, data: Any) -> None:
    """Check an agent's output against its intent's ``output_schema`` (if it has one)."""
    schema = _intent(manifest, intent).output_schema
    problems = [] if schema is None else _schema_problems(schema, data, "output")
    if problems:
        raise TaskOutputInvalid(f"output for intent {intent!r} of image {manifest.ref} is invalid: "
                                + "; ".join(problems), level="agent", problems=problems,
                                data={"image": str(manifest.ref), "intent": intent})


def _contains(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and all(any(_contains(e, a) for a in actual) for e in expected)
    if isinstance(expected, str) and isinstance(actual, str):
        return expected in actual
    return bool(expected == actual)


def score_eval(task: EvalTask, output: Any) -> bool:
    """Whether ``output`` passes ``task`` (see :class:`EvalTask` for the scores)."""
    if task.expected is None:
        return True
    if task.score == "contains":
        return _contains(task.expected, output)
    return bool(task.expected == output)


def resolve_parameters(manifest: ImageManifest, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The image's parameter defaults with ``overrides`` applied; :class:`ParameterInvalid` lists every
    unknown name, wrong type and out-of-range value. Float parameters come back as floats."""
    out: dict[str, Any] = {name: spec.default for name, spec in manifest.parameters.items()}
    problems: list[str] = []
    for name, value in (overrides or {}).items():
        spec = manifest.parameters.get(name)
        if spec is None:
            known = ", ".join(sorted(manifest.parameters)) or "none"
            problems.append(f"{name}: image {manifest.ref} has no such parameter (it has: {known})")
        elif problem := spec.problem(value):
            problems.append(f"{name}: {problem}")
        else:
            out[name] = float(value) if spec.type == "float" else value
    if problems:
        raise ParameterInvalid(f"parameters for image {manifest.ref} refused: " + "; ".join(problems),
                               level=IMAGE_LEVEL, problems=problems, data={"image": str(manifest.ref)})
    return out


class ParameterRange(_Strict):
    """A tighter range, choice set or default for one parameter (None: keep the image's)."""

    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: list[Scalar] | None = None
    default: Scalar | None = None


class Narrowing(_Strict):
    """What a specialized agent keeps of its image: some of its intents and capabilities, tighter parameters."""

    intents: list[str] | None = Field(default=None, description="Intents kept (None: all).")
    capabilities: list[str] | None = Field(default=None, description="Capabilities kept (None: all).")
    parameters: dict[str, ParameterRange] = Field(default_factory=dict)


def _narrow_parameter(name: str, spec: ParameterSpec, r: ParameterRange,
                      widens: list[str], invalid: list[str]) -> ParameterSpec | None:
    """``spec`` narrowed by ``r``, appending to ``widens``/``invalid`` what is wrong (None then)."""
    where = f"parameters.{name}"
    before = len(widens) + len(invalid)
    if (r.minimum is not None or r.maximum is not None) and spec.type not in ("int", "float"):
        invalid.append(f"{where}: a {spec.type} parameter has no range")
    if r.minimum is not None and spec.minimum is not None and r.minimum < spec.minimum:
        widens.append(f"{where}.minimum: {r.minimum} is below the image's minimum {spec.minimum}")
    if r.maximum is not None and spec.maximum is not None and r.maximum > spec.maximum:
        widens.append(f"{where}.maximum: {r.maximum} is above the image's maximum {spec.maximum}")
    for value in r.choices or []:
        if problem := spec.problem(value):
            widens.append(f"{where}.choices: the image does not allow it: {problem}")
    if r.default is not None and (problem := spec.problem(r.default)):
        widens.append(f"{where}.default: the image does not allow it: {problem}")
    if len(widens) + len(invalid) > before:
        return None
    data = spec.model_dump()
    data.update({k: v for k, v in r.model_dump().items() if v is not None})
    try:
        return ParameterSpec.model_validate(data)
    except ValidationError as e:
        invalid += [f"{_loc_path(err['loc'], where)}: {err['msg']}" for err in e.errors()]
        return None


def narrow(manifest: ImageManifest, narrowing: Narrowing) -> ImageManifest:
    """The manifest as a specialized agent sees it: only the kept intents (and their evaluation tasks)
    and capabilities, tighter parameters. :class:`SpecializeWidens` lists everything that asks for more
    than the image offers; :class:`SpecializeInvalid` what is within it but impossible."""
    widens: list[str] = []
    invalid: list[str] = []
    ref = str(manifest.ref)
    intents = manifest.intents
    if narrowing.intents is not None:
        widens += [f"intents: {i!r} is not an intent of image {ref}" for i in narrowing.intents if i not in intents]
        if not narrowing.intents:
            invalid.append("intents: a specialization must keep at least one intent")
        intents = {k: v for k, v in intents.items() if k in narrowing.intents}
    capabilities = manifest.capabilities
    if narrowing.capabilities is not None:
        widens += [f"capabilities: {c!r} is not a capability of image {ref}"
                   for c in narrowing.capabilities if c not in capabilities]
        capabilities = [c for c in capabilities if c in narrowing.capabilities]
    parameters = dict(manifest.parameters)
    for name, r in narrowing.parameters.items():
        spec = manifest.parameters.get(name)
        if spec is None:
            widens.append(f"parameters.{name}: image {ref} has no such parameter")
        elif (narrowed := _narrow_parameter(name, spec, r, widens, invalid)) is not None:
            parameters[name] = narrowed
    if widens:
        raise SpecializeWidens(f"specialization of image {ref} widens it: " + "; ".join(widens + invalid),
                               level=IMAGE_LEVEL, problems=widens + invalid, data={"image": ref})
    if invalid:
        raise SpecializeInvalid(f"specialization of image {ref} is impossible: " + "; ".join(invalid),
                                level=IMAGE_LEVEL, problems=invalid, data={"image": ref})
    return manifest.model_copy(update={
        "intents": intents, "capabilities": capabilities, "parameters": parameters,
        "evaluation": [t for t in manifest.evaluation if t.intent in intents]})
