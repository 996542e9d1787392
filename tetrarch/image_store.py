"""Where agent images live, and how a reference (``summarizer@1.0.0``, ``summarizer`` or a path) finds one.

The store is a directory of images (directories or ``.tar.gz`` archives), ``$TETRARCH_IMAGES`` or the
project's ``images/``. Finding an image reads manifests only; its signature is checked when it is
loaded (:func:`tetrarch.images.verify_image`).
"""

from __future__ import annotations

import os
from pathlib import Path

from tetrarch.errors import InvalidRequest, NotFound
from tetrarch.images import ImageManifest, ImageRefused, check_image, is_archive, parse_version

#: The project's example images.
DEFAULT_IMAGE_DIR = Path(__file__).resolve().parent.parent / "images"


def image_store() -> Path:
    """The image store of this process: ``$TETRARCH_IMAGES``, else the project's ``images/``."""
    return Path(os.environ.get("TETRARCH_IMAGES") or DEFAULT_IMAGE_DIR)


def _candidates(store: Path) -> list[tuple[Path, ImageManifest]]:
    found = []
    for entry in sorted(store.iterdir()) if store.is_dir() else []:
        if not (entry.is_dir() or is_archive(entry)) or entry.name.startswith("."):
            continue
        try:
            found.append((entry, check_image(entry)))
        except ImageRefused:
            continue  # not an image (or a broken one): a reference to it by path says why
    return found


def resolve_image(ref: str, store: Path | None = None) -> Path:
    """The image ``ref`` names: a path (absolute, or with a ``/``), or ``name[@version]`` in the store
    (without a version, the highest one there)."""
    store = store or image_store()
    if "/" in ref or ref.endswith((".tar.gz", ".tgz")):
        path = Path(ref) if Path(ref).is_absolute() else store / ref
        if not path.exists():
            raise NotFound(f"image {ref!r} does not exist (looked for {path})", level="supervisor")
        return path
    name, _, version = ref.partition("@")
    if version:
        try:
            parse_version(version)
        except ValueError as e:
            raise InvalidRequest(f"image reference {ref!r}: {e}", level="supervisor") from None
    matches = [(p, m) for p, m in _candidates(store) if m.name == name and (not version or m.version == version)]
    if not matches:
        have = ", ".join(sorted(str(m.ref) for _, m in _candidates(store))) or "none"
        raise NotFound(f"no image {ref!r} in the image store {store} (it has: {have})", level="supervisor",
                       data={"image": ref})
    return max(matches, key=lambda pm: pm[1].semver)[0]
