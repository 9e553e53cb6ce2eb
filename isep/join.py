"""Joining: parts back into one image archive, verified while it streams.

Members of the parts are merged back by their position in the original save (every part keeps its
members in that order), so a bundle made from a single-image save gives the original stream byte
for byte. The archive's final metadata (manifest.json, repositories, index.json, oci-layout) and
whatever follows it are held back until every part's size and hash and every layer's diffID
checked out; on a failed check they are never written, and neither is the end-of-archive marker,
so no loader accepts the output.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import xxhash
import zstandard

from .archive import JSON_CAP, KEPT_JSON_TOTAL, load_json
from .bundle import BUNDLE_MANIFEST, ISULA_MANIFEST, Store, find_part, parse_manifest, write_all
from .digests import MAX_ZSTD_WINDOW, BlobHasher, Decompressor, sniff_compression
from .errors import BadInput, EnvironmentFailure, IntegrityError, UsageError
from .names import same_image_name
from .tarstream import CHUNK, Member, Source, TarReader, build_header, padded

FINAL_METADATA = ("manifest.json", "repositories", "index.json", "oci-layout")
HOLD_LIMIT = 64 << 20


class HashingFile:
    """A part file read through: a thread reads ahead and counts and hashes the stored (compressed)
    bytes, so that hashing overlaps decompression and the work of the caller."""

    def __init__(self, raw, what: str, *, sha256: bool = True, depth: int = 4):
        self.raw = raw
        self.what = what
        # one digest, the one checked: sha256, or xxh3 for a fast verify
        self.sha = hashlib.sha256() if sha256 else None
        self.xxh = None if sha256 else xxhash.xxh3_128()
        self.size = 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._left = memoryview(b"")
        self._eof = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                data = self.raw.read(CHUNK)
                if not data:
                    break
                self.size += len(data)
                (self.sha or self.xxh).update(data)
                self._queue.put(data)
            self._queue.put(b"")
        except BaseException as exc:
            self._queue.put(exc)

    def read(self, n: int = -1) -> bytes:
        if not len(self._left):
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise EnvironmentFailure(f"cannot read {self.what}: {item}")
            if not item:
                self._eof = True
                return b""
            if n is None or n < 0 or n >= len(item):
                return item  # the common case: a whole chunk, handed on without a copy
            self._left = memoryview(item)
        if n is None or n < 0 or n >= len(self._left):
            out, self._left = self._left, memoryview(b"")
        else:
            out, self._left = self._left[:n], self._left[n:]
        return bytes(out)

    def drain(self) -> None:
        while self.read(CHUNK):
            pass
        self._thread.join()

    def close(self) -> None:
        self._stop = True
        while self._thread.is_alive():  # unblock a reader thread waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.01)


class DecompressingReader:
    """readinto() over a compressed file; refuses to expand beyond the declared size (bombs)."""

    def __init__(self, hashing: HashingFile, compression: str | None, limit: int | None, what: str):
        self.src = hashing
        self.what = what
        self.limit = limit
        self.produced = 0
        self.compression = compression
        self._reader = None
        self._gzip: Decompressor | None = None
        self._pending = memoryview(b"")
        self._pieces = iter(())  # decompressed gzip output not yet handed out, piece by piece
        self._started = False

    def _start(self) -> None:
        self._started = True
        kind = self.compression
        if kind in (None, "auto"):
            head = self.src.read(CHUNK)
            self._pending = memoryview(head)
            kind = sniff_compression(head)
        if kind == "zstd":
            reader = _Prepend(bytes(self._pending), self.src) if len(self._pending) else self.src
            self._pending = memoryview(b"")
            self._reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(
                reader, read_size=CHUNK, read_across_frames=True)
        elif kind == "gzip":
            self._gzip = Decompressor("gzip", self.what)
            if len(self._pending):
                self._pieces = self._gzip.feed(bytes(self._pending))
                self._pending = memoryview(b"")

    def readinto(self, buf) -> int:
        if not self._started:
            self._start()
        try:
            n = self._readinto(buf)
        except zstandard.ZstdError as exc:
            raise BadInput(f"{self.what}: corrupt zstd data ({exc})") from None
        self.produced += n
        if self.limit is not None and self.produced > self.limit:
            raise IntegrityError(f"{self.what} expands beyond the {self.limit} bytes its manifest declares")
        return n

    def _readinto(self, buf) -> int:
        if self._reader is not None:
            return self._reader.readinto(buf)
        while not len(self._pending):
            piece = next(self._pieces, None)
            if piece is not None:
                self._pending = memoryview(piece)
                continue
            data = self.src.read(CHUNK)
            if not data:
                if self._gzip is not None:
                    self._gzip.finish()
                return 0
            if self._gzip is not None:
                self._pieces = self._gzip.feed(data)
            else:
                self._pending = memoryview(data)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _Prepend:
    def __init__(self, head: bytes, src):
        self.head = head
        self.src = src

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.src.read(n)


@dataclass
class PartInput:
    """One part to read: where from, and what its manifest entry promises (None for isula parts)."""

    label: str                      # how messages name it
    opener: Callable[[], object]    # returns a binary file object
    entry: dict | None = None
    expected_sha256: str | None = None
    expected_size: int | None = None
    order: int = 0


@dataclass
class JoinOptions:
    verify_parts: bool = True
    normalize: bool = False
    progress: Callable[[int], None] | None = None
    warn: Callable[[str], None] = lambda message: None


@dataclass
class _Open:
    part: PartInput
    hashing: HashingFile
    source: Source
    members: Iterator[Member]
    fh: object


@dataclass
class _Emitted:
    digests: dict = field(default_factory=dict)   # name -> {"sha256", "diff_id"} of file members
    links: dict = field(default_factory=dict)     # name -> link target name
    names: set = field(default_factory=set)
    blobs: dict = field(default_factory=dict)     # name -> data of small JSON members
    kept: int = 0                                 # their bytes together (bounded, as when indexing)


def _open_part(part: PartInput) -> _Open:
    fh = part.opener()
    hashing = HashingFile(fh, part.label)
    entry = part.entry or {}
    limit = entry.get("raw_size")
    reader = DecompressingReader(hashing, entry.get("compression"), limit, part.label)
    source = Source(reader, name=part.label)
    return _Open(part, hashing, source, iter(TarReader(source)), fh)


class Output:
    """The archive being written, with the held-back tail."""

    def __init__(self, out):
        self.out = out
        self.held: list[bytes] = []
        self.held_size = 0
        self.holding = False
        self.written = 0

    def write(self, data) -> None:
        if self.holding:
            self.held.append(bytes(data))
            self.held_size += len(data)
            if self.held_size > HOLD_LIMIT:
                raise BadInput(f"over {HOLD_LIMIT >> 20} MiB of members follow the archive's metadata")
        else:
            write_all(self.out, data)  # a short write (reader gone) must not pass unnoticed
            self.written += len(data)

    def release(self) -> None:
        for data in self.held:
            write_all(self.out, data)
        self.held = []
        self.holding = False


def _check_member(member: Member, want: dict | None, where: str) -> None:
    if want is None:
        return
    if want["name"] != member.name or (want.get("size") != member.size and member.is_file):
        raise IntegrityError(f"{where}: member {member.name!r} ({member.size} bytes) where its manifest "
                             f"lists {want['name']!r} ({want.get('size')} bytes)")


def _emit_member(member: Member, out: Output, emitted: _Emitted, copies: dict[str, list[str]],
                 want: dict | None, where: str, out_name: str | None) -> None:
    """Write one member as out_name (None: not at all) while checking its data against the
    manifest; its digests are recorded under its own name for the final checks."""
    write = out_name is not None and out_name not in emitted.names
    first = member.name not in emitted.digests and member.name not in emitted.links
    if write:
        if out_name in FINAL_METADATA:
            out.holding = True
        out.write(member.header if out_name == member.name
                  else build_header(out_name, member.size, mode=0o644, mtime=member.mtime))
    # sha256 and diffIDs are what a join checks; xxh3 would only cost time on the busiest thread
    hasher = BlobHasher(f"{where}: {member.name!r}", want_xxh3=False) if member.is_file else None
    spool = tempfile.TemporaryFile(prefix="isep-join-") if copies.get(member.name) else None
    keep = bytearray() if member.is_file and member.size <= JSON_CAP and first else None
    for chunk in member.iter_data():
        if hasher is not None:
            hasher.update(chunk)
        if keep is not None:
            keep += chunk
        if write:
            out.write(chunk)
        if spool is not None:
            spool.write(chunk)
    if write and member.padding:
        out.write(member.padding)
    if hasher is not None:
        got = hasher.result()
        if want is not None and want.get("sha256") and got["sha256"] != want["sha256"]:
            raise IntegrityError(f"{where}: member {member.name!r} has sha256 {got['sha256']}, "
                                 f"its manifest says {want['sha256']}")
        if first:
            emitted.digests[member.name] = got
            if keep is not None and keep[:1] in (b"{", b"["):
                emitted.blobs[member.name] = bytes(keep)
                emitted.kept += len(keep)
                if emitted.kept > KEPT_JSON_TOTAL:
                    raise BadInput(f"{where}: over {KEPT_JSON_TOTAL >> 20} MiB of JSON members")
    elif member.kind in ("symlink", "hardlink") and first:
        target = member.linkname if member.kind == "hardlink" else posixpath.normpath(
            posixpath.join(posixpath.dirname(member.name), member.linkname))
        emitted.links[member.name] = target
    if write:
        emitted.names.add(out_name)
    if spool is not None:
        for new_name in copies[member.name]:
            _emit_copy(spool, member, new_name, out, emitted)
        spool.close()


def _emit_copy(spool, member: Member, name: str, out: Output, emitted: _Emitted) -> None:
    """The same layer bytes under the name the app's metadata expects (another release's part)."""
    out.write(build_header(name, member.size, mode=0o644, mtime=member.mtime))
    spool.seek(0)
    while True:
        data = spool.read(CHUNK)
        if not data:
            break
        out.write(data)
    out.write(bytes(padded(member.size) - member.size))
    emitted.digests[name] = emitted.digests[member.name]
    emitted.names.add(name)


def _schedule(parts: list[_Open]) -> Iterator[tuple[int, dict | None]]:
    """(part index, expected member) in original-save order; parts without lists go in turn."""
    heap = []
    for i, p in enumerate(parts):
        entry = p.part.entry
        if entry is not None:
            for rec in entry["members"]:
                heap.append((rec["seq"], p.part.order, i, rec))
    if heap:
        heap.sort(key=lambda t: (t[0], t[1]))
        for _, _, i, rec in heap:
            yield i, rec
    for i, p in enumerate(parts):
        if p.part.entry is None:
            while True:
                yield i, None


def resolve_emitted(name: str, emitted: _Emitted) -> dict | None:
    seen = 0
    while name in emitted.links and seen < 8:
        name = emitted.links[name]
        seen += 1
    return emitted.digests.get(name)


def join_parts(parts: list[PartInput], out_stream, image: dict | None, options: JoinOptions,
               *, trailer_size: int = 1024) -> dict:
    """Stream the parts into one archive on out_stream; returns what was checked."""
    out = Output(out_stream)
    emitted = _Emitted()
    rename = None
    if options.normalize:
        if image is None:
            raise UsageError("--normalize needs an isep bundle (isula-build bundles are joined as they are)")
        rename, layout = normalized_names(parts, image)
        copies = {}
        for name in ("blobs/", "blobs/sha256/"):
            out.write(build_header(name, 0, mode=0o755, typeflag=b"5"))
    else:
        copies = _plan_copies(parts, image) if image else {}
    opened = [_open_part(p) for p in parts]
    checks = {"parts": [], "layers": 0}
    try:
        try:
            _stream(opened, out, emitted, copies, options, rename)
            for o in opened:
                _finish_part(o, options, checks)
        except BadInput as exc:  # damage inside a part (truncated, corrupt compressed data, bad header)
            raise IntegrityError(str(exc)) from None
        diff_ids, paths = _expected_layers(image, emitted, out)
        for i, (path, diff_id) in enumerate(zip(paths, diff_ids)):
            got = resolve_emitted(path, emitted)
            if got is None:
                raise IntegrityError(f"layer {i} ({path}) is in none of the parts")
            actual = got.get("diff_id") or got.get("sha256")
            if actual != diff_id:
                raise IntegrityError(f"layer {i} ({path}) has diffID {actual}, the image config says {diff_id}")
        checks["layers"] = len(paths)
    finally:
        for o in opened:
            o.source.close()
            o.hashing.close()
            try:
                o.fh.close()
            except OSError:
                pass
    if rename is not None:
        _write_normalized_metadata(out, image, layout, emitted)
        trailer_size = 1024
    out.release()
    write_all(out_stream, bytes(trailer_size))
    return checks


def _stream(opened: list[_Open], out: Output, emitted: _Emitted, copies, options: JoinOptions,
            rename: dict[str, str] | None) -> None:
    listed = any(o.part.entry is not None for o in opened)
    for o in opened:
        if o.part.entry is None and listed:
            raise UsageError("cannot join an isep part with an isula-build part")
    if listed:
        saves = {(o.part.entry or {}).get("save") for o in opened}
        one_save = len(saves) == 1 and None not in saves and rename is None
        for i, want in _schedule(opened):
            o = opened[i]
            member = next(o.members, None)
            if member is None:
                raise IntegrityError(f"{o.part.label}: ends before {want['name']!r}")
            _check_member(member, want, o.part.label)
            out_name = member.name if rename is None else rename.get(member.name)
            if one_save:  # a name twice in one save: both are written, and the last one counts
                emitted.names.discard(member.name)
                emitted.digests.pop(member.name, None)
                emitted.links.pop(member.name, None)
            _emit_member(member, out, emitted, copies, want, o.part.label, out_name)
            if options.progress:
                options.progress(out.written)
        for o in opened:
            extra = next(o.members, None)
            if extra is not None:
                raise IntegrityError(f"{o.part.label}: holds {extra.name!r}, which its manifest does not list")
    else:
        for o in opened:
            for member in o.members:
                _emit_member(member, out, emitted, copies, None, o.part.label, member.name)
                if options.progress:
                    options.progress(out.written)


def _finish_part(o: _Open, options: JoinOptions, checks: dict) -> None:
    for _ in o.members:  # the trailer: the reader checks it is well formed
        pass
    o.hashing.drain()
    part = o.part
    if part.expected_size is not None and o.hashing.size != part.expected_size:
        raise IntegrityError(f"{part.label}: {o.hashing.size} bytes, its manifest says {part.expected_size}")
    got = "sha256:" + o.hashing.sha.hexdigest()
    if part.expected_sha256 and options.verify_parts:
        want = part.expected_sha256 if part.expected_sha256.startswith("sha256:") else "sha256:" + part.expected_sha256
        if got != want:
            raise IntegrityError(f"{part.label}: sha256 {got[7:19]}…, its manifest says {want[7:19]}… "
                                 f"(corrupt, replaced or from another bundle)")
    checks["parts"].append({"part": part.label, "size": o.hashing.size, "sha256": got,
                            "verified": bool(part.expected_sha256 and options.verify_parts)})


def _expected_layers(image: dict | None, emitted: _Emitted, out: Output) -> tuple[list[str], list[str]]:
    """The image's diffIDs and layer paths: from the bundle manifest, or (isula bundles) from the
    held manifest.json and the config."""
    if image is not None and image.get("layer_paths"):
        return image["diff_ids"], image["layer_paths"]
    manifest_bytes = emitted.blobs.get("manifest.json")
    if manifest_bytes is None:
        raise BadInput("the joined parts hold no manifest.json")
    manifest = load_json(manifest_bytes, "manifest.json")
    if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
        raise BadInput("manifest.json of the joined parts does not describe exactly one image")
    entry = manifest[0]
    config_name = entry.get("Config")
    config_bytes = None
    if isinstance(config_name, str):
        name = config_name
        for _ in range(8):
            name = emitted.links.get(name, name)
        config_bytes = emitted.blobs.get(name)
    if config_bytes is None:
        raise BadInput(f"the image config {config_name!r} is in none of the parts")
    config = load_json(config_bytes, f"image config {config_name}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(diff_ids, list):
        raise BadInput(f"the image config {config_name!r} has no rootfs.diff_ids")
    layers = entry.get("Layers")
    if not isinstance(layers, list) or len(layers) != len(diff_ids):
        raise IntegrityError(f"manifest.json lists {len(layers or [])} layers, the config {len(diff_ids)}")
    return diff_ids, layers


def normalized_names(parts: list[PartInput], image: dict) -> tuple[dict[str, str], list[dict]]:
    """For --normalize: each layer and the config as blobs/sha256/<digest of the stored bytes>."""
    names = {rec["name"]: rec for part in parts for rec in (part.entry or {}).get("members", [])}
    rename, layers = {}, []
    for path in image["layer_paths"]:
        rec = names.get(path)
        for _ in range(8):
            if rec is None or rec.get("type") != "symlink":
                break
            rec = names.get(posixpath.normpath(posixpath.join(posixpath.dirname(rec["name"]), rec["link"])))
        if rec is None or not rec.get("sha256"):
            raise IntegrityError(f"layer {path} is in none of the parts")
        blob = "blobs/sha256/" + rec["sha256"][7:]
        rename[rec["name"]] = blob
        layers.append({"name": blob, "size": rec["size"], "digest": rec["sha256"],
                       "compression": rec.get("compression")})
    config = image["config"]
    rename[config["member"]] = "blobs/sha256/" + config["digest"][7:]
    return rename, layers


def _write_normalized_metadata(out: Output, image: dict, layers: list[dict], emitted: _Emitted) -> None:
    """Docker 25's layout: OCI manifest and index (one entry) beside manifest.json."""
    from .legacy import gojson
    from .names import normalize, split_tag
    config_digest = image["config"]["digest"]
    config_bytes = emitted.blobs.get(image["config"]["member"], b"")
    media = {None: "application/vnd.oci.image.layer.v1.tar", "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
    manifest = gojson({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": config_digest, "size": len(config_bytes)},
                       "layers": [{"mediaType": media[layer["compression"]], "digest": layer["digest"],
                                   "size": layer["size"]} for layer in layers]})
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                  "size": len(manifest)}
    tags = image.get("tags") or []
    if tags:
        descriptor["annotations"] = {"io.containerd.image.name": normalize(tags[0]),
                                     "org.opencontainers.image.ref.name": split_tag(tags[0])[1]}
    docker_manifest = gojson([{"Config": "blobs/sha256/" + config_digest[7:], "RepoTags": tags,
                               "Layers": [layer["name"] for layer in layers]}]) + b"\n"
    index = gojson({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [descriptor]}) + b"\n"
    repositories = {}
    for tag in tags:
        repo, t = split_tag(tag)
        repositories.setdefault(repo, {})[t] = image["diff_ids"][-1][7:]
    out.holding = True
    for name, data in (("blobs/sha256/" + manifest_digest[7:], manifest), ("index.json", index),
                       ("manifest.json", docker_manifest), ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                       ("repositories", gojson(repositories) + b"\n")):
        out.write(build_header(name, len(data), mode=0o644))
        out.write(data + bytes(padded(len(data)) - len(data)))


