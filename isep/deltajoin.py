"""Delta parts, the receiving side: a part whose layers come from deltas or from a store's parts,
read by the join as the plain part `isep-pack` would have written.

A delta part (bundle schema isep-bundle/2) is a part file like any other, holding only some of its
members' bytes: every member its manifest entry lists without `from` is in it verbatim; a member
with `"from": {"kind": "delta"}` is represented by a member `isep-delta/<seq>` holding the delta
(zstd frames against a reference layer); a member with `"from": {"kind": "reference"}` is not in it
at all. Either way the manifest keeps the member's original tar header (`header`, base64) and names
the reference (part file, its sha256, member, diffID, size, xxh3), so that a receiver knows what it
needs from its store before reading any data.

prepare_delta_parts checks every need and record before anything is written (IntegrityError, exit 5,
naming the layer and the part it needs) and sets each delta part to be rebuilt while the join reads
it (DeltaRebuild): carried members from the part, referenced ones from the store part carrying them,
deltas decoded against their reference, every byte going to the output once while the join hashes
it. The join holds the archive's final metadata until every sha256 and diffID checked out, so a
failure anywhere leaves no archive a loader takes. With --keep the plain part is written beside the
join and adopted only after it succeeded (adopt_rebuilt).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import queue
import threading
from dataclasses import dataclass, replace
from typing import BinaryIO, Generator, Iterable, Iterator, Sequence

import xxhash

from .bundle import Bundle, is_delta_part, safe_join
from .delta import DEFAULT_MEMORY, DeltaRecord, Reference, check_segments, decode_layer
from .errors import BadInput, EnvironmentFailure, IntegrityError, IsepError
from .files import FileSink
from .manifestcheck import check_needs_list
from .parts import DecompressingReader, PartInput, PartWriter, drain, part_opener
from .partspan import NotFramed, load_span, member_span, span_pieces
from .tarstream import Member, NameTable, Source, TarReader, padded

DELTA_MEMBER = "isep-delta/"
SKIP_WORTH = 8 << 20        # tar-stream bytes before a member worth skipping by frames, not decompressing
MAX_HEADER = 64 << 10       # a member's tar header kept in a manifest (PAX records included)
STORE_LEVEL = 1             # a rebuilt part is written fast: it is read back once by the join


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

    def chunks(self, need: dict, what: str, *, copy: bool = True) -> Iterator[bytes | memoryview]:
        """The bytes of a needed layer, from the part carrying it (decompressed, as a stream);
        copy False: views of reused buffers, each valid until the next is asked for."""
        hit = self.find(need)
        if hit is None:
            raise needs_error(what, need)
        bundle, entry, rec = hit
        yield from member_chunks(bundle, entry, rec["name"], copy=copy)

    def reference(self, need: dict, what: str) -> Reference:
        hit = self.find(need)
        if hit is None:
            raise needs_error(what, need)
        bundle, entry, rec = hit
        return Reference(rec["size"], rec["sha256"], lambda: member_chunks(bundle, entry, rec["name"], copy=False),
                         f"reference layer {rec['sha256'][:19]}… in {entry['file']}", rec.get("xxh3") or "",
                         lambda out: load_member(bundle, entry, rec, out))


def needs_error(what: str, need: dict) -> IntegrityError:
    if need.get("for") and what.startswith("the bundle stream"):
        what = f"layer {need['for']} of {what}"
    return IntegrityError(f"{what} needs layer {need.get('diff_id')} ({need.get('size')} bytes) from part "
                          f"{need.get('part')} (sha256 {str(need.get('part_sha256'))[7:19]}…), which the "
                          f"store does not hold")


def check_needs(needs: object, stores: Sequence[Bundle], what: str) -> None:
    """Refuse at once (exit 5) when the store lacks a layer a bundle stream's deltas or references
    read (NEEDS: its isep-needs.json, sent ahead of the parts; exit 4 when malformed)."""
    missing = StoreLayers(stores).missing(check_needs_list(needs, "isep-needs.json", what))
    if missing:
        raise needs_error(what, missing[0])


def load_member(bundle: Bundle, entry: dict, rec: dict, out: memoryview) -> bool:
    """One member's data from a plain zstd part straight into out (its frames decompressed in
    parallel) and checked against its xxh3; False when the part does not allow it or anything
    fails (the caller reads it as a stream, which says what is wrong)."""
    span = member_span(entry, rec["name"]) if entry.get("compression") == "zstd" and rec.get("xxh3") else None
    if span is None or span[1] != len(out):
        return False
    opener = bundle.files.get(entry["file"]) or part_opener(safe_join(bundle.path, entry["file"]))
    try:
        with opener() as fh:
            load_span(fh, span[0], out, entry["file"])
    except (IsepError, OSError, NotFramed) as exc:
        _forget_frames(exc)
        return False
    return xxhash.xxh3_128(out).hexdigest() == rec["xxh3"]


def _forget_frames(exc: BaseException | None) -> None:
    """Drop the frames a failure's traceback (and its context's) keeps alive: they hold views of the
    caller's buffer, and the caller may close it at once (an mmap with a view alive cannot close)."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__context__


