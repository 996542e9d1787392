"""``tetrarch image``: make signing keys, sign, verify, inspect and pack agent images (no server needed).

Exit codes follow the rest of the command line: 0 done, 1 refused (the error's code and message are
printed; with ``--json`` as ``{"error": {...}}`` on stdout), 2 bad usage (a bad key, a bad option).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import BaseModel

from tetrarch.errors import TetrarchError
from tetrarch.images import (
    ImageManifest,
    ImageRefused,
    KeyInvalid,
    VerifiedImage,
    check_image,
    is_archive,
    load_private_key,
    load_public_key,
    pack_image,
    parse_public_key,
    sign_image,
    verify_image,
    write_keypair,
)

EXIT_REFUSED = 1
EXIT_USAGE = 2


def _wants_json(flag: bool) -> bool:
    """``--json`` after the command, or before it (``tetrarch --json image ...``, kept on the root's object)."""
    root = click.get_current_context().find_root()
    return flag or bool(getattr(root.obj, "json", False))


def _emit(as_json: bool, value: Any, human: Callable[[], str]) -> None:
    if as_json:
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(human())


def _fail(as_json: bool, exit_code: int, err: TetrarchError) -> NoReturn:
    """Print ``err`` (its code, level, message and problems) and exit with ``exit_code``."""
    if as_json:
        click.echo(json.dumps({"error": {"code": err.code, "level": err.level, "message": err.message,
                                         "problems": err.problems, "data": err.data}}, indent=2))
    else:
        click.echo(f"error [{err.code}]: {err}", err=True)
        for p in err.problems:
            click.echo(f"  - {p}", err=True)
    sys.exit(exit_code)


def json_flag(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json``: machine-readable output (one JSON document on stdout)."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


@click.group("image", context_settings={"help_option_names": ["-h", "--help"]})
def image() -> None:
    """Agent images: make signing keys, sign, verify, inspect and pack images.

    An image is a directory (or a .tar.gz of one) holding manifest.yaml, its Python code and
    SIGNATURE.json."""


@image.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where to write NAME.key and NAME.pub.")
@json_flag
def keygen(name: str, directory: Path, as_json: bool) -> None:
    """Make an Ed25519 signing key: NAME.key (private, mode 0600) and NAME.pub; print the public key."""
    as_json = _wants_json(as_json)
    try:
        key, pub, public = write_keypair(directory, name)
    except KeyInvalid as e:
        _fail(as_json, EXIT_USAGE, e)
    except TetrarchError as e:
        _fail(as_json, EXIT_REFUSED, e)
    _emit(as_json, {"public_key": public, "private_key_file": str(key), "public_key_file": str(pub)},
          lambda: f"{public}\nprivate key: {key} (mode 0600; keep it secret)\npublic key:  {pub}")


@image.command("sign")
@click.argument("path", metavar="IMAGE", type=click.Path(exists=True, path_type=Path))
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Private key file (NAME.key from `tetrarch image keygen`).")
@json_flag
def sign(path: Path, key_file: Path, as_json: bool) -> None:
    """Sign the image directory IMAGE: check it, then write IMAGE/SIGNATURE.json.

    Archives are refused: sign the directory, then `tetrarch image pack` it."""
    as_json = _wants_json(as_json)
    if is_archive(path) or not path.is_dir():
        _fail(as_json, EXIT_USAGE, ImageRefused(
            f"image {path}: only an image directory can be signed; sign the directory, then "
            "`tetrarch image pack` it", level="client"))
    try:
        pem = load_private_key(key_file)
    except TetrarchError as e:
        _fail(as_json, EXIT_USAGE, e)
    try:
        manifest = check_image(path)
        sig = sign_image(path, pem)
    except TetrarchError as e:
        _fail(as_json, EXIT_REFUSED, e)
    out = {"image": str(manifest.ref), "path": str(path), **sig.model_dump(mode="json")}
    _emit(as_json, out, lambda: f"signed {manifest.ref}\ndigest  {sig.digest}\nsigner  {sig.signer}")


def _trusted(trust: tuple[str, ...], trust_files: tuple[Path, ...]) -> frozenset[str] | None:
    """The trusted signers from --trust and --trust-file (None when neither is given: any valid signer)."""
    if not trust and not trust_files:
        return None
    keys = [parse_public_key(t, f"--trust {t!r}") for t in trust]
    keys += [load_public_key(f) for f in trust_files]
    return frozenset(keys)


def _verified_human(v: VerifiedImage, trusted: frozenset[str] | None) -> str:
    trust = "a trusted signer" if trusted is not None else "any valid signer (no --trust given)"
    return "\n".join([str(v.ref), f"digest  {v.digest}", f"signer  {v.signer}", f"signed  {v.signed_at.isoformat()}",
                      f"OK: signed by {trust}"])


@image.command("verify")
@click.argument("path", metavar="IMAGE", type=click.Path(exists=True, path_type=Path))
@click.option("--trust", multiple=True, metavar="HEX", help="A trusted signer's public key (repeatable).")
@click.option("--trust-file", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file holding a trusted public key, like NAME.pub (repeatable).")
@json_flag
def verify(path: Path, trust: tuple[str, ...], trust_file: tuple[Path, ...], as_json: bool) -> None:
    """Verify IMAGE (a directory or .tar.gz): signature, digest, signer, manifest and entrypoint.

    Without --trust/--trust-file any valid signer is accepted; with them, only those signers."""
    as_json = _wants_json(as_json)
    try:
        trusted = _trusted(trust, trust_file)
    except TetrarchError as e:
        _fail(as_json, EXIT_USAGE, e)
    try:
        v = verify_image(path, trusted)
    except TetrarchError as e:
        _fail(as_json, EXIT_REFUSED, e)
    out = {"ok": True, "image": str(v.ref), "digest": v.digest, "signer": v.signer,
           "signed_at": v.signed_at.isoformat(), "path": str(path), "trusted_signers_checked": trusted is not None}
    _emit(as_json, out, lambda: _verified_human(v, trusted))


def _signature_status(path: Path) -> dict[str, Any]:
    """Whether the image is signed and the signature holds (without a trusted set)."""
    try:
        v = verify_image(path)
    except TetrarchError as e:
        return {"status": "unsigned" if e.code == "ImageUnsigned" else "invalid", "code": e.code,
                "message": e.message}
    return {"status": "valid", "digest": v.digest, "signer": v.signer, "signed_at": v.signed_at.isoformat()}


def _schema_fields(schema: dict[str, Any]) -> str:
    """``text (string, required), sentences (integer)`` for an object schema."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        return str(schema.get("type", "any"))
    required = set(schema.get("required", []))
    fields = []
    for name, spec in props.items():
        kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
        fields.append(f"{name} ({kind}{', required' if name in required else ''})")
    return ", ".join(fields)


def _inspect_human(m: ImageManifest, sig: dict[str, Any]) -> str:
    signed = {"valid": f"valid, signer {sig.get('signer')}", "unsigned": "unsigned"}.get(
        sig["status"], f"INVALID [{sig.get('code')}]: {sig.get('message')}")
    lines = [f"{m.ref}  {m.description}".rstrip(),
             f"entrypoint         {m.entrypoint}",
             f"default resources  {m.default_resources.human()}",
             f"capabilities       {', '.join(m.capabilities) or '-'}",
             f"state              merge {m.state.merge}, split {m.state.split} on {m.state.split_key!r}",
             f"signature          {signed}",
             "", "intents:"]
    for name, intent in m.intents.items():
        lines.append(f"  {name}: {intent.description}".rstrip())
        lines.append(f"    input: {_schema_fields(intent.input_schema)}")
        if intent.output_schema is not None:
            lines.append(f"    output: {_schema_fields(intent.output_schema)}")
    lines.append("parameters:" if m.parameters else "parameters: none")
    for name, p in m.parameters.items():
        bounds = "" if p.minimum is None and p.maximum is None else \
            f"  range {'' if p.minimum is None else p.minimum}..{'' if p.maximum is None else p.maximum}"
        choices = f"  choices {p.choices}" if p.choices is not None else ""
        lines.append(f"  {name}: {p.type}  default {p.default!r}{bounds}{choices}  {p.description}".rstrip())
    lines.append(f"evaluation: {len(m.evaluation)} task(s)")
    return "\n".join(lines)


@image.command("inspect")
@click.argument("path", metavar="IMAGE", type=click.Path(exists=True, path_type=Path))
@json_flag
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show IMAGE's manifest: intents, parameters, default resources, state rules, signature status.

    Exit 1 if the manifest or entrypoint is invalid (an unsigned image is shown, not refused)."""
    as_json = _wants_json(as_json)
    try:
        m = check_image(path)
    except TetrarchError as e:
        _fail(as_json, EXIT_REFUSED, e)
    sig = _signature_status(path)
    out = {"image": str(m.ref), "path": str(path), "signature": sig, "manifest": m.model_dump(mode="json")}
    _emit(as_json, out, lambda: _inspect_human(m, sig))


@image.command("pack")
@click.argument("path", metavar="IMAGE", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@json_flag
def pack(path: Path, archive: Path, as_json: bool) -> None:
    """Pack the image directory IMAGE (with its signature) into ARCHIVE (.tar.gz)."""
    as_json = _wants_json(as_json)
    try:
        m = check_image(path)
        out = pack_image(path, archive)
    except TetrarchError as e:
        _fail(as_json, EXIT_REFUSED, e)
    _emit(as_json, {"image": str(m.ref), "archive": str(out)}, lambda: f"packed {m.ref} into {out}")