def _plan_copies(parts: list[PartInput], image: dict) -> dict[str, list[str]]:
    """Layer paths the app's metadata names that no part holds under that name (a base part from
    another release or producer): copy the member carrying that diffID under the expected name."""
    names = {}
    carriers = {}
    records = [rec for part in parts for rec in (part.entry or {}).get("members", [])]
    for rec in sorted(records, key=lambda r: r["seq"]):  # a name twice: the last one counts, as in a load
        names[rec["name"]] = rec
        if rec.get("type") == "file":
            carriers.setdefault(rec.get("diff_id") or rec.get("sha256"), rec["name"])
    copies: dict[str, list[str]] = {}
    for path, diff_id in zip(image.get("layer_paths") or [], image.get("diff_ids") or []):
        rec = names.get(path)
        hops = 0
        while rec is not None and rec.get("type") == "symlink" and hops < 8:  # a looping manifest ends
            rec = names.get(posixpath.normpath(posixpath.join(posixpath.dirname(rec["name"]),
                                                              str(rec.get("link")))))
            hops += 1
        if rec is not None and (rec.get("diff_id") or rec.get("sha256")) == diff_id:
            continue
        carrier = carriers.get(diff_id)
        if carrier is None:
            raise IntegrityError(f"layer {diff_id} ({path!r}) is in none of the parts")
        if image.get("byte_exact") and len({(p.entry or {}).get("save") for p in parts}) == 1:
            # the parts of the very save the image comes from hold every layer path: damage
            raise IntegrityError(f"layer path {path!r} of the image is in none of its parts")
        copies.setdefault(carrier, []).append(path)
    return copies


