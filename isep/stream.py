"""The bundle stream (`isep-pack -o -`, `isep-join STORE -`): a whole bundle as one tar stream.

It starts with isep-stream.json, then carries each part as numbered chunk members
(`parts/<file>/<n>`, at most 4 MiB each), then isula-build's manifest and isep-bundle.json (and its
signature) last. StreamTarget writes one; receive_stream reads one into part files and checks them
against the manifest that ends it; keep_received moves them into a store (`isep-join STORE - --keep`).
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import BinaryIO, Callable

from .archive import JSON_CAP, load_json
from .bundle import (MANIFEST_CAP, Bundle, Store, encode_manifest, is_delta_part, isep_part_inputs,
                     merge_manifest, parse_manifest)
from .names import (BUNDLE_MANIFEST, ISULA_MANIFEST, SIGNATURE_FILE, check_file_name, coexisting_name, display_name,
                    follow_renames)
from .refs import Held
from .parts import TemporaryPart, drain, part_opener
from .signing import MAX_SIGNATURE, sign_manifest
from .errors import BadInput, EnvironmentFailure, IsepError, os_error
from .files import write_all
from .tarstream import Source, TarReader, padded
from .tarwrite import build_header

STREAM_SCHEMA = "isep-stream/1"
STREAM_HEAD = "isep-stream.json"
STREAM_NEEDS = "isep-needs.json"  # the store layers delta parts read, sent before their bytes
STREAM_CHUNK = 4 << 20
_CHUNK_NUMBER = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() and int() also take '²' and '١'


class _StreamPart:
    """One part's compressed bytes, cut into chunk members of STREAM_CHUNK bytes."""

    def __init__(self, target: StreamTarget, file_name: str):
        self.target = target
        self.file_name = file_name
        self.buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data
        while len(self.buf) >= STREAM_CHUNK:
            self.target.chunk(self.file_name, bytes(self.buf[:STREAM_CHUNK]))
            del self.buf[:STREAM_CHUNK]

    def close(self) -> None:
        if self.buf:
            self.target.chunk(self.file_name, bytes(self.buf))
            self.buf.clear()


class StreamTarget:
    """A bundle as one tar stream: a head, then each part as numbered chunk members
    (`parts/<file>/<n>`, at most 4 MiB each), then isula's manifest and isep-bundle.json last."""

    spool_dir = None
    reference_doc = None
    spool_compression = None

    def holds_part(self, entry: dict) -> bool:
        return False  # a stream starts no store: nothing to reuse

    def __init__(self, out: BinaryIO, head: dict, sign_key: str | None = None):
        self.out = out
        self.sign_key = sign_key
        self.existing: dict | None = None   # a stream starts no store: nothing to reuse
        self._counters: dict[str, int] = {}
        self._named: list[tuple[TemporaryPart, str]] = []
        self._lock = threading.RLock()  # parts' frames are written from the compression threads
        self._head = json.dumps({"schema": STREAM_SCHEMA, **head}).encode()
        self._started = False  # nothing reaches stdout before the first part bytes: errors leave it empty

    def _emit(self, name: str, data: bytes | bytearray) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._emit(STREAM_HEAD, self._head)
            self.out.write(build_header(name, len(data), mode=0o644))
            self.out.write(data)
            self.out.write(bytes(padded(len(data)) - len(data)))

    def chunk(self, file_name: str, data: bytes) -> None:
        with self._lock:
            n = self._counters.get(file_name, 0)
            self._counters[file_name] = n + 1
            self._emit(f"parts/{file_name}/{n:06d}", data)

    def open(self, file_name: str) -> _StreamPart:
        return _StreamPart(self, file_name)

    def announce_needs(self, needs: list[dict]) -> None:
        """Tell the receiver which layers of its store the delta parts that follow read."""
        self._emit(STREAM_NEEDS, json.dumps(needs).encode())

    def open_section(self) -> TemporaryPart:
        return TemporaryPart(None, ".isep-tmp-section-")

    def reopen(self, out: TemporaryPart) -> BinaryIO:
        return out.rewound()

    def name(self, out: TemporaryPart, file_name: str | None) -> None:
        if file_name is not None:
            self._named.append((out, file_name))

    def finish(self, parts: list[dict], images: list[dict], isula: bytes | None) -> dict:
        for out, file_name in self._named:
            for data in out.chunks(STREAM_CHUNK):
                self.chunk(file_name, data)
        doc = merge_manifest(None, parts, images)
        if isula is not None:
            self._emit(ISULA_MANIFEST, isula)
        manifest = encode_manifest(doc)
        self._emit(BUNDLE_MANIFEST, manifest)
        if self.sign_key is not None:
            self._emit(SIGNATURE_FILE, sign_manifest(manifest, self.sign_key))
        self.out.write(bytes(1024))
        self.out.flush()
        return doc

    def abort(self) -> None:
        drain()


