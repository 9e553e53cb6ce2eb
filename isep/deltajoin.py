"""Delta parts, the receiving side: a part whose layers come from deltas or from a store's parts,
rebuilt into the plain part `isep-pack` would have written, before anything is joined.

A delta part (bundle schema isep-bundle/2) is a part file like any other, holding only some of its
members' bytes: every member its manifest entry lists without `from` is in it verbatim; a member
with `"from": {"kind": "delta"}` is represented by a member `isep-delta/<seq>` holding the delta
(zstd frames against a reference layer); a member with `"from": {"kind": "reference"}` is not in it
at all. Either way the manifest keeps the member's original tar header (`header`, base64) and names
the reference (part file, its sha256, member, diffID, size, xxh3), so that a receiver knows what it
needs from its store before reading any data.

rebuild_delta_parts turns each delta part an image needs into its plain part (level 1, in a work
directory), checking every delta's record, reference and rebuilt diffID and every referenced
member's sha256 (IntegrityError, exit 5, naming the layer and the part it needs); the join then runs
on plain parts and checks everything again, so a failure anywhere leaves no archive a loader takes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import replace
from typing import BinaryIO, Iterator, Sequence

from .bundle import Bundle, encode_manifest, safe_join
from .delta import DEFAULT_MEMORY, DeltaRecord, Reference, decode_layer
from .errors import BadInput, IntegrityError
from .parts import DecompressingReader, PartInput, PartWriter, part_opener
from .tarstream import Member, Source, TarReader, padded

DELTA_MEMBER = "isep-delta/"
MAX_HEADER = 64 << 10       # a member's tar header kept in a manifest (PAX records included)
STORE_LEVEL = 1             # a rebuilt part is written fast: it is read back once by the join


def is_delta_part(entry: dict) -> bool:
    return any(isinstance(rec, dict) and "from" in rec for rec in entry.get("members") or [])


def delta_member_name(seq: int) -> str:
    return f"{DELTA_MEMBER}{seq}"


def carried_listing(entry: dict) -> list[dict]:
    """The members a part file holds: for a delta part, its own members plus one per delta."""
    out = []
    for rec in entry["members"]:
        origin = rec.get("from")
        if origin is None:
            out.append(rec)
        elif origin.get("kind") == "delta":
            record = origin.get("record") or {}
            out.append({"seq": rec["seq"], "name": origin.get("member"), "type": "file", "delta": True,
                        "size": record.get("size"), "sha256": record.get("sha256")})
    return out


def part_needs(entry: dict) -> list[dict]:
    """Every store member a delta part reads (part, part_sha256, member, diff_id, size, and the layer
    it is `for`), once each."""
    seen, out = set(), []
    for rec in entry.get("members") or []:
        ref = (rec.get("from") or {}).get("reference")
        if isinstance(ref, dict) and ref.get("diff_id") not in seen:
            seen.add(ref.get("diff_id"))
            out.append({**{k: ref.get(k) for k in ("part", "part_sha256", "member", "diff_id", "size")},
                        "for": rec.get("sha256")})
    return out


# --- the store's layers --------------------------------------------------------------------------

class StoreLayers:
    """The members the parts of some bundles carry, by sha256 (a layer's diffID), and their bytes."""

    def __init__(self, bundles: Sequence[Bundle]):
        self.by_digest: dict[str, tuple[Bundle, dict, dict]] = {}
        for b in bundles:
            for entry in b.doc.get("parts") or []:
                for rec in entry.get("members") or []:
                    if rec.get("type") == "file" and "from" not in rec and rec.get("sha256"):
                        self.by_digest.setdefault(rec["sha256"], (b, entry, rec))

    def find(self, need: dict) -> tuple[Bundle, dict, dict] | None:
        """The carrier of a needed layer: by diffID and size (any part holding those bytes will do)."""
        hit = self.by_digest.get(need.get("diff_id") or "")
        if hit is None or hit[2].get("size") != need.get("size"):
            return None
        return hit

    def missing(self, needs: list[dict]) -> list[dict]:
        return [n for n in needs if self.find(n) is None]

    def chunks(self, need: dict, what: str) -> Iterator[bytes]:
        """The bytes of a needed layer, from the part carrying it (decompressed, as a stream)."""
        hit = self.find(need)
        if hit is None:
            raise needs_error(what, need)
        bundle, entry, rec = hit
        yield from member_chunks(bundle, entry, rec["name"])

    def reference(self, need: dict, what: str) -> Reference:
        hit = self.find(need)
        if hit is None:
            raise needs_error(what, need)
        bundle, entry, rec = hit
        return Reference(rec["size"], rec["sha256"], lambda: member_chunks(bundle, entry, rec["name"]),
                         f"reference layer {rec['sha256'][:19]}… in {entry['file']}", rec.get("xxh3") or "")


def needs_error(what: str, need: dict) -> IntegrityError:
    if need.get("for") and what.startswith("the bundle stream"):
        what = f"layer {need['for']} of {what}"
    return IntegrityError(f"{what} needs layer {need.get('diff_id')} ({need.get('size')} bytes) from part "
                          f"{need.get('part')} (sha256 {str(need.get('part_sha256'))[7:19]}…), which the "
                          f"store does not hold")


def check_needs(needs: list, stores: Sequence[Bundle], what: str) -> None:
    """Refuse at once (exit 5) when the store lacks a layer a bundle's deltas or references read."""
    if not isinstance(needs, list) or not all(isinstance(n, dict) for n in needs):
        raise BadInput(f"{what}: its list of needed layers is malformed")
    missing = StoreLayers(stores).missing(needs)
    if missing:
        raise needs_error(what, missing[0])


def member_chunks(bundle: Bundle, entry: dict, name: str) -> Iterator[bytes]:
    """One member's data from a part file (the members before it are decompressed and skipped)."""
    opener = bundle.files.get(entry["file"]) or part_opener(safe_join(bundle.path, entry["file"]))
    fh = opener()
    source = Source(DecompressingReader(fh, entry.get("compression"), entry.get("raw_size"), entry["file"]),
                    name=entry["file"], prefetch=False)
    try:
        for member in TarReader(source):
            if member.name == name and member.is_file:
                for chunk in member.iter_data():
                    yield bytes(chunk)  # the reader reuses its buffers; callers keep chunks
                return
            member.skip()
        raise IntegrityError(f"{entry['file']} does not hold {name!r}, which its manifest lists")
    finally:
        source.close()
        fh.close()


# --- rebuilding ----------------------------------------------------------------------------------

def rebuild_delta_parts(parts: list[PartInput], bundles: Sequence[Bundle], work_dir: str, *,
                       memory: int = DEFAULT_MEMORY) -> list[PartInput]:
    """The image's parts with every delta part replaced by its rebuilt plain part (in work_dir)."""
    delta_parts = [p for p in parts if p.entry is not None and is_delta_part(p.entry)]
    if not delta_parts:
        return parts
    layers = StoreLayers(bundles)
    for p in delta_parts:
        missing = layers.missing(part_needs(p.entry or {}))
        if missing:  # before reading any data
            raise needs_error(_layer_of(p.entry or {}, missing[0]), missing[0])
    return [rebuild_part(p, layers, work_dir, memory) if p in delta_parts else p for p in parts]


def _layer_of(entry: dict, need: dict) -> str:
    for rec in entry["members"]:
        ref = (rec.get("from") or {}).get("reference") or {}
        if ref.get("diff_id") == need.get("diff_id"):
            return f"layer {rec.get('sha256')} ({rec['name']}) of {entry['file']}"
    return entry["file"]


def rebuild_part(part: PartInput, layers: StoreLayers, work_dir: str, memory: int) -> PartInput:
    entry = part.entry or {}
    path = rebuilt_path(work_dir, entry["file"])
    with open(path, "xb") as out:
        writer = PartWriter(entry["file"], out, entry["compression"], STORE_LEVEL
                            if entry["compression"] == "zstd" else None)
        _rebuild_into(part, layers, writer, memory)
        info = writer.finish()
    rebuilt = {**entry, "size": info["size"], "sha256": info["sha256"], "xxh3": info["xxh3"],
               "raw_size": info["raw_size"], "compression": entry["compression"]}
    return replace(part, opener=part_opener(path), entry=rebuilt, expected_sha256=info["sha256"],
                   expected_size=info["size"])


def _rebuild_into(part: PartInput, layers: StoreLayers, writer: PartWriter, memory: int) -> None:
    entry = part.entry or {}
    fh = part.opener()
    hashing = _Hashing(fh)
    source = Source(DecompressingReader(hashing, entry["compression"], entry["raw_size"], part.label),
                    name=part.label, prefetch=False)
    try:
        members = iter(TarReader(source))
        for rec in entry["members"]:
            origin = rec.get("from")
            what = f"layer {rec.get('sha256')} ({rec['name']}) of {entry['file']}"
            if origin is None:
                member = _next(members, rec["name"], part.label)
                writer.write(member.header)
                for chunk in member.iter_data():
                    writer.write(chunk)
                writer.write(member.padding)
            elif not isinstance(origin, dict) or origin.get("kind") not in ("delta", "reference"):
                raise BadInput(f"{part.label}: member {rec['name']!r} comes from an unknown source")
            else:
                _write_from(rec, origin, members, layers, writer, memory, what, part.label)
        extra = next(members, None)
        if extra is not None:
            raise IntegrityError(f"{part.label}: holds {extra.name!r}, which its manifest does not list")
        _check_part_file(part, hashing)
    except BadInput as exc:  # damage inside a received part
        raise IntegrityError(str(exc)) from None
    finally:
        source.close()
        fh.close()


def _write_from(rec: dict, origin: dict, members: Iterator[Member], layers: StoreLayers, writer: PartWriter,
                memory: int, what: str, label: str) -> None:
    header = _header(rec, label)
    ref = origin.get("reference")
    if not isinstance(ref, dict):
        raise BadInput(f"{label}: member {rec['name']!r} names no reference")
    writer.write(header)
    sha = hashlib.sha256()
    size = 0
    if origin["kind"] == "delta":
        record = DeltaRecord.from_json(origin.get("record"), f"{label}: delta of {rec['name']!r}")
        member = _next(members, str(origin.get("member")), label)
        if member.size != record.size:
            raise IntegrityError(f"{label}: delta {member.name!r} is {member.size} bytes, "
                                 f"its record says {record.size}")
        pieces = decode_layer(record, (bytes(c) for c in member.iter_data()), layers.reference(ref, what),
                              memory=memory, what=what)
    else:
        pieces = layers.chunks(ref, what)
    for piece in pieces:
        sha.update(piece)
        size += len(piece)
        writer.write(piece)
    if size != rec.get("size") or "sha256:" + sha.hexdigest() != rec.get("sha256"):
        raise IntegrityError(f"{what}: rebuilt as {size} bytes with sha256 {sha.hexdigest()[:12]}…, "
                             f"its manifest says {rec.get('size')} bytes, {str(rec.get('sha256'))[7:19]}…")
    writer.write(_padding(rec, size, label))


def _padding(rec: dict, size: int, label: str) -> bytes:
    want = padded(size) - size
    if "padding" not in rec:
        return bytes(want)
    try:
        raw = base64.b64decode(str(rec["padding"]), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != want:
        raise BadInput(f"{label}: member {rec['name']!r} has invalid padding in its manifest")
    return raw


def _header(rec: dict, label: str) -> bytes:
    text = rec.get("header")
    if not isinstance(text, str) or len(text) > MAX_HEADER * 2:
        raise BadInput(f"{label}: member {rec['name']!r} has no valid tar header in its manifest")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{label}: member {rec['name']!r} has no valid tar header in its manifest") from None
    if not raw or len(raw) % 512 or len(raw) > MAX_HEADER:
        raise BadInput(f"{label}: member {rec['name']!r} has a tar header of {len(raw)} bytes")
    return raw


def _next(members: Iterator[Member], name: str, label: str) -> Member:
    member = next(members, None)
    if member is None or member.name != name:
        got = "its end" if member is None else repr(member.name)
        raise IntegrityError(f"{label}: {got} where its manifest lists {name!r}")
    return member


class _Hashing:
    """A part file read through, counted and hashed (a delta part is checked like any part)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_part_file(part: PartInput, hashing: _Hashing) -> None:
    try:
        hashing.drain()
    except OSError as exc:
        raise IntegrityError(f"{part.label}: cannot read it to the end ({exc.strerror})") from None
    if part.expected_size is not None and hashing.size != part.expected_size:
        raise IntegrityError(f"{part.label}: {hashing.size} bytes, its manifest says {part.expected_size}")
    want = part.expected_sha256 or ""
    if want and "sha256:" + hashing.sha.hexdigest() != (want if want.startswith("sha256:") else "sha256:" + want):
        raise IntegrityError(f"{part.label}: sha256 differs from its manifest's (corrupt, replaced or from "
                             f"another bundle)")



def rebuilt_path(work_dir: str, file_name: str) -> str:
    return os.path.join(work_dir, f"rebuilt-{file_name}")


def adopt_rebuilt(received: Bundle, rebuilt: list[PartInput], work_dir: str) -> None:
    """Make a received bundle's delta parts the plain parts rebuilt from them, after the join (which
    reads them where they were rebuilt) and before they are kept in a store: a release's part is
    always materialised, so the next release's delta is against a plain part and a chain of
    releases never makes a join slower than one delta."""
    made = {p.entry["file"]: p.entry for p in rebuilt if p.entry is not None}
    parts = []
    for entry in received.doc["parts"]:
        path = rebuilt_path(work_dir, entry["file"])
        if is_delta_part(entry) and entry["file"] in made and os.path.exists(path):
            os.replace(path, os.path.join(received.path, entry["file"]))
            info = made[entry["file"]]
            entry = plain_entry(entry, {k: info[k] for k in ("size", "sha256", "xxh3", "raw_size")})
        parts.append(entry)
    received.doc["parts"] = parts
    received.manifest_bytes = bytes(encode_manifest(received.doc))
    received.signature = None  # the manifest changed: the store's merged one is unsigned anyway


def plain_entry(entry: dict, info: dict) -> dict:
    """A delta part's manifest entry as the rebuilt plain part's."""
    members = [{k: v for k, v in rec.items() if k not in ("from", "header", "padding")} for rec in entry["members"]]
    out = {**entry, **info, "members": members}
    out.pop("needs", None)
    return out