# --- bundles: which image, which part files ---------------------------------------------------------

@dataclass
class Bundle:
    """A bundle to join from: an isep store (with isep-bundle.json) or an isula-build directory."""

    path: str
    kind: str                       # "isep" | "isula"
    doc: dict | None = None         # isep-bundle.json
    isula: dict | None = None       # isula-build's manifest
    files: dict[str, Callable[[], object]] = field(default_factory=dict)  # received part files
    manifest_bytes: bytes = b""     # isep-bundle.json as stored, for signature checks
    signature: bytes | None = None  # isep-bundle.json.sig, when there is one

    def check_signature(self, allowed_signers: str) -> str:
        """The principal that signed this bundle's manifest; IntegrityError otherwise."""
        from .signing import verify_manifest
        if self.kind != "isep":
            raise IntegrityError(f"{self.path}: an isula-build bundle carries no signature")
        return verify_manifest(self.manifest_bytes, self.signature, allowed_signers)


def open_bundle(path: str) -> Bundle:
    from .signing import MAX_SIGNATURE, SIGNATURE_FILE
    store = Store(path, create=False)
    try:
        raw = store.read_raw(BUNDLE_MANIFEST, 64 << 20 + 1)
        if raw is not None:
            doc = parse_manifest(raw, os.path.join(path, BUNDLE_MANIFEST))
            return Bundle(path, "isep", doc=doc, manifest_bytes=raw,
                          signature=store.read_raw(SIGNATURE_FILE, MAX_SIGNATURE + 1))
        if store.exists(ISULA_MANIFEST):
            with store.open_read(ISULA_MANIFEST) as fh:
                isula = load_json(fh.read(JSON_CAP + 1), os.path.join(path, ISULA_MANIFEST))
            if not isinstance(isula, dict) or not isula:
                raise BadInput(f"{os.path.join(path, ISULA_MANIFEST)}: not an isula-build manifest")
            return Bundle(path, "isula", isula=isula)
    finally:
        store.close()
    raise UsageError(f"{path} holds neither {BUNDLE_MANIFEST} nor isula-build's {ISULA_MANIFEST}")