def member_chunks(bundle: Bundle, entry: dict, name: str, *, copy: bool = True) -> Iterator[bytes | memoryview]:
    """One member's data from a part file: from its own frames when others lie before it and the
    part's frames say where (partspan), else as a stream (what lies before it decompressed and
    skipped; one thread, reused buffers: what the join can hash as fast); copy False: views of the
    reader's reused buffers."""
    opener = bundle.files.get(entry["file"]) or part_opener(safe_join(bundle.path, entry["file"]))
    span = member_span(entry, name) if entry.get("compression") == "zstd" else None
    if span is not None and span[0] >= SKIP_WORTH:
        with opener() as fh:
            pieces = span_pieces(fh, span[0], span[1], entry["file"])
            try:
                first = next(pieces, None)
            except NotFramed:
                pieces.close()
            else:
                if first is not None:
                    yield first
                yield from pieces
                return
    fh = opener()
    source = Source(DecompressingReader(fh, entry.get("compression"), entry.get("raw_size"), entry["file"]),
                    name=entry["file"])  # decompressed ahead on the Source's thread
    try:
        for member in TarReader(source):
            if member.name == name and member.is_file:
                for chunk in member.iter_data():
                    yield bytes(chunk) if copy else chunk  # the reader reuses its buffers
                return
            member.skip()
        raise IntegrityError(f"{entry['file']} does not hold {name!r}, which its manifest lists")
    except BadInput as exc:  # a store's part that is not the tar its manifest lists: damage
        raise IntegrityError(str(exc)) from None
    finally:
        source.close()
        fh.close()


# --- rebuilding, while the join reads ------------------------------------------------------------

def prepare_delta_parts(parts: list[PartInput], bundles: Sequence[Bundle], *, memory: int = DEFAULT_MEMORY,
                        keep_dir: str | None = None) -> list[PartInput]:
    """The image's parts, each delta part set to be rebuilt while the join reads it (PartInput.rebuild):
    carried members from the part, referenced ones from the store part carrying them, deltas decoded
    against their reference. Every need and every record is checked here, before anything is written.
    keep_dir: each rebuilt part is also written there, plain (DeltaRebuild.kept), for --keep."""
    delta_parts = [p for p in parts if p.entry is not None and is_delta_part(p.entry)]
    if not delta_parts:
        return parts
    layers = StoreLayers(bundles)
    for p in delta_parts:
        missing = layers.missing(part_needs(p.entry or {}))
        if missing:  # before reading any data
            raise needs_error(_layer_of(p.entry or {}, missing[0]), missing[0])
    try:
        return [replace(p, rebuild=DeltaRebuild(p, layers, memory, keep_dir)) if p in delta_parts else p
                for p in parts]
    except BadInput as exc:  # a delta part's manifest entry is damaged
        raise IntegrityError(str(exc)) from None


