"""--base / --lib references: what diffIDs an image has, from whatever the user has at hand."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from .archive import load_json
from .errors import BadInput, EnvironmentFailure, UsageError
from .files import open_for_reading, read_up_to
from .limits import DOCUMENT_CAP
from .manifestcheck import check_manifest
from .names import BUNDLE_MANIFEST, same_image_name


@dataclass
class Ref:
    display: str                 # how messages name it
    diff_ids: list[str]
    tags: list[str] = field(default_factory=list)
    kind: str = "diff-ids"       # index | inspect | config | name | bundle
    bundle_dir: str | None = None

    @property
    def name(self) -> str | None:
        return self.tags[0] if self.tags else None


def read_json_file(path: str, what: str, cap: int = DOCUMENT_CAP, *, in_bundle: bool = False):
    """A JSON file given on the command line (an index, a plan or a bundle manifest can be large): a
    regular file or a pipe such as `<(docker inspect x)`; with IN_BUNDLE a bundle directory's
    manifest (a regular file, its final link not followed)."""
    try:
        with open_for_reading(path, f"{what} {path}", follow=not in_bundle, allow_pipe=not in_bundle) as fh:
            data = read_up_to(fh, cap + 1)
    except OSError as exc:
        raise EnvironmentFailure(f"{what}: cannot read {path}: {exc.strerror}") from None
    if data[257:262] == b"ustar":
        raise UsageError(f"{what}: {path} is an image archive, not a description of one; "
                         f"use `isep-index {path} > index.json` and give index.json")
    return load_json(data, f"{what} {path}", cap)


Image = tuple[list[str], list[str]]   # an image's tags and diffIDs, as a REF document lists them


def _schema(doc: object) -> str:
    return doc["schema"] if isinstance(doc, dict) and isinstance(doc.get("schema"), str) else ""


def _image(tags: object, ids: object, what: str, source: str) -> Image:
    """(tags, diffIDs) when both are lists of strings: a REF document may have been edited by hand."""
    for name, value in (("tags", tags), ("diffIDs", ids)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadInput(f"{what}: {source} lists {name} that are not a list of strings")
    return cast(Image, (tags, ids))


def _index_images(doc: dict, what: str, source: str) -> list[Image]:
    images = doc.get("images")
    if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
        raise BadInput(f"{what}: {source}: images is not a list of objects")
    return [_image(im.get("tags") or [], im.get("diff_ids") or [], what, source) for im in images]


def _inspect_images(entries: list[dict], what: str, source: str) -> list[Image]:
    return [_image(e.get("RepoTags") or [], e["RootFS"].get("Layers") or [], what, source) for e in entries]


def _is_inspect(doc: object) -> bool:
    entries = doc if isinstance(doc, list) else [doc]
    return bool(entries) and all(isinstance(e, dict) and isinstance(e.get("RootFS"), dict) for e in entries)


def _choose(candidates: list[Image], selector: str | None, what: str,
            source: str) -> Image:
    """Pick one (tags, diff_ids) among several images, by name when asked."""
    if selector is not None:
        hits = [c for c in candidates if any(same_image_name(t, selector) for t in c[0])]
        if not hits:
            names = ", ".join(t for c in candidates for t in c[0]) or "untagged images only"
            raise UsageError(f"{what}: no image named {selector!r} in {source} (it holds: {names})")
        return hits[0]
    if len(candidates) != 1:
        names = ", ".join(t for c in candidates for t in c[0][:1]) or f"{len(candidates)} untagged images"
        raise UsageError(f"{what}: {source} holds {len(candidates)} images ({names}); "
                         f"name one as {source}:NAME")
    return candidates[0]


def _from_document(doc, path: str, selector: str | None, what: str) -> Ref:
    if _schema(doc).startswith("isep-index/"):
        tags, ids = _choose(_index_images(doc, what, path), selector, what, path)
        return Ref(display=tags[0] if tags else path, diff_ids=ids, tags=tags, kind="index")
    if _schema(doc).startswith("isep-bundle/"):
        return _from_bundle(doc, str(Path(path).parent), what)
    if _is_inspect(doc):
        tags, ids = _choose(_inspect_images(doc if isinstance(doc, list) else [doc], what, path), selector, what, path)
        return Ref(display=tags[0] if tags else path, diff_ids=ids, tags=tags, kind="inspect")
    if isinstance(doc, dict) and isinstance(doc.get("rootfs"), dict):
        _, ids = _image([], doc["rootfs"].get("diff_ids") or [], what, path)
        return Ref(display=path, diff_ids=ids, kind="config")
    raise UsageError(f"{what}: {path} is none of: isep index, bundle manifest, docker/podman inspect "
                     f"output, image config")


def _from_bundle(doc: object, bundle_dir: str, what: str) -> Ref:
    role = "lib" if what == "--lib" else "base"
    parts = [p for p in check_manifest(doc, f"{what}: the bundle in {bundle_dir}")["parts"] if p["role"] == role]
    if not parts:
        raise UsageError(f"{what}: the bundle in {bundle_dir} has no {role} part")
    if len(parts) > 1:
        names = ", ".join(p.get("file", "?") for p in parts)
        raise UsageError(f"{what}: the bundle in {bundle_dir} has several {role} parts ({names})")
    part = parts[0]
    return Ref(display=part.get("image") or part["file"], diff_ids=list(part.get("diff_ids") or []),
               tags=[part["image"]] if part.get("image") else [], kind="bundle", bundle_dir=bundle_dir)


def resolve_ref(text: str, what: str, archive_images: list[Image] | None = None) -> Ref:
    """Resolve REF: a file (index, inspect, config, bundle manifest), a bundle directory, FILE:NAME,
    or the name of an image in the input archive."""
    if os.path.isdir(text):
        manifest = os.path.join(text, BUNDLE_MANIFEST)
        if not os.path.lexists(manifest):
            raise UsageError(f"{what}: {text} is a directory without {BUNDLE_MANIFEST}")
        return _from_bundle(read_json_file(manifest, what, in_bundle=True), text, what)
    if os.path.isfile(text):
        return _from_document(read_json_file(text, what), text, None, what)
    path, sep, selector = text.rpartition(":")
    while sep and path and not os.path.isfile(path):  # FILE:NAME where NAME itself may hold ':'
        path, sep, more = path.rpartition(":")
        selector = more + ":" + selector
    if sep and path and os.path.isfile(path):
        return _from_document(read_json_file(path, what), path, selector, what)
    if archive_images is not None:
        tags, ids = _choose(archive_images, text, what, "the input archive")
        return Ref(display=text, diff_ids=ids, tags=tags, kind="name")
    raise UsageError(f"{what}: {text!r} is not a file, a bundle directory, or an image in the input")


def validate_ref(ref: Ref, what: str) -> Ref:
    if not ref.diff_ids or not all(isinstance(d, str) and d.startswith("sha256:") and len(d) == 71
                                   for d in ref.diff_ids):
        raise BadInput(f"{what}: {ref.display} has no valid list of diffIDs")
    return ref


# --- --have: what the device's engine already holds ---------------------------------------------

@dataclass
class Held:
    """One image (or part stack) the device's engine holds, as a --have REF shows it."""
    display: str
    diff_ids: list[str]