def _image_names(image: dict) -> list[str]:
    return list(image.get("tags") or [])


def select_image(images: list[dict], name: str | None, where: str) -> dict:
    if name is None:
        if len(images) == 1:
            return images[0]
        listing = ", ".join(n for im in images for n in _image_names(im)[:1]) or "untagged images"
        raise UsageError(f"{where} holds {len(images)} images ({listing}); name one")
    hits = [im for im in images if any(same_image_name(t, name) for t in _image_names(im))]
    if not hits and name.startswith("sha256:"):
        hits = [im for im in images if im.get("config", {}).get("digest", "").startswith(name)]
    if not hits:
        listing = ", ".join(n for im in images for n in _image_names(im)) or "untagged images"
        raise UsageError(f"no image {name!r} in {where} (it holds: {listing})")
    return hits[-1]  # the newest entry for that name


def _safe_join(directory: str, name: str) -> str:
    from .names import check_file_name
    problem = check_file_name(name, f"part name in {directory}")
    if problem:
        raise BadInput(problem)
    return os.path.join(directory, name)


def _opener(path: str) -> Callable[[], object]:
    if path == "-":  # a part on stdin (isep-join STORE -a -)
        return lambda: os.fdopen(os.dup(0), "rb", buffering=0)

    def open_it():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            from .errors import EnvironmentFailure
            raise EnvironmentFailure(f"cannot open part {path}: {exc.strerror}") from None
        return os.fdopen(fd, "rb", buffering=0)
    return open_it