def _layer_of(entry: dict, need: dict) -> str:
    for rec in entry["members"]:
        ref = (rec.get("from") or {}).get("reference") or {}
        if ref.get("diff_id") == need.get("diff_id"):
            return f"layer {rec.get('sha256')} ({rec['name']}) of {entry['file']}"
    return entry["file"]


@dataclass
class _Planned:
    """One member of a delta part as the archive has it: carried (origin None), or rebuilt from a
    store member (reference) or a delta, with its header and padding from the manifest."""

    rec: dict
    origin: dict | None = None
    header: Member | None = None
    padding: bytes = b""
    record: DeltaRecord | None = None
    what: str = ""


class DeltaRebuild:
    """A delta part's members as the plain part's (PartInput.rebuild): the join reads, hashes and
    checks them as any part's, so each byte passes through once; with keep_dir the plain part is
    written beside the join (PartWriter's frames compressed on its pool) under a temporary name."""

    def __init__(self, part: PartInput, layers: StoreLayers, memory: int, keep_dir: str | None):
        entry = part.entry or {}
        self.file = entry["file"]
        self.label = part.label
        self.compression = entry["compression"]
        self.layers = layers
        self.memory = memory
        self.plans = [_plan(rec, entry, part.label, memory) for rec in entry["members"]]
        self.keep_path = None if keep_dir is None else rebuilt_path(keep_dir, self.file)
        self.kept: dict | None = None   # size, sha256, xxh3, raw_size of the plain part once written

    def __call__(self, members: Iterator[Member]) -> Iterator[Member]:
        names = NameTable(self.label)  # the plain part's names, checked as a reader of it would
        member: Member | None = None
        with _Keeper(self) as keeper:
            try:
                for plan in self.plans:
                    member = self._member(plan, members)
                    names.add(member)
                    member = member if keeper.writer is None else keeper.teed(member)
                    yield member
            finally:  # a join that failed: a decoding thread ends now, not when garbage is collected
                if isinstance(member, _StreamedMember):
                    member.close()
            extra = next(members, None)
            if extra is not None:
                raise IntegrityError(f"{self.label}: holds {extra.name!r}, which its manifest does not list")
            self.kept = keeper.finish()

    def _member(self, plan: _Planned, members: Iterator[Member]) -> Member:
        if plan.origin is None:
            return _next(members, plan.rec["name"], self.label)
        assert plan.header is not None
        ref = plan.origin["reference"]
        if plan.record is None:
            return _streamed(plan.header, self.layers.chunks(ref, plan.what, copy=False), plan.padding)
        delta = _next(members, str(plan.origin.get("member")), self.label)
        if delta.size != plan.record.size:
            raise IntegrityError(f"{self.label}: delta {delta.name!r} is {delta.size} bytes, "
                                 f"its record says {plan.record.size}")
        pieces = decode_layer(plan.record, (bytes(c) for c in delta.iter_data()),
                              self.layers.reference(ref, plan.what), memory=self.memory, what=plan.what,
                              hashed_by_caller=True)
        return _streamed(plan.header, _ahead(pieces), plan.padding)


def _plan(rec: dict, entry: dict, label: str, memory: int) -> _Planned:
    """A member's manifest record checked before any data is read (the manifest may be hostile)."""
    origin = rec.get("from")
    if origin is None:
        return _Planned(rec)
    if not isinstance(origin, dict) or origin.get("kind") not in ("delta", "reference"):
        raise BadInput(f"{label}: member {rec['name']!r} comes from an unknown source")
    if not isinstance(origin.get("reference"), dict):
        raise BadInput(f"{label}: member {rec['name']!r} names no reference")
    header = _header(rec, label)
    if header.name != rec["name"] or not header.is_file or header.size != rec.get("size"):
        raise BadInput(f"{label}: the tar header of {rec['name']!r} in its manifest is for "
                       f"{header.name!r} ({header.size} bytes)")
    what = f"layer {rec.get('sha256')} ({rec['name']}) of {entry['file']}"
    plan = _Planned(rec, origin, header, _padding(rec, header.size, label), what=what)
    if origin["kind"] == "delta":
        plan.record = DeltaRecord.from_json(origin.get("record"), f"{label}: delta of {rec['name']!r}")
        check_segments(plan.record, f"{what}: delta record")
        if plan.record.memory() > memory:
            raise EnvironmentFailure(f"{what}: its delta needs {plan.record.memory() >> 20} MiB of memory, "
                                     f"the cap is {memory >> 20} MiB (--delta-memory)")
        # the join checks every member's sha256 against its record: the diffID the delta rebuilds
        if plan.record.target_diff_id != rec.get("sha256") or plan.record.target_size != header.size:
            raise BadInput(f"{label}: the delta of {rec['name']!r} rebuilds diffID {plan.record.target_diff_id} "
                           f"({plan.record.target_size} bytes), its manifest lists {rec.get('sha256')}")
    return plan


