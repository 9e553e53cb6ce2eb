"""Joining: parts back into one image archive, verified while it streams.

Members of the parts are merged back by their position in the original save (every part keeps its
members in that order), so a bundle made from a single-image save gives the original stream byte
for byte. The archive's final metadata members (manifest.json, repositories, index.json,
oci-layout) are held back in memory until every part's size and hash and every layer's diffID
checked out, then written last; on a failed check they are never written, and neither is the
end-of-archive marker, so no loader accepts the output. Only those small JSON members are held:
the members that follow them (another release's base layer, merged by its own save's positions;
the layers of a save whose metadata comes first) stream on, so memory stays flat. Every real
producer ends its save with that metadata, so the join of one save stays byte for byte; other
archives join with their metadata moved to the end, which loaders accept (they read the whole
archive before parsing it).
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Callable, Iterator

from .archive import (JSON_CAP, KEPT_JSON_TOTAL, KeptJson, ProgressCallback, follow_links, link_target, load_json,
                      pass_member, symlinks_in)
from .files import Writable, write_all
from .digests import digest_hex
from .errors import BadInput, IntegrityError, UsageError
from .legacy import gojson
from .names import normalize, split_tag
from .parts import DecompressingReader, HashingFile, PartInput, rewound_chunks
from .tarstream import Member, Source, TarReader, padded
from .tarwrite import build_header
from .thin import left_out_members

FINAL_METADATA = ("manifest.json", "repositories", "index.json", "oci-layout")
HOLD_LIMIT = KEPT_JSON_TOTAL  # all held metadata members together (a name may occur twice)


def _no_warning(message: str) -> None:
    pass


@dataclass
class JoinOptions:
    verify_parts: bool = True
    normalize: bool = False
    progress: ProgressCallback | None = None
    warn: Callable[[str], None] = _no_warning
    thin_layers: int = 0  # bottom layers the loading engine holds (--have): their files are left out


@dataclass
class _Open:
    part: PartInput
    hashing: HashingFile
    source: Source
    members: Iterator[Member]
    fh: BinaryIO


@dataclass
class _Emitted:
    digests: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "diff_id"} of file members
    links: dict[str, str] = field(default_factory=dict)     # name -> link target name
    names: set[str] = field(default_factory=set)
    kept: KeptJson = field(default_factory=lambda: KeptJson("the parts"))  # small JSON members


def _open_part(part: PartInput) -> _Open:
    fh = part.opener()
    hashing = HashingFile(fh, part.label)
    entry = part.entry or {}
    limit = entry.get("raw_size")
    reader = DecompressingReader(hashing, entry.get("compression"), limit, part.label)
    source = Source(reader, name=part.label)
    members = iter(TarReader(source))
    return _Open(part, hashing, source, members if part.rebuild is None else part.rebuild(members), fh)


class Output:
    """The archive being written; the final metadata members (only they) are held back, written
    by release() after every check."""

    def __init__(self, out: Writable):
        self.out = out
        self.held: list[bytes] = []
        self.held_size = 0
        self.holding = False
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        if self.holding:
            self.held.append(bytes(data))
            self.held_size += len(data)
            if self.held_size > HOLD_LIMIT:
                raise BadInput(f"the archive's metadata members add up to over {HOLD_LIMIT >> 20} MiB")
        else:
            write_all(self.out, data)  # a short write (reader gone) must not pass unnoticed
            self.written += len(data)

    def hold(self, name: str, size: int) -> None:
        """Hold the member about to be written (its header, data, padding) until release()."""
        if size > JSON_CAP:
            raise BadInput(f"the archive's metadata member {name!r} ({size} bytes) is over the "
                           f"{JSON_CAP >> 20} MiB limit for metadata")
        self.holding = True

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
    write_as = None if out_name in emitted.names else out_name
    first = member.name not in emitted.digests and member.name not in emitted.links
    if write_as is not None:
        if write_as in FINAL_METADATA:
            out.hold(write_as, member.size)
        out.write(member.header if write_as == member.name
                  else build_header(write_as, member.size, mode=0o644, mtime=member.mtime))
    spool = tempfile.TemporaryFile(prefix="isep-join-") if copies.get(member.name) else None
    sinks: list[Callable[[bytes | memoryview], object]] = [] if write_as is None else [out.write]
    if spool is not None:
        sinks.append(spool.write)
    # sha256 and diffIDs are what a join checks; xxh3 would only cost time on the busiest thread
    got = pass_member(member, sinks, emitted.kept if first else None, what=f"{where}: {member.name!r}",
                      want_xxh3=False)
    if write_as is not None and member.padding:
        out.write(member.padding)
    out.holding = False  # the members after it stream on
    if member.is_file:
        if want is not None and want.get("sha256") and got["sha256"] != want["sha256"]:
            raise IntegrityError(f"{where}: member {member.name!r} has sha256 {got['sha256']}, "
                                 f"its manifest says {want['sha256']}")
        if first:
            emitted.digests[member.name] = _digests_to_keep(got, want)
    elif member.kind in ("symlink", "hardlink") and first:
        emitted.links[member.name] = link_target(member.name, member.linkname, member.kind)
    if write_as is not None:
        emitted.names.add(write_as)
    if spool is not None:
        for new_name in copies[member.name]:
            _emit_copy(spool, member, new_name, out, emitted)
        spool.close()


def _digests_to_keep(got: dict, want: dict | None) -> dict:
    """The manifest's record (held anyway) when it says what was computed for what the final checks
    read, rather than a second dict and digest string per member."""
    if want is not None and all(want.get(key) == got.get(key) for key in ("sha256", "diff_id")):
        return want
    return got


def _emit_copy(spool: IO[bytes], member: Member, name: str, out: Output, emitted: _Emitted) -> None:
    """The same layer bytes under the name the app's metadata expects (another release's part)."""
    out.write(build_header(name, member.size, mode=0o644, mtime=member.mtime))
    for data in rewound_chunks(spool):
        out.write(data)
    out.write(bytes(padded(member.size) - member.size))
    emitted.digests[name] = emitted.digests[member.name]
    emitted.names.add(name)


def _schedule(parts: list[_Open]) -> Iterator[tuple[int, dict]]:
    """(part index, expected member) in original-save order, from the parts' member lists."""
    heap = []
    for i, p in enumerate(parts):
        entry = p.part.entry
        if entry is not None:
            for rec in entry["members"]:
                heap.append((rec["seq"], p.part.order, i, rec))
    heap.sort(key=lambda t: (t[0], t[1]))
    for _, _, i, rec in heap:
        yield i, rec