def isep_part_inputs(bundle: Bundle, image: dict, overrides: dict[str, str],
                     extra: list[Bundle] = ()) -> list[PartInput]:
    """The parts an image needs: by file name, else (another release's store) by role and diffIDs."""
    docs = [bundle] + list(extra)
    out = []
    for order, file_name in enumerate(image["parts"]):
        found = None
        for b in docs:
            entry = find_part(b.doc, file_name)
            if entry is not None:
                found = (b, entry)
                break
        if found is None:
            found = _part_by_layers(docs, image, order == len(image["parts"]) - 1, file_name)
        b, entry = found
        role = entry["role"]
        path = overrides.get(role)
        opener = _opener(path) if path else b.files.get(entry["file"]) or _opener(_safe_join(b.path, entry["file"]))
        out.append(PartInput(label=path or entry["file"], opener=opener, entry=entry,
                             expected_sha256=entry["sha256"], expected_size=entry["size"], order=order))
    _check_coverage(image, [p.entry for p in out])
    check_order(image, [p.entry for p in out])
    return out


def _part_by_layers(docs: list[Bundle], image: dict, is_app: bool, file_name: str):
    ids = image["diff_ids"]
    best = None
    for b in docs:
        for entry in b.doc["parts"]:
            stack = entry.get("diff_ids") or []
            if is_app or entry["role"] == "app" or stack != ids[:len(stack)]:
                continue
            if best is None or len(stack) > len(best[1].get("diff_ids") or []):
                best = (b, entry)
    if best is None:
        raise UsageError(f"part {file_name} of {(image.get('tags') or ['the image'])[0]} is not in the "
                         f"bundle, and no part there carries its layers")
    return best