class _StreamedMember(Member):
    """A member whose data comes from a generator, which returns the padding that follows it."""

    def __init__(self, header: Member, data: Generator[bytes | memoryview, None, bytes]):
        super().__init__(name=header.name, typeflag=header.typeflag, size=header.size,
                         linkname=header.linkname, mode=header.mode, mtime=header.mtime, header=header.header,
                         offset=header.offset, pax=header.pax)
        self._data = data

    def iter_data(self) -> Iterator[bytes | memoryview]:  # type: ignore[override]
        if self._consumed:
            raise RuntimeError(f"data of {self.name!r} already consumed")
        self._consumed = True
        self.padding = yield from self._data

    def skip(self) -> None:
        for _ in self.iter_data():
            pass

    def close(self) -> None:
        self._data.close()


def _streamed(header: Member, pieces: Iterable[bytes | memoryview], padding: bytes) -> Member:
    def data() -> Generator[bytes | memoryview, None, bytes]:
        size = 0
        for piece in pieces:
            size += len(piece)
            if size > header.size:
                raise IntegrityError(f"{header.name!r} is larger than its {header.size} bytes")
            yield piece
        if size != header.size:
            raise IntegrityError(f"{header.name!r} ends at {size} bytes, {header.size} expected")
        return padding
    return _StreamedMember(header, data())


_END = object()