def _resolve_emitted(name: str, emitted: _Emitted) -> dict | None:
    return emitted.digests.get(follow_links(name, emitted.links.get))


def join_parts(parts: list[PartInput], out_stream: Writable, image: dict | None, options: JoinOptions,
               *, trailer_size: int = 1024) -> dict:
    """Stream the parts into one archive on out_stream; returns what was checked."""
    out = Output(out_stream)
    emitted = _Emitted()
    rename = None
    if options.normalize:
        if image is None:
            raise UsageError("--normalize needs an isep bundle (isula-build bundles are joined as they are)")
        rename, layout = normalized_names(parts, image)
        copies: dict[str, list[str]] = {}
        for name in ("blobs/", "blobs/sha256/"):
            out.write(build_header(name, 0, mode=0o755, typeflag=b"5"))
    else:
        copies = plan_copies([p.entry or {} for p in parts], image, options.thin_layers) if image else {}
    leave_out = _thin_leave_out(parts, image, options.thin_layers)
    opened = [_open_part(p) for p in parts]
    checks: dict = {"parts": [], "layers": 0}
    try:
        try:
            _stream(opened, out, emitted, copies, options, rename, leave_out)
            for o in opened:
                _finish_part(o, options, checks)
        except BadInput as exc:  # damage inside a part (truncated, corrupt compressed data, bad header)
            raise IntegrityError(str(exc)) from None
        diff_ids, paths = _expected_layers(image, emitted, out)
        left_out = 0
        for i, (path, diff_id) in enumerate(zip(paths, diff_ids)):
            got = _resolve_emitted(path, emitted)
            if got is None and i < options.thin_layers:
                left_out += 1
                continue  # the engine holds it; its diffID is checked against the config below
            if got is None:
                raise IntegrityError(f"layer {i} ({path}) is in none of the parts")
            actual = got.get("diff_id") or got.get("sha256")
            if actual != diff_id:
                raise IntegrityError(f"layer {i} ({path}) has diffID {actual}, the image config says {diff_id}")
        checks["layers"] = len(paths) - left_out
        if options.thin_layers:
            _check_thin_config(image, emitted)
    finally:
        for o in opened:
            getattr(o.members, "close", lambda: None)()  # a rebuilt part's threads end while its reader lives
        for o in opened:
            o.source.close()
            o.hashing.close()
            try:
                o.fh.close()
            except OSError:
                pass
    if rename is not None and image is not None:
        _write_normalized_metadata(out, image, layout, emitted)
        trailer_size = 1024
    out.release()
    write_all(out_stream, bytes(trailer_size))
    return checks