def _check_coverage(image: dict, entries: list[dict]) -> None:
    have = set()
    for entry in entries:
        have.update(entry.get("layers") or [])
        have.update(m.get("diff_id") or m.get("sha256") for m in entry["members"] if m.get("type") == "file")
    missing = [d for d in image["diff_ids"] if d not in have]
    if missing:
        raise IntegrityError(f"layer {missing[0]} of the image is in none of its parts")


def check_order(image: dict, entries: list[dict]) -> None:
    """Parts merge by stream position (seq): each lists its members in stream order, the parts of one
    save never list a position twice, and a byte-exact image's parts hold positions 0..N-1 exactly.
    A damaged seq would otherwise reorder the archive without any hash noticing."""
    by_save: dict = {}
    for entry in entries:
        seqs = [m["seq"] for m in entry["members"]]
        if any(b <= a for a, b in zip(seqs, seqs[1:])):
            raise IntegrityError(f"part {entry.get('file')}: its members are not in stream order")
        seen = by_save.setdefault(entry.get("save"), set())
        if seen & set(seqs):
            raise IntegrityError(f"part {entry.get('file')}: lists a stream position another part lists")
        seen.update(seqs)
    if image.get("byte_exact") and len(by_save) == 1:  # its own parts, not another release's base
        everything = set().union(*by_save.values())
        if everything != set(range(len(everything))):
            raise IntegrityError("the parts of a byte-exact image do not hold one whole save")


