"""Signed agent images: digests, signing and every refusal of verification, manifests with every problem
listed, archives, intents, parameters, narrowing, the example images' agents and the ``image`` CLI."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tetrarch.images import (
    SIGNATURE_FILE,
    ImageBadEntrypoint,
    ImageBadManifest,
    ImageError,
    ImageManifest,
    ImageRef,
    ImageRefused,
    ImageTampered,
    ImageUnsafeArchive,
    ImageUnsigned,
    ImageUntrusted,
    Narrowing,
    ParameterInvalid,
    ParameterRange,
    Signature,
    SpecializeInvalid,
    SpecializeWidens,
    TaskInputInvalid,
    TaskOutputInvalid,
    UnknownIntent,
    check_image,
    generate_keypair,
    image_digest,
    load_manifest,
    load_private_key,
    narrow,
    open_image,
    open_verified,
    pack_image,
    parse_manifest,
    public_key_hex,
    resolve_parameters,
    score_eval,
    sign_image,
    validate_intent_input,
    validate_intent_output,
    verify_image,
)
from tetrarch.resources import Resources
from tetrarch_cli.image_cli import image as image_cli

IMAGES = Path(__file__).resolve().parents[2] / "images"
EXAMPLES = ("summarizer", "calculator", "router")
DEMO_PUB = (IMAGES / "demo-key.pub").read_text().strip()

HANDLER = "def handle(request):\n    return {'output': {'echo': request['input']}}\n"
MINIMAL: dict[str, Any] = {
    "name": "echo", "version": "0.1.0", "entrypoint": "agent:handle",
    "intents": {"echo": {"input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}},
}


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    return generate_keypair()


@pytest.fixture(scope="module")
def other_key() -> tuple[bytes, str]:
    return generate_keypair()


def copy_example(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(IMAGES / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")))


def write_image(root: Path, manifest: dict[str, Any] | str = MINIMAL, code: str = HANDLER) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    (root / "manifest.yaml").write_text(text)
    (root / "agent.py").write_text(code)
    return root


def force_sign(root: Path, private_pem: bytes) -> None:
    """Sign without sign_image's checks, to get broken images that are validly signed."""
    key = load_pem_private_key(private_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    digest = image_digest(root)
    sig = Signature(digest=digest, signer=public_key_hex(private_pem), signature=key.sign(bytes.fromhex(digest)).hex(),
                    signed_at=datetime.now(UTC))
    (root / SIGNATURE_FILE).write_text(sig.model_dump_json())


def refusal(exc_type: type[ImageRefused], path: Path, trusted: frozenset[str] | None = None) -> ImageRefused:
    with pytest.raises(exc_type) as exc:
        verify_image(path, trusted)
    err = exc.value
    assert err.code == exc_type.__name__
    assert err.level == "supervisor"
    assert str(path) in err.message, "every refusal names the image"
    return err


def load_agent(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    spec = importlib.util.spec_from_file_location(f"image_{name}_agent", IMAGES / name / "agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the example images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_committed_signatures_verify_with_the_demo_key(name: str):
    v = verify_image(IMAGES / name, frozenset({DEMO_PUB}))
    assert str(v.ref) == f"{name}@1.0.0"
    assert v.signer == DEMO_PUB
    assert v.digest == image_digest(IMAGES / name)
    assert v.policy_ref().ref == f"{name}@1.0.0" and v.policy_ref().signer == DEMO_PUB


def test_demo_key_pair_matches():
    assert public_key_hex(load_private_key(IMAGES / "demo-key.key")) == DEMO_PUB


@pytest.mark.parametrize("name", EXAMPLES)
def test_sign_then_verify_round_trip(tmp_path: Path, name: str, key: tuple[bytes, str]):
    root = copy_example(tmp_path, name)
    pem, pub = key
    sig = sign_image(root, pem)
    assert sig.signer == pub and sig.digest == image_digest(root)
    assert Signature.model_validate_json((root / SIGNATURE_FILE).read_text()) == sig
    v = verify_image(root, frozenset({pub}))
    assert v.signer == pub and v.path == root and v.manifest.name == name


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_agents_pass_their_evaluation(name: str, monkeypatch: pytest.MonkeyPatch):
    manifest = load_manifest(IMAGES / name)
    agent = load_agent(name, monkeypatch)
    params = resolve_parameters(manifest)
    assert manifest.evaluation
    for task in manifest.evaluation:
        validate_intent_input(manifest, task.intent, task.input)
        result = agent.handle({"intent": task.intent, "input": task.input, "params": params, "state": {}})
        validate_intent_output(manifest, task.intent, result["output"])
        json.dumps(result)  # the whole result is JSON
        assert score_eval(task, result["output"]), (task, result)


def test_summarizer_keeps_top_sentences_in_order_and_tracks_work(monkeypatch: pytest.MonkeyPatch):
    agent = load_agent("summarizer", monkeypatch)
    text = "Cats purr. Dogs bark loudly at cats. Cats chase cats and mice. The sky is blue."
    out = agent.handle({"intent": "summarize", "input": {"text": text, "sentences": 2, "document_id": "d1"},
                        "params": {"max_sentences": 3}, "state": {"work_items": ["d0"]}})
    assert out["output"]["sentences"] == ["Cats purr.", "Cats chase cats and mice."]
    assert out["state"]["work_items"] == ["d0", "d1"]
    capped = agent.handle({"intent": "summarize", "input": {"text": text, "sentences": 4},
                           "params": {"max_sentences": 1}, "state": {}})
    assert len(capped["output"]["sentences"]) == 1
    with pytest.raises(ValueError, match="unknown intent"):
        agent.handle({"intent": "translate", "input": {}, "params": {}, "state": {}})


def test_calculator_refuses_everything_but_arithmetic(monkeypatch: pytest.MonkeyPatch):
    agent = load_agent("calculator", monkeypatch)

    def calc(expression: str, **params: Any) -> Any:
        return agent.handle({"intent": "evaluate", "input": {"expression": expression}, "params": params,
                             "state": {}})["output"]["value"]

    assert calc("2 ** 10") == 1024
    assert calc("-(3 - 5) * 2.5") == 5.0
    for bad, why in [("__import__('os')", "calls"), ("x + 1", "names"), ("(1).real", "attributes"),
                     ("[1, 2]", "not allowed"), ("1 if 1 else 2", "not allowed"), ("1 / 0", "division by zero"),
                     ("2 ** 101", "exponent"), ("9 ** 9 ** 9", "exponent"), ("1e308 * 10", "finite"),
                     ("1 +", "not an arithmetic"), ("-" * 300 + "1", "nested"), ("'a' * 3", "str literals")]:
        with pytest.raises(ValueError, match=why):
            calc(bad)
    with pytest.raises(ValueError, match="exponent"):
        calc("2 ** 20", max_exponent=10)


def test_router_defaults_custom_capabilities_and_fallback(monkeypatch: pytest.MonkeyPatch):
    agent = load_agent("router", monkeypatch)

    def route(text: str, **extra: Any) -> Any:
        return agent.handle({"intent": "route", "input": {"text": text, **extra}, "params": {"fallback": "human"},
                             "state": {}})["output"]

    assert route("Can you give me the tl;dr of this?")["capability"] == "summarize"
    assert route("nothing relevant") == {"capability": "human", "score": 0, "matched": []}
    assert route("refund please", capabilities={"billing": ["refund"]})["capability"] == "billing"


# -- digest --------------------------------------------------------------------------------------------------


def test_digest_ignores_signature_and_bytecode_but_not_content(tmp_path: Path):
    root = write_image(tmp_path / "img")
    before = image_digest(root)
    (root / SIGNATURE_FILE).write_text("{}")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"\0")
    assert image_digest(root) == before
    (root / "sub").mkdir()
    (root / "sub" / SIGNATURE_FILE).write_text("{}")  # only the root's signature is left out
    assert image_digest(root) != before


def test_digest_tells_a_rename_from_moved_bytes(tmp_path: Path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "x").write_bytes(b"12")
    (a / "y").write_bytes(b"3")
    b = tmp_path / "b"
    b.mkdir()
    (b / "x").write_bytes(b"1")
    (b / "y").write_bytes(b"23")
    assert image_digest(a) != image_digest(b)


@pytest.fixture(scope="module")
def property_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("property") / "img"
    write_image(root)
    (root / "pkg").mkdir()
    (root / "pkg" / "data.bin").write_bytes(bytes(range(256)))
    yield root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file_index=st.integers(min_value=0), offset=st.integers(min_value=0), delta=st.integers(1, 255))
def test_any_single_byte_change_changes_the_digest(property_image: Path, file_index: int, offset: int, delta: int):
    files = sorted(p for p in property_image.rglob("*") if p.is_file())
    path = files[file_index % len(files)]
    original = path.read_bytes()
    before = image_digest(property_image)
    i = offset % len(original)
    changed = bytearray(original)
    changed[i] = (changed[i] + delta) % 256
    try:
        path.write_bytes(bytes(changed))
        assert image_digest(property_image) != before
    finally:
        path.write_bytes(original)
    assert image_digest(property_image) == before


def test_symlinks_are_refused(tmp_path: Path):
    root = write_image(tmp_path / "img")
    os.symlink(root / "agent.py", root / "link.py")
    with pytest.raises(ImageError, match=r"link\.py is a symlink") as exc:
        image_digest(root)
    assert exc.value.code == "ImageError" and exc.value.level == "supervisor"


# -- refusals ------------------------------------------------------------------------------------------------


def test_unsigned(tmp_path: Path):
    root = write_image(tmp_path / "img")
    err = refusal(ImageUnsigned, root)
    assert "unsigned" in err.message


def test_untrusted_signer(tmp_path: Path, key: tuple[bytes, str], other_key: tuple[bytes, str]):
    root = write_image(tmp_path / "img")
    sign_image(root, key[0])
    err = refusal(ImageUntrusted, root, frozenset({other_key[1]}))
    assert key[1] in err.message
    assert verify_image(root, None).signer == key[1]  # None: any valid signer
    assert verify_image(root, frozenset({key[1].upper()})).signer == key[1]


def _change_byte(root: Path) -> None:
    code = bytearray((root / "agent.py").read_bytes())
    code[-2] ^= 1
    (root / "agent.py").write_bytes(bytes(code))


@pytest.mark.parametrize("tamper", [
    pytest.param(_change_byte, id="one-byte-changed"),
    pytest.param(lambda r: (r / "extra.py").write_text("x = 1\n"), id="file-added"),
    pytest.param(lambda r: (r / "helper.py").unlink(), id="file-removed"),
    pytest.param(lambda r: (r / "helper.py").rename(r / "helpers.py"), id="file-renamed"),
    pytest.param(lambda r: (r / "manifest.yaml").write_text((r / "manifest.yaml").read_text() + "\n"),
                 id="manifest-changed"),
])
def test_tampered_after_signing(tmp_path: Path, key: tuple[bytes, str], tamper: Any):
    root = write_image(tmp_path / "img")
    (root / "helper.py").write_text("HELP = 1\n")
    sign_image(root, key[0])
    tamper(root)
    err = refusal(ImageTampered, root, frozenset({key[1]}))
    assert "changed after it was signed" in err.message


def test_signature_that_does_not_verify(tmp_path: Path, key: tuple[bytes, str], other_key: tuple[bytes, str]):
    root = write_image(tmp_path / "img")
    sig = sign_image(root, key[0])
    forged = sig.model_copy(update={"signer": other_key[1]})  # claims another signer
    (root / SIGNATURE_FILE).write_text(forged.model_dump_json())
    err = refusal(ImageTampered, root)
    assert "does not verify" in err.message
    (root / SIGNATURE_FILE).write_text('{"digest": "nope"}')
    assert "malformed" in refusal(ImageTampered, root).message


def test_manifest_that_is_not_yaml(tmp_path: Path, key: tuple[bytes, str]):
    root = write_image(tmp_path / "img", "name: [unclosed\n")
    force_sign(root, key[0])
    err = refusal(ImageBadManifest, root)
    assert "not valid YAML" in err.message and err.problems
    with pytest.raises(ImageBadManifest):
        sign_image(root, key[0])  # never signs a broken image


def test_manifest_missing(tmp_path: Path, key: tuple[bytes, str]):
    root = write_image(tmp_path / "img")
    (root / "manifest.yaml").unlink()
    force_sign(root, key[0])
    assert "no manifest.yaml" in refusal(ImageBadManifest, root).message


def test_manifest_schema_problems_are_all_listed(tmp_path: Path, key: tuple[bytes, str]):
    manifest = {
        "name": "Bad_Name", "version": "1.2", "entrypoint": "agent:handle", "colour": "blue",
        "intents": {"echo": {"input_schema": {"type": "strin"}},
                    "ok": {"input_schema": {"type": "object", "required": ["n"]}}},
        "parameters": {"n": {"type": "int", "minimum": 1, "maximum": 10, "default": 50},
                       "s": {"type": "str", "minimum": 1, "default": "x"}},
        "evaluation": [{"intent": "nope", "input": {}}, {"intent": "ok", "input": {}}],
        "default_resources": {"cpu": "lots"},
    }
    root = write_image(tmp_path / "img", manifest)
    force_sign(root, key[0])
    err = refusal(ImageBadManifest, root)
    where = {p.split(": ", 1)[0] for p in err.problems}
    assert {"name", "version", "colour", "intents.echo.input_schema", "parameters.n.default",
            "parameters.s.minimum", "evaluation[0].intent", "evaluation[1].input", "default_resources.cpu"} <= where
    assert any("unknown intent 'nope'" in p for p in err.problems)
    assert any("'n' is a required property" in p for p in err.problems)
    assert any("above the maximum 10" in p for p in err.problems)
    assert f"({len(err.problems)} problem(s))" in err.message


def test_manifest_models_check_references_when_built_directly():
    with pytest.raises(ValueError, match="unknown intent 'nope'"):
        ImageManifest.model_validate({**MINIMAL, "evaluation": [{"intent": "nope"}]})
    with pytest.raises(ImageBadManifest, match="must be a mapping"):
        parse_manifest(["a list"])


@pytest.mark.parametrize(("entrypoint", "code", "match"), [
    ("missing:handle", HANDLER, r"module 'missing' not found \(no missing\.py"),
    ("agent:run", HANDLER, r"agent\.py has no top-level `def run`"),
    ("agent:handle", "class X:\n    def handle(self):\n        pass\n", "no top-level `def handle`"),
    ("agent:handle", "handle = print\n", "no top-level `def handle`"),
    ("agent:handle", "async def handle(request):\n    return {}\n", "async def"),
    ("agent:handle", "def handle(request:\n", "does not parse"),
])
def test_bad_entrypoint(tmp_path: Path, key: tuple[bytes, str], entrypoint: str, code: str, match: str):
    root = write_image(tmp_path / "img", {**MINIMAL, "entrypoint": entrypoint}, code)
    force_sign(root, key[0])
    err = refusal(ImageBadEntrypoint, root)
    assert err.message.startswith(f"image echo@0.1.0 ({root})")
    assert any(p.startswith("entrypoint: ") for p in err.problems)
    with pytest.raises(ImageBadEntrypoint, match=match):
        check_image(root)


def test_state_hooks_are_checked_like_the_entrypoint(tmp_path: Path, key: tuple[bytes, str]):
    root = write_image(tmp_path / "img", {**MINIMAL, "state": {"merge": "agent:merge", "split": "hooks.split:deal"}})
    force_sign(root, key[0])
    err = refusal(ImageBadEntrypoint, root)
    assert [p.split(":")[0] for p in err.problems] == ["state.merge", "state.split"]
    (root / "agent.py").write_text(HANDLER + "def merge(states):\n    return {}\n")
    (root / "hooks").mkdir()
    (root / "hooks" / "split.py").write_text("def deal(state, n):\n    return [state] * n\n")
    sign_image(root, key[0])
    assert verify_image(root).manifest.state.split == "hooks.split:deal"


def test_image_code_is_never_executed(tmp_path: Path, key: tuple[bytes, str]):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n" + HANDLER
    root = write_image(tmp_path / "img", code=code)
    sign_image(root, key[0])
    verify_image(root)
    assert not marker.exists()


# -- archives ------------------------------------------------------------------------------------------------


def test_archive_verifies_and_unpacks_safely(tmp_path: Path):
    archive = pack_image(IMAGES / "summarizer", tmp_path / "summarizer.tar.gz")
    v = verify_image(archive, frozenset({DEMO_PUB}))
    assert v.path == archive and str(v.ref) == "summarizer@1.0.0"
    with open_image(archive) as root:
        assert (root / "manifest.yaml").is_file() and (root / SIGNATURE_FILE).is_file()
        unpacked = root
    assert not unpacked.exists(), "the unpacked copy is removed"
    assert pack_image(IMAGES / "summarizer", tmp_path / "again.tar.gz").read_bytes() == archive.read_bytes()


def test_archive_with_a_top_level_directory(tmp_path: Path):
    archive = tmp_path / "calc.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(IMAGES / "calculator", arcname="calculator", filter=lambda t: None if "__pycache__" in t.name else t)
    assert str(verify_image(archive, frozenset({DEMO_PUB})).ref) == "calculator@1.0.0"


def test_tampered_archive(tmp_path: Path):
    src = copy_example(tmp_path, "router")
    (src / "agent.py").write_text((src / "agent.py").read_text().replace("general", "generał"))
    archive = pack_image(src, tmp_path / "router.tar.gz")
    refusal(ImageTampered, archive)


def _archive(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(("member", "content", "match"), [
    (_member("../evil.py"), b"x", "'..' in path"),
    (_member("sub/../../evil.py"), b"x", "'..' in path"),
    (_member("/etc/evil.py"), b"x", "absolute path"),
    (_member("link.py", tarfile.SYMTYPE, "/etc/passwd"), None, "link"),
    (_member("hard.py", tarfile.LNKTYPE, "manifest.yaml"), None, "link"),
    (_member("dev", tarfile.CHRTYPE), None, "device"),
    (_member("pipe", tarfile.FIFOTYPE), None, "device"),
])
def test_unsafe_archives_are_refused(tmp_path: Path, member: tarfile.TarInfo, content: bytes | None, match: str):
    archive = _archive(tmp_path / "evil.tar.gz", (_member("manifest.yaml"), yaml.safe_dump(MINIMAL).encode()),
                       (member, content))
    err = refusal(ImageUnsafeArchive, archive)
    assert match in err.message and err.problems
    assert not (tmp_path / "evil.py").exists()


def test_not_an_archive_or_directory(tmp_path: Path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"not gzip")
    refusal(ImageError, bogus)
    refusal(ImageError, tmp_path / "missing")
    with pytest.raises(ImageError, match="sign the image directory"):
        sign_image(bogus, generate_keypair()[0])


def test_open_verified_copies_only_what_was_verified(tmp_path: Path):
    root = copy_example(tmp_path, "calculator")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"stale")
    with open_verified(root, frozenset({DEMO_PUB})) as v:
        files = sorted(p.relative_to(v.path).as_posix() for p in v.path.rglob("*"))
        assert files == ["SIGNATURE.json", "agent.py", "manifest.yaml"]
        copy = v.path
    assert not copy.exists()


# -- intents, parameters, narrowing --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def summarizer() -> ImageManifest:
    return load_manifest(IMAGES / "summarizer")


def test_intent_input_validation(summarizer: ImageManifest):
    validate_intent_input(summarizer, "summarize", {"text": "Hello there.", "sentences": 2})
    with pytest.raises(TaskInputInvalid) as exc:
        validate_intent_input(summarizer, "summarize", {"text": "Hi.", "sentences": 0, "colour": 1})
    err = exc.value
    assert err.code == "TaskInputInvalid" and err.level == "agent"
    assert "input.sentences: 0 is less than the minimum of 1" in err.message
    assert "summarizer@1.0.0" in err.message and len(err.problems) == 2
    with pytest.raises(TaskInputInvalid, match="input: 'text' is a required property"):
        validate_intent_input(summarizer, "summarize", {})
    with pytest.raises(UnknownIntent, match="has no intent 'translate'") as unknown:
        validate_intent_input(summarizer, "translate", {})
    assert unknown.value.code == "UnknownIntent" and unknown.value.level == "agent"


def test_nested_input_paths_and_outputs():
    router = load_manifest(IMAGES / "router")
    with pytest.raises(TaskInputInvalid, match=r"input\.capabilities\.billing\[1\]: 2 is not of type 'string'"):
        validate_intent_input(router, "route", {"text": "x", "capabilities": {"billing": ["refund", 2]}})
    with pytest.raises(TaskOutputInvalid, match="output: 'capability' is a required property"):
        validate_intent_output(router, "route", {"score": 1})


def test_parameters_resolve(summarizer: ImageManifest):
    assert resolve_parameters(summarizer) == {"max_sentences": 3}
    assert resolve_parameters(summarizer, {"max_sentences": 20}) == {"max_sentences": 20}
    with pytest.raises(ParameterInvalid) as exc:
        resolve_parameters(summarizer, {"max_sentences": 21, "colour": "blue"})
    assert exc.value.code == "ParameterInvalid" and len(exc.value.problems) == 2
    assert "max_sentences: 21 is above the maximum 20" in exc.value.problems
    for bad in ("3", True, 2.5, None):
        with pytest.raises(ParameterInvalid, match="is not of type int"):
            resolve_parameters(summarizer, {"max_sentences": bad})


def test_parameter_types_and_choices():
    manifest = ImageManifest.model_validate({**MINIMAL, "parameters": {
        "ratio": {"type": "float", "minimum": 0, "maximum": 1, "default": 0},
        "mode": {"type": "str", "choices": ["fast", "slow"], "default": "fast"},
        "on": {"type": "bool", "default": False}}})
    assert resolve_parameters(manifest, {"ratio": 1}) == {"ratio": 1.0, "mode": "fast", "on": False}
    assert isinstance(resolve_parameters(manifest)["ratio"], float)
    with pytest.raises(ParameterInvalid, match="not one of"):
        resolve_parameters(manifest, {"mode": "medium"})
    with pytest.raises(ParameterInvalid, match="not of type bool"):
        resolve_parameters(manifest, {"on": 1})
    with pytest.raises(ValueError, match="not one of"):
        ImageManifest.model_validate({**MINIMAL, "parameters": {
            "mode": {"type": "str", "choices": ["a"], "default": "b"}}})


def test_narrow_keeps_a_subset(summarizer: ImageManifest):
    n = narrow(summarizer, Narrowing(intents=["summarize"], capabilities=[],
                                     parameters={"max_sentences": ParameterRange(minimum=2, maximum=5)}))
    p = n.parameters["max_sentences"]
    assert (p.minimum, p.maximum, p.default) == (2, 5, 3)
    assert n.capabilities == [] and len(n.evaluation) == len(summarizer.evaluation)
    assert narrow(summarizer, Narrowing()) == summarizer
    with pytest.raises(ParameterInvalid):
        resolve_parameters(n, {"max_sentences": 6})


@pytest.mark.parametrize(("narrowing", "error", "match"), [
    (Narrowing(intents=["translate"]), SpecializeWidens, "'translate' is not an intent"),
    (Narrowing(capabilities=["fly"]), SpecializeWidens, "'fly' is not a capability"),
    (Narrowing(parameters={"max_sentences": ParameterRange(maximum=30)}), SpecializeWidens, "above the image's max"),
    (Narrowing(parameters={"max_sentences": ParameterRange(minimum=0)}), SpecializeWidens, "below the image's min"),
    (Narrowing(parameters={"max_sentences": ParameterRange(choices=[1, 50])}), SpecializeWidens, "does not allow"),
    (Narrowing(parameters={"temperature": ParameterRange(maximum=1)}), SpecializeWidens, "no such parameter"),
    (Narrowing(intents=[]), SpecializeInvalid, "at least one intent"),
    (Narrowing(parameters={"max_sentences": ParameterRange(minimum=5, maximum=8)}), SpecializeInvalid,
     "default 3 is below the minimum 5"),
    (Narrowing(parameters={"max_sentences": ParameterRange(minimum=6, maximum=5)}), SpecializeInvalid, "below minimum"),
])
def test_narrow_refuses(summarizer: ImageManifest, narrowing: Narrowing, error: type[Exception], match: str):
    with pytest.raises(error, match=match) as exc:
        narrow(summarizer, narrowing)
    assert getattr(exc.value, "code", None) == error.__name__


def test_narrowed_default_may_be_given(summarizer: ImageManifest):
    n = narrow(summarizer, Narrowing(parameters={"max_sentences": ParameterRange(minimum=5, maximum=8, default=6)}))
    assert resolve_parameters(n) == {"max_sentences": 6}


def test_refs_and_versions(summarizer: ImageManifest):
    ref = ImageRef.parse("summarizer@1.10.0")
    assert str(ref) == "summarizer@1.10.0" and ref.semver > summarizer.semver == (1, 0, 0)
    assert ImageRef.parse("a@1.9.0").semver < ImageRef.parse("a@1.10.0").semver
    assert ref.model_dump_json() == '"summarizer@1.10.0"' and ImageRef.model_validate_json(ref.model_dump_json()) == ref
    for bad in ("summarizer", "Summarizer@1.0.0", "summarizer@1.0", "summarizer@01.0.0"):
        with pytest.raises(ValueError):
            ImageRef.parse(bad)
    assert summarizer.default_resources == Resources.of(cpu=0.5, memory="256Mi")


# -- the command line ----------------------------------------------------------------------------------------


def test_cli_keygen_sign_verify_inspect(tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(image_cli, ["keygen", "me", "--dir", str(tmp_path / "keys")])
    assert r.exit_code == 0, r.output
    pub = (tmp_path / "keys" / "me.pub").read_text().strip()
    assert r.output.splitlines()[0] == pub
    assert (tmp_path / "keys" / "me.key").stat().st_mode & 0o777 == 0o600
    assert runner.invoke(image_cli, ["keygen", "me", "--dir", str(tmp_path / "keys")]).exit_code == 1

    root = copy_example(tmp_path, "calculator")
    (root / SIGNATURE_FILE).unlink()
    r = runner.invoke(image_cli, ["verify", str(root)])
    assert r.exit_code == 1 and "ImageUnsigned" in r.output
    r = runner.invoke(image_cli, ["sign", str(root), "--key", str(tmp_path / "keys" / "me.key")])
    assert r.exit_code == 0 and "signed calculator@1.0.0" in r.output, r.output

    r = runner.invoke(image_cli, ["verify", str(root), "--trust", pub])
    assert r.exit_code == 0 and "calculator@1.0.0" in r.output and pub in r.output and "OK" in r.output
    r = runner.invoke(image_cli, ["verify", str(root), "--trust-file", str(IMAGES / "demo-key.pub")])
    assert r.exit_code == 1 and "error [ImageUntrusted]" in r.output
    r = runner.invoke(image_cli, ["verify", str(root), "--trust-file", str(tmp_path / "keys" / "me.pub"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["signer"] == pub

    r = runner.invoke(image_cli, ["inspect", str(root)])
    assert r.exit_code == 0 and "evaluate" in r.output and "max_exponent" in r.output and "250m CPU" in r.output
    data = json.loads(runner.invoke(image_cli, ["inspect", str(root), "--json"]).output)
    assert data["signature"]["status"] == "valid" and "evaluate" in data["manifest"]["intents"]

    (root / "agent.py").write_text((root / "agent.py").read_text() + "\n")
    r = runner.invoke(image_cli, ["verify", str(root), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["error"]["code"] == "ImageTampered"
    assert json.loads(runner.invoke(image_cli, ["inspect", str(root), "--json"]).output)["signature"]["status"] \
        == "invalid"


def test_cli_usage_errors_and_archives(tmp_path: Path):
    runner = CliRunner()
    key = tmp_path / "k.key"
    key.write_bytes(generate_keypair()[0])
    assert runner.invoke(image_cli, ["verify", str(IMAGES / "router"), "--trust", "not-hex"]).exit_code == 2
    assert runner.invoke(image_cli, ["verify", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(image_cli, ["sign", str(IMAGES / "router")]).exit_code == 2  # no --key
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("nope")
    router = copy_example(tmp_path, "router")
    assert runner.invoke(image_cli, ["sign", str(router), "--key", str(bad_key)]).exit_code == 2

    archive = tmp_path / "router.tar.gz"
    r = runner.invoke(image_cli, ["pack", str(IMAGES / "router"), str(archive)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(image_cli, ["verify", str(archive), "--trust", DEMO_PUB])
    assert r.exit_code == 0 and "router@1.0.0" in r.output
    r = runner.invoke(image_cli, ["sign", str(archive), "--key", str(key)])
    assert r.exit_code == 2 and "sign the directory" in r.output

    broken = write_image(tmp_path / "broken", {**MINIMAL, "version": "one"})
    r = runner.invoke(image_cli, ["inspect", str(broken)])
    assert r.exit_code == 1 and "ImageBadManifest" in r.output and "version:" in r.output
    r = runner.invoke(image_cli, ["sign", str(broken), "--key", str(key)])
    assert r.exit_code == 1 and not (broken / SIGNATURE_FILE).exists()