def _stream(opened: list[_Open], out: Output, emitted: _Emitted, copies: dict[str, list[str]], options: JoinOptions,
            rename: dict[str, str] | None, leave_out: set[str]) -> None:
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
            if member.name in leave_out:
                out_name = None  # read and checked all the same: the part's hash covers it
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


def _thin_leave_out(parts: list[PartInput], image: dict | None, thin_layers: int) -> set[str]:
    if not thin_layers:
        return set()
    if image is None or not image.get("layer_paths"):
        raise UsageError("--have needs an isep bundle (isula-build bundles are joined whole)")
    records = [rec for p in parts for rec in (p.entry or {}).get("members", [])]
    return left_out_members(records, image["layer_paths"], thin_layers)


def _check_thin_config(image: dict | None, emitted: _Emitted) -> None:
    """The layers left out are named by the config the loader reads: it must list the diffIDs that
    --have was matched against (the bundle manifest's), or the engine would be asked for other chains."""
    member = (image or {}).get("config", {}).get("member")
    raw = emitted.kept.blobs.get(follow_links(member, emitted.links.get)) if isinstance(member, str) else None
    config = load_json(raw, f"image config {member}") if raw is not None else None
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if image is None or diff_ids != image["diff_ids"]:
        raise IntegrityError(f"the image config {member!r} does not list the diffIDs its bundle manifest "
                             f"names, which --have was matched against")


def _finish_part(o: _Open, options: JoinOptions, checks: dict) -> None:
    for _ in o.members:  # the trailer: the reader checks it is well formed
        pass
    o.hashing.drain()
    part = o.part
    if part.expected_size is not None and o.hashing.size != part.expected_size:
        raise IntegrityError(f"{part.label}: {o.hashing.size} bytes, its manifest says {part.expected_size}")
    got = o.hashing.digest()
    if part.expected_sha256 and options.verify_parts:
        want = part.expected_sha256 if part.expected_sha256.startswith("sha256:") else "sha256:" + part.expected_sha256
        if got != want:
            raise IntegrityError(f"{part.label}: sha256 {digest_hex(got)[:12]}…, "
                                 f"its manifest says {digest_hex(want)[:12]}… "
                                 f"(corrupt, replaced or from another bundle)")
    checks["parts"].append({"part": part.label, "size": o.hashing.size, "sha256": got,
                            "verified": bool(part.expected_sha256 and options.verify_parts)})