def isula_part_inputs(bundle: Bundle, name: str | None, overrides: dict[str, str]) -> list[PartInput]:
    """isula-build's bundles: gzip legacy-layout tarballs checked against the manifest's sha256."""
    keys = list(bundle.isula)
    if name is None:
        # the tags of one image are keys with the same app tarball
        apps = {str(e.get("app")) if isinstance(e, dict) else k for k, e in bundle.isula.items()}
        if len(apps) != 1:
            raise UsageError(f"{bundle.path} holds {len(apps)} images ({', '.join(keys)}); name one")
        key = keys[0]
    else:
        hits = [k for k in keys if same_image_name(k, name)]
        if not hits:
            raise UsageError(f"no image {name!r} in {bundle.path} (it holds: {', '.join(keys)})")
        key = hits[0]
    entry = bundle.isula[key]
    if not isinstance(entry, dict):
        raise BadInput(f"{bundle.path}/manifest: entry {key!r} is not an object")
    out = []
    for order, (role, file_key, hash_key) in enumerate(
            (("base", "base", "baseHash"), ("lib", "lib", "libHash"), ("app", "app", "appHash"))):
        file_name = entry.get(file_key) or ""
        if not isinstance(file_name, str):
            raise BadInput(f"{bundle.path}/manifest: {file_key} of {key!r} is not a string")
        if not file_name and role != "lib":
            raise BadInput(f"{bundle.path}/manifest: {key!r} has no {role} tarball")
        if not file_name and role not in overrides:
            continue  # saved without a lib (isula-build itself cannot load these)
        path = overrides.get(role) or _safe_join(bundle.path, file_name)
        out.append(PartInput(label=path, opener=_opener(path), entry=None,
                             expected_sha256=entry.get(hash_key) or None, order=order))
    return out


