"""A bundle manifest (isep-bundle.json) read from a store, a bundle stream or a registry is untrusted
input: check_manifest refuses (BadInput) one whose fields join, verify, prune and keep would use
with another type or shape than isep writes, before any of them reads a field. A delta part's
records (where a member comes from, what the part needs) are checked here too: they name files,
digests and sizes that other code looks up and compares.
"""
from __future__ import annotations

from .errors import BadInput
from .fields import Fields
from .limits import MAX_TRAILER
from .names import check_file_name

BUNDLE_SCHEMA = "isep-bundle/1"
DELTA_SCHEMA = "isep-bundle/2"   # some part is a delta part (isep.deltajoin): older isep refuses it by its schema
MEMBER_STRINGS = ("sha256", "xxh3", "diff_id", "header", "padding")  # optional; strings when present


def check_manifest(doc: object, what: str) -> dict:
    """DOC when it has the shape isep writes; else BadInput naming what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
        raise BadInput(f"{what}: not an isep bundle manifest")
    if doc["schema"] not in (BUNDLE_SCHEMA, DELTA_SCHEMA):
        raise BadInput(f"{what}: unknown schema {doc['schema']!r} (this isep reads {BUNDLE_SCHEMA} "
                       f"and {DELTA_SCHEMA})")
    parts = doc.get("parts")
    images = doc.get("images")
    if not isinstance(parts, list) or not isinstance(images, list):
        raise BadInput(f"{what}: parts and images must be lists")
    for n, part in enumerate(parts):
        _check_part(part, f"parts[{n}]", what)
    for image in images:
        _check_image(image, what)
    return doc


def _check_part(part: object, path: str, what: str) -> None:
    if not isinstance(part, dict):
        raise BadInput(f"{what}: a part entry is not an object")
    problem = check_file_name(part.get("file"), f"{what}: part")
    if problem:
        raise BadInput(problem)
    for key, kind in (("size", int), ("raw_size", int), ("sha256", str), ("members", list),
                      ("role", str), ("compression", str)):
        if not isinstance(part.get(key), kind):
            raise BadInput(f"{what}: part {part['file']} has no valid {key!r}")
    entry = Fields(part, path, what)
    for key in ("diff_ids", "layers"):
        entry.strings(key, optional=True)
    for key in ("image", "format", "save", "xxh3"):
        entry.get(key, str, optional=True)
    for n, rec in enumerate(part["members"]):  # join and verify index these fields
        if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and type(rec.get("seq")) is int
                and type(rec.get("size")) is int and isinstance(rec.get("type"), str)
                and (rec["type"] not in ("symlink", "hardlink") or isinstance(rec.get("link"), str))):
            raise BadInput(f"{what}: part {part['file']} lists a member without name, seq, size or type")
        for key in MEMBER_STRINGS:  # inline, not through Fields: a store lists up to 200,000 members
            if type(rec.get(key, "")) is not str and rec[key] is not None:
                Fields(rec, f"{path}.members[{n}]", what).fail(key, "is not a string")
        if "from" in rec:
            _check_origin(Fields(rec["from"], f"{path}.members[{n}].from", what))
    if "needs" in part:
        check_needs_list(part["needs"], f"{path}.needs", what)


def check_needs_list(needs: object, path: str, what: str) -> list[dict]:
    """A delta part's needs (in its manifest entry, or announced ahead of a bundle stream's parts):
    a list of the store layers it reads."""
    if not isinstance(needs, list):
        raise BadInput(f"{what}: {path} is not a list")
    for n, need in enumerate(needs):
        _check_reference(Fields(need, f"{path}[{n}]", what))
    return needs


def _check_origin(origin: Fields) -> None:
    """A member's "from": a layer of a store's part (a reference), or a delta against one."""
    kind = origin.get("kind", str)
    if kind not in ("delta", "reference"):
        origin.fail("kind", f"is {kind!r}, not delta or reference")
    _check_reference(Fields(origin.doc.get("reference"), f"{origin.path}.reference", origin.what))
    if kind == "delta":
        origin.get("member", str)
        origin.get("record", dict)  # its fields: delta.DeltaRecord.from_json


def _check_reference(ref: Fields) -> None:
    """A store layer a delta part reads: which part holds it and what it is."""
    ref.get("part", str)
    ref.get("diff_id", str)
    ref.count("size")
    for key in ("part_sha256", "member", "xxh3", "for"):
        ref.get(key, str, optional=True)


def _check_image(image: object, what: str) -> None:
    if not isinstance(image, dict) or not isinstance(image.get("parts"), list) \
            or not isinstance(image.get("diff_ids"), list):
        raise BadInput(f"{what}: an image entry lacks parts or diff_ids")
    config = image.get("config")
    if not (isinstance(config, dict) and isinstance(config.get("digest"), str)
            and isinstance(config.get("member"), str)):
        raise BadInput(f"{what}: an image entry has no valid config")
    lists = [image["parts"], image["diff_ids"], image.get("tags") or [], image.get("layer_paths") or []]
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists):
        raise BadInput(f"{what}: an image entry lists something other than strings")
    trailer = image.get("trailer_size", 1024)
    if type(trailer) is not int or not 1024 <= trailer <= MAX_TRAILER or trailer % 512:
        raise BadInput(f"{what}: an image entry has an invalid trailer_size")