def _expected_layers(image: dict | None, emitted: _Emitted, out: Output) -> tuple[list[str], list[str]]:
    """The image's diffIDs and layer paths: from the bundle manifest, or (isula bundles) from the
    held manifest.json and the config."""
    if image is not None and image.get("layer_paths"):
        return image["diff_ids"], image["layer_paths"]
    manifest_bytes = emitted.kept.blobs.get("manifest.json")
    if manifest_bytes is None:
        raise BadInput("the joined parts hold no manifest.json")
    manifest = load_json(manifest_bytes, "manifest.json")
    if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
        raise BadInput("manifest.json of the joined parts does not describe exactly one image")
    entry = manifest[0]
    config_name = entry.get("Config")
    config_bytes = None
    if isinstance(config_name, str):
        config_bytes = emitted.kept.blobs.get(follow_links(config_name, emitted.links.get))
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
        rec = names.get(follow_links(path, symlinks_in(names)))
        if rec is None or not rec.get("sha256"):
            raise IntegrityError(f"layer {path} is in none of the parts")
        blob = "blobs/sha256/" + digest_hex(rec["sha256"])
        rename[rec["name"]] = blob
        layers.append({"name": blob, "size": rec["size"], "digest": rec["sha256"],
                       "compression": rec.get("compression")})
    config = image["config"]
    rename[config["member"]] = "blobs/sha256/" + digest_hex(config["digest"])
    return rename, layers


def _write_normalized_metadata(out: Output, image: dict, layers: list[dict], emitted: _Emitted) -> None:
    """Docker 25's layout: OCI manifest and index (one entry) beside manifest.json."""
    config_digest = image["config"]["digest"]
    config_bytes = emitted.kept.blobs.get(image["config"]["member"], b"")
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
    docker_manifest = gojson([{"Config": "blobs/sha256/" + digest_hex(config_digest), "RepoTags": tags,
                               "Layers": [layer["name"] for layer in layers]}]) + b"\n"
    index = gojson({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [descriptor]}) + b"\n"
    repositories: dict[str, dict[str, str]] = {}
    for tag in tags:
        repo, t = split_tag(tag)
        repositories.setdefault(repo, {})[t] = digest_hex(image["diff_ids"][-1])
    for name, data in (("blobs/sha256/" + digest_hex(manifest_digest), manifest), ("index.json", index),
                       ("manifest.json", docker_manifest), ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                       ("repositories", gojson(repositories) + b"\n")):
        out.hold(name, len(data))
        out.write(build_header(name, len(data), mode=0o644))
        out.write(data + bytes(padded(len(data)) - len(data)))


def plan_copies(entries: list[dict], image: dict, thin_layers: int = 0) -> dict[str, list[str]]:
    """Layer paths the app's metadata names that no part holds under that name (a base part from
    another release or producer): copy the member carrying that diffID under the expected name.
    entries: the parts' manifest entries."""
    names = {}
    carriers: dict[str, str] = {}
    records = [rec for entry in entries for rec in entry.get("members", [])]
    for rec in sorted(records, key=lambda r: r["seq"]):  # a name twice: the last one counts, as in a load
        names[rec["name"]] = rec
        if rec.get("type") == "file":
            carriers.setdefault(rec.get("diff_id") or rec.get("sha256"), rec["name"])
    copies: dict[str, list[str]] = {}
    for position, (path, diff_id) in enumerate(zip(image.get("layer_paths") or [], image.get("diff_ids") or [])):
        rec = names.get(follow_links(path, symlinks_in(names)))  # a looping manifest ends
        if rec is not None and (rec.get("diff_id") or rec.get("sha256")) == diff_id:
            continue
        carrier = carriers.get(diff_id)
        if carrier is None and position < thin_layers:
            continue  # the engine holds it: a thin archive leaves it out
        if carrier is None:
            raise IntegrityError(f"layer {diff_id} ({path!r}) is in none of the parts")
        if image.get("byte_exact") and len({entry.get("save") for entry in entries}) == 1:
            # the parts of the very save the image comes from hold every layer path: damage
            raise IntegrityError(f"layer path {path!r} of the image is in none of its parts")
        copies.setdefault(carrier, []).append(path)
    return copies