def receive_stream(source: Source, temp_dir: str) -> Bundle:
    """Read a bundle stream (isep-pack -o -) into part files under temp_dir; its manifest comes last
    and is checked against what arrived before anything is joined."""
    from .names import check_file_name
    from .targets import STREAM_HEAD, STREAM_SCHEMA
    from .signing import MAX_SIGNATURE, SIGNATURE_FILE
    manifest_bytes, signature = b"", None
    files: dict[str, tuple[object, int]] = {}
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
            if problem or not number.isdigit():
                raise BadInput(problem or f"bundle stream: bad chunk name {name!r}")
            fh, count = files.get(file_name, (None, 0))
            if int(number) != count:
                raise BadInput(f"bundle stream: chunk {name!r} out of order")
            if fh is None:
                fh = open(os.path.join(temp_dir, file_name), "xb")
            for chunk in member.iter_data():
                fh.write(chunk)
            files[file_name] = (fh, count + 1)
        elif name == BUNDLE_MANIFEST:
            manifest_bytes = member.read_all(64 << 20)
            doc = parse_manifest(manifest_bytes, "bundle stream manifest")
        elif name == SIGNATURE_FILE:
            signature = member.read_all(MAX_SIGNATURE)
        elif name == ISULA_MANIFEST:
            member.skip()
        else:
            raise BadInput(f"bundle stream: unexpected member {name!r}")
    if doc is None:
        raise BadInput("bundle stream ended before its manifest: incomplete (interrupted sender?)")
    for fh, _ in files.values():
        fh.close()
    listed = {p["file"] for p in doc["parts"]}
    stray = set(files) - listed
    if stray:
        raise BadInput(f"bundle stream carries {sorted(stray)[0]!r}, which its manifest does not list")
    missing = listed - set(files)
    if missing:
        raise BadInput(f"bundle stream lacks part {sorted(missing)[0]!r} that its manifest lists")
    bundle = Bundle(temp_dir, "isep", doc=doc, manifest_bytes=manifest_bytes, signature=signature)
    bundle.files = {f: _opener(os.path.join(temp_dir, f)) for f in files}
    return bundle