# --- reading a bundle stream ---------------------------------------------------------------------------

def receive_stream(source: Source, temp_dir: str,
                   on_needs: Callable[[object], object] | None = None) -> Bundle:
    """Read a bundle stream (isep-pack -o -) into part files under temp_dir; its manifest comes last
    and is checked against what arrived before anything is joined. on_needs sees the announced
    store layers the stream's delta parts read, as soon as they arrive (it may refuse them)."""
    manifest_bytes, signature = b"", None
    files: dict[str, tuple[BinaryIO | None, int]] = {}
    doc = head = None
    for member in TarReader(source):
        name = member.name
        if name == STREAM_HEAD:
            head = load_json(member.read_all(JSON_CAP), "bundle stream head")
            if not isinstance(head, dict) or head.get("schema") != STREAM_SCHEMA:
                raise BadInput("not an isep bundle stream (unknown head)")
        elif head is None:
            raise BadInput("not an isep bundle stream (it does not start with isep-stream.json)")
        elif name.startswith("parts/") and member.is_file:
            _, file_name, number = (name.split("/") + ["", ""])[:3]
            problem = check_file_name(file_name, "bundle stream part")
            if problem or not _CHUNK_NUMBER.fullmatch(number):
                raise BadInput(problem or f"bundle stream: bad chunk name {name!r}")
            fh, count = files.get(file_name, (None, 0))
            if int(number) != count:
                raise BadInput(f"bundle stream: chunk {name!r} out of order")
            try:
                if fh is None:
                    fh = open(os.path.join(temp_dir, file_name), "xb", buffering=0)
                    files[file_name] = (fh, count)
                for chunk in member.iter_data():
                    write_all(fh, chunk)  # unbuffered: a full disk shows here, not at close
            except OSError as exc:
                raise os_error(exc, f"cannot receive {file_name} into {temp_dir}") from None
            files[file_name] = (fh, count + 1)
        elif name == BUNDLE_MANIFEST:
            manifest_bytes = member.read_all(MANIFEST_CAP)
            doc = parse_manifest(manifest_bytes, "bundle stream manifest")
        elif name == SIGNATURE_FILE:
            signature = member.read_all(MAX_SIGNATURE)
        elif name == ISULA_MANIFEST:
            member.skip()
        elif name == STREAM_NEEDS:
            needs = load_json(member.read_all(JSON_CAP), "bundle stream's needs")
            if on_needs is not None:
                on_needs(needs)
        else:
            raise BadInput(f"bundle stream: unexpected member {name!r}")
    if doc is None:
        raise BadInput("bundle stream ended before its manifest: incomplete (interrupted sender?)")
    for fh, _ in files.values():
        if fh is not None:
            fh.close()
    listed = {p["file"] for p in doc["parts"]}
    stray = set(files) - listed
    if stray:
        raise BadInput(f"bundle stream carries {sorted(stray)[0]!r}, which its manifest does not list")
    missing = listed - set(files)
    if missing:
        raise BadInput(f"bundle stream lacks part {sorted(missing)[0]!r} that its manifest lists")
    return Bundle(temp_dir, "isep", doc=doc, manifest_bytes=manifest_bytes, signature=signature,
                  files={f: part_opener(os.path.join(temp_dir, f)) for f in files})


# --- keeping a received bundle stream (isep-join STORE - --keep) ------------------------------------

def check_keepable(store: Store, received: Bundle, chosen: dict) -> None:
    """Refuse before joining when the store holds a different part under the name of a received
    part it would keep: any plain part, and the delta parts the join of CHOSEN reads."""
    read = set(chosen["parts"])
    _kept_parts(store, [p for p in received.doc["parts"] if p["file"] in read or not is_delta_part(p)],
                store.read_manifest())


def leave_unread_deltas(received: Bundle) -> list[str]:
    """Take out of RECEIVED the delta parts still in it once the join's rebuilt ones are adopted
    (deltajoin.adopt_rebuilt): another image's in a multi-image stream, which this join did not
    read. A store keeps each release's part plain and only a join rebuilds one; such a part is kept
    by joining its image with --keep. The images that need them go too. Returns their file names."""
    left = [p["file"] for p in received.doc["parts"] if is_delta_part(p)]
    if left:
        received.doc["parts"] = [p for p in received.doc["parts"] if p["file"] not in left]
        received.doc["images"] = [im for im in received.doc["images"] if not set(im["parts"]) & set(left)]
        received.manifest_changed()
    return left


def _store_names(parts: list[dict], current: dict | None) -> dict[str, str]:
    """Each received part's name in the store: its own, or for another version of a part the store
    holds under that name (a base, lib or app rebuilt under a floating tag), the chainID-suffixed
    one (names.coexisting_name)."""
    return {p["file"]: coexisting_name([current], p, ("base", "lib", "app")) for p in parts}