PODMAN_REFUSAL = ("podman load refuses an archive whose layer files are missing (\"Some layer tarfiles "
                  "are missing in the tarball\"); for podman leave out --have and join the full image "
                  "from a store that holds its base and lib parts")


def _is_podman_inspect(entry: dict) -> bool:
    return "NamesHistory" in entry or "ManifestType" in entry  # fields docker inspect never writes


def _held_in_document(doc, path: str, selector: str | None) -> list[Held]:
    if _schema(doc).startswith("isep-index/"):
        images = _index_images(doc, "--have", path)
    elif _schema(doc).startswith("isep-bundle/"):
        images = _held_in_bundle(check_manifest(doc, f"--have: {path}"))
    elif isinstance(doc, list) and _is_inspect(doc):
        if any(_is_podman_inspect(e) for e in doc):
            raise UsageError(f"--have: {path} is podman inspect output: {PODMAN_REFUSAL}")
        images = _inspect_images(doc, "--have", path)
    elif isinstance(doc, dict) and isinstance(doc.get("rootfs"), dict):
        images = [_image([], doc["rootfs"].get("diff_ids") or [], "--have", path)]
    else:
        raise UsageError(f"--have: {path} is none of: docker inspect output, isep index, bundle manifest, "
                         f"image config")
    if selector is not None:
        images = [_choose(images, selector, "--have", path)]
    held = [Held(display=tags[0] if tags else path, diff_ids=ids) for tags, ids in images]
    for h in held:
        validate_ref(Ref(display=h.display, diff_ids=h.diff_ids), "--have")
    return held


def _held_in_bundle(doc: dict) -> list[Image]:
    """A bundle's images and its base and lib stacks: what loading from that bundle put in the engine
    (DOC checked: manifestcheck)."""
    out = [(im.get("tags") or [], im["diff_ids"]) for im in doc["images"]]
    out += [([p["image"]] if p.get("image") else [], p.get("diff_ids") or []) for p in doc["parts"]
            if p["role"] in ("base", "lib")]
    return out


def resolve_have(text: str) -> list[Held]:
    """--have REF: docker inspect JSON (any number of images), an isep index, a bundle directory or its
    manifest, an image config; FILE:NAME picks one image. A pipe (`<(docker inspect …)`) works too."""
    if os.path.isdir(text):
        manifest = os.path.join(text, BUNDLE_MANIFEST)
        if not os.path.lexists(manifest):
            raise UsageError(f"--have: {text} is a directory without {BUNDLE_MANIFEST}")
        return _held_in_document(read_json_file(manifest, "--have", in_bundle=True), text, None)
    if os.path.exists(text):
        return _held_in_document(read_json_file(text, "--have"), text, None)
    path, sep, selector = text.rpartition(":")
    while sep and path and not os.path.isfile(path):  # FILE:NAME where NAME itself may hold ':'
        path, sep, more = path.rpartition(":")
        selector = more + ":" + selector
    if sep and path and os.path.isfile(path):
        return _held_in_document(read_json_file(path, "--have"), path, selector)
    raise UsageError(f"--have: {text!r} is not a file or a bundle directory")