def _ahead(pieces: Iterator, depth: int = 2) -> Iterator:
    """The pieces produced on a thread, a few ahead of the reader: decoding (zstd releases the GIL)
    overlaps the join's hashing and writing. Only for pieces the producer does not reuse."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for piece in pieces:
                if not put(piece):
                    return
            put(_END)
        except BaseException as exc:  # raised again in the reading thread
            put(exc)
        finally:
            getattr(pieces, "close", lambda: None)()  # a generator's own checks and cleanup, on its thread

    thread = threading.Thread(target=run, name="isep-delta-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _Keeper:
    """The plain part written while the join reads a delta part (--keep); removed unless finished."""

    def __init__(self, rebuild: DeltaRebuild):
        self.path = rebuild.keep_path
        self.file: FileSink | None = None
        self.writer: PartWriter | None = None
        if self.path is not None:
            self.file = FileSink(open(self.path, "xb", buffering=0), self.path, self.path)
            level = STORE_LEVEL if rebuild.compression == "zstd" else None
            self.writer = PartWriter(rebuild.file, self.file, rebuild.compression, level)

    def __enter__(self) -> _Keeper:
        return self

    def teed(self, member: Member) -> Member:
        writer = self.writer
        assert writer is not None

        def data() -> Generator[bytes | memoryview, None, bytes]:
            writer.write(member.header)
            for chunk in member.iter_data():
                writer.write(chunk)  # copied into a frame at once: the chunk may be a reused buffer
                yield chunk
            writer.write(member.padding)
            return member.padding
        return _StreamedMember(member, data())

    def finish(self) -> dict | None:
        if self.writer is None or self.file is None:
            return None
        info = self.writer.finish()
        self.file.close()
        self.file = None
        return info

    def __exit__(self, kind, value, tb) -> None:
        if self.file is not None:  # the join failed: frames in flight end, the part goes
            drain()
            self.file.raw.close()
            try:
                os.unlink(self.path or "")
            except OSError:
                pass


def check_delta_part(part: PartInput, layers: StoreLayers, memory: int = DEFAULT_MEMORY) -> int:
    """isep-verify --deep: a delta part rebuilt as a join would read it, each member's size and
    sha256 checked and the bytes dropped (no temporary part); returns the number of deltas decoded."""
    rebuild = DeltaRebuild(part, layers, memory, None)
    entry = part.entry or {}
    fh = part.opener()
    hashing = _Hashing(fh)
    source = Source(DecompressingReader(hashing, entry["compression"], entry["raw_size"], part.label),
                    name=part.label, prefetch=False)
    try:
        plans = iter(rebuild.plans)
        for member in rebuild(iter(TarReader(source))):  # to its end: members it does not list are refused
            plan = next(plans)
            sha = hashlib.sha256()
            size = 0
            for chunk in member.iter_data():
                sha.update(chunk)
                size += len(chunk)
            digest = "sha256:" + sha.hexdigest()
            if plan.origin is not None and (size != plan.rec.get("size") or digest != plan.rec.get("sha256")):
                raise IntegrityError(f"{plan.what or part.label}: rebuilt as {size} bytes with sha256 "
                                     f"{sha.hexdigest()[:12]}…, its manifest says {plan.rec.get('size')} bytes, "
                                     f"{str(plan.rec.get('sha256'))[7:19]}…")
        _check_part_file(part, hashing)
    except BadInput as exc:  # damage inside a part
        raise IntegrityError(str(exc)) from None
    finally:
        source.close()
        fh.close()
    return sum(1 for plan in rebuild.plans if plan.record is not None)


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


def _header(rec: dict, label: str) -> Member:
    """A member's original tar header, kept in the manifest, parsed as the join's reader would."""
    text = rec.get("header")
    bad = BadInput(f"{label}: member {rec['name']!r} has no valid tar header in its manifest")
    if not isinstance(text, str) or len(text) > MAX_HEADER * 2:
        raise bad
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    if not raw or len(raw) % 512 or len(raw) > MAX_HEADER:
        raise BadInput(f"{label}: member {rec['name']!r} has a tar header of {len(raw)} bytes")
    source = Source(io.BytesIO(raw), name=f"{label}: the manifest's header of {rec['name']!r}", prefetch=False)
    try:
        header = next(iter(TarReader(source)), None)
    finally:
        source.close()
    if header is None or len(header.header) != len(raw):
        raise bad
    return header


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


def adopt_rebuilt(received: Bundle, parts: list[PartInput]) -> None:
    """Make a received bundle's delta parts the plain parts rebuilt while they were joined (--keep),
    once the join succeeded and before they are kept in a store: a release's part is always
    materialised, so the next release's delta is against a plain part and a chain of releases
    never makes a join slower than one delta."""
    made = {p.rebuild.file: p.rebuild for p in parts if isinstance(p.rebuild, DeltaRebuild)}
    if not made:
        return  # the manifest is kept byte for byte (and its signature with it)
    entries = []
    for entry in received.doc["parts"]:
        rebuild = made.get(entry["file"])
        if is_delta_part(entry) and rebuild is not None and rebuild.kept is not None and rebuild.keep_path:
            os.replace(rebuild.keep_path, os.path.join(received.path, entry["file"]))
            entry = plain_entry(entry, {k: rebuild.kept[k] for k in ("size", "sha256", "xxh3", "raw_size")})
        entries.append(entry)
    received.doc["parts"] = entries
    received.manifest_changed()


def plain_entry(entry: dict, info: dict) -> dict:
    """A delta part's manifest entry as the rebuilt plain part's."""
    members = [{k: v for k, v in rec.items() if k not in ("from", "header", "padding")} for rec in entry["members"]]
    out = {**entry, **info, "members": members}
    out.pop("needs", None)
    return out