def _kept_parts(store: Store, parts: list[dict], current: dict | None) -> dict[str, str]:
    """The received PARTS' files the store lacks, each with the name it takes there (_store_names).
    Any other different part under that name is refused, as a pack into the store refuses it."""
    store_names = _store_names(parts, current)
    known = {p["file"]: p for p in (current or {}).get("parts", [])}
    new = {}
    for part in parts:
        name = store_names[part["file"]]
        old = known.get(name)
        if old is not None and old.get("sha256") == part["sha256"]:
            continue  # the store already holds this very part
        if old is not None or store.exists(name):
            raise EnvironmentFailure(f"{os.path.join(store.path, name)} already holds a different "
                                     f"part; --keep never replaces one (keep into another store)")
        new[part["file"]] = name
    return new


def _renamed_image(received: Bundle, image: dict) -> dict | None:
    """IMAGE as the received manifest lists it now (its parts may have been renamed); None when it
    is not kept (leave_unread_deltas)."""
    return next((im for im in received.doc["images"] if im["config"] == image["config"]
                 and im.get("tags") == image.get("tags")), None)


def _rename_received(received: Bundle, names: dict[str, str]) -> None:
    """Received parts and the images naming them under the names they take in the store."""
    received.doc["parts"] = [{**p, "file": names.get(p["file"], p["file"])} for p in received.doc["parts"]]
    follow_renames(received.doc["images"], names)


def _check_store_parts(store: Store, received: Bundle, current: dict | None, joined: dict,
                       have: list[Held] | None) -> None:
    """The store still holds every part the joined image read from it: an isep-prune may have
    removed one between the join and this keep, which takes the lock only now."""
    ours = {p["file"] for p in received.doc["parts"]}
    doc = {**(current or {}), "parts": [p for p in (current or {}).get("parts", []) if p["file"] not in ours]
           + received.doc["parts"]}
    try:
        parts = isep_part_inputs(Bundle(store.path, "isep", doc=doc), joined, {}, have=have)
    except IsepError as exc:
        raise EnvironmentFailure(f"{store.path} changed while {display_name(joined)} was joined (isep-prune?): "
                                 f"{exc}; nothing kept") from None
    for part in parts:
        if part.entry is not None and not store.holds_part(part.entry):
            raise EnvironmentFailure(f"{os.path.join(store.path, part.entry['file'])}, which "
                                     f"{display_name(joined)} reads, was removed while it was joined "
                                     f"(isep-prune?); nothing kept")


def keep_received(store: Store, received: Bundle, joined: dict | None = None,
                  have: list[Held] | None = None) -> list[str]:
    """Move the received parts (in a directory inside the store) into the store, then write its
    manifest last: the received one as it came (signature included) into a store without one, else
    the store's merged with it. Under the store's lock; on failure the parts renamed are removed
    again. JOINED (the image joined, with HAVE as its join had): refused when a store part it read
    is gone by now. Returns the part files added."""
    inside = os.path.relpath(received.path, store.path)
    if os.sep in inside or inside.startswith(".."):
        raise ValueError("the received parts must be in a directory directly inside the store")
    committed: list[str] = []
    try:
        with store.locked():
            current = store.read_manifest()
            for file_name, store_name in _kept_parts(store, received.doc["parts"], current).items():
                _sync_file(os.path.join(received.path, file_name))
                store.commit(os.path.join(inside, file_name), store_name)
                committed.append(store_name)
            names = _store_names(received.doc["parts"], current)
            if any(a != b for a, b in names.items()):
                _rename_received(received, names)
            kept_image = None if joined is None else _renamed_image(received, joined)
            if kept_image is not None:
                _check_store_parts(store, received, current, kept_image, have)
            _write_kept_manifest(store, received, current)
    except BaseException:
        for name in committed:  # ours, renamed a moment ago: the store is as it was or complete
            store.remove(name)
        raise
    return committed


def _sync_file(path: str) -> None:
    """A kept part's bytes reach the disk before its name enters the store: after a power cut on a
    device the store lists no part whose bytes were lost (the manifest is written after the parts)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise os_error(exc, f"cannot write {path}") from None


def _write_kept_manifest(store: Store, received: Bundle, current: dict | None) -> None:
    data: bytes | bytearray
    if current is None:
        data = received.manifest_bytes
        if received.signature is not None:  # still valid: the manifest is kept byte for byte
            sig_temp = store.prepare_file(SIGNATURE_FILE, received.signature)
            store.commit(sig_temp, SIGNATURE_FILE, replace=True)
    else:
        data = encode_manifest(merge_manifest(current, received.doc["parts"], received.doc["images"]))
    temp = store.prepare_file(BUNDLE_MANIFEST, data)
    store.commit(temp, BUNDLE_MANIFEST, replace=True)
    try:
        os.fsync(store.fd)
    except OSError:
        pass
