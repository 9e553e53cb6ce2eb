"""Understanding image archives: one streaming pass gives every member's digests, the images, their
ordered diffIDs and the members that carry each layer, for every producer format (archive-formats.md)."""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, Union

from .digests import BlobHasher, sniff_compression
from .errors import BadInput, IntegrityError
from .jsonkeys import check_text, refuse_constant, unique_keys
from .legacy import podman_v1_from_config
from .limits import check_member_count
from .tarstream import Member, Source, TarReader

INDEX_SCHEMA = "isep-index/1"
JSON_CAP = 4 << 20          # a JSON member larger than this is refused
KEPT_JSON_TOTAL = 64 << 20  # all JSON-looking members kept in memory, together
MAX_JSON_DEPTH = 64
MAX_LINK_HOPS = 8           # links followed from one name; a longer chain is taken for a loop

FORMATS = {
    "docker-legacy": "Docker <= 24 (graph drivers): <v1id>/layer.tar, manifest.json, repositories",
    "docker-oci": "Docker 25+ (graph drivers): OCI layout with uncompressed blobs + manifest.json",
    "docker-cstore": "Docker containerd image store: OCI layout, compressed blobs, nested index",
    "podman": "containers/image docker-archive (podman, skopeo): <diffID>.tar + symlinked v1 dirs",
    "oci-archive": "OCI image layout archive without manifest.json (podman/skopeo oci-archive)",
}
INDEX_MEDIA_TYPES = ("application/vnd.oci.image.index.v1+json",
                     "application/vnd.docker.distribution.manifest.list.v2+json")


def load_json(data: bytes, what: str, cap: int = JSON_CAP, *, loader_fields: bool = False,
              shared_fields: frozenset[str] = frozenset()):
    """Parse a JSON document from an archive or a file: UTF-8, bounded size (cap: isep's own
    documents have theirs in isep.limits) and nesting, keys distinct as Go compares them; with
    loader_fields (an archive's metadata, which loaders decode into Go structs), the fields loaders
    read spelled exactly. Equal string values of the shared_fields are one object."""
    if len(data) > cap:
        raise BadInput(f"{what}: JSON of {len(data)} bytes is over the {cap}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{what}: not valid UTF-8") from None
    depth = max_depth = 0
    in_string = escaped = False
    for ch in text:  # nesting is checked before parsing so that deep input cannot exhaust the stack
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
            if max_depth > MAX_JSON_DEPTH:
                raise BadInput(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
    check_text(text, what)
    try:
        memo: dict[str, str] = {}
        return json.loads(text, object_pairs_hook=lambda pairs: unique_keys(pairs, what, loader_fields,
                                                                            shared_fields, memo),
                          parse_constant=refuse_constant(what))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadInput(f"{what}: invalid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None


@dataclass
class ScannedArchive:
    """What one pass over an archive learned: member records plus the small JSON members' bytes."""

    name: str
    members: list[dict] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    trailer: bytes = b""
    size: int = 0
    xxh3: str = ""
    parsed: dict[str, object] = field(default_factory=dict, repr=False)  # JSON members parsed once

    def by_name(self) -> dict[str, dict]:
        table: dict[str, dict] = {}
        for rec in self.members:
            table[rec["name"]] = rec  # the last one wins, as when a loader extracts the archive
        return table


def member_record(member: Member, seq: int) -> dict:
    rec = {"seq": seq, "name": member.name, "type": member.kind, "size": member.size,
           "offset": member.offset, "raw_size": member.raw_size, "mode": member.mode,
           "mtime": member.mtime}
    if member.linkname and member.kind in ("symlink", "hardlink"):
        rec["link"] = member.linkname
    return rec


def looks_like_json(head: bytes | bytearray) -> bool:
    return head[:1] in (b"{", b"[")


class KeptJson:
    """The small JSON-looking members kept in memory while an archive streams by (manifests,
    indexes, configs: what interpreting it needs), their bytes together bounded."""

    def __init__(self, what: str, blobs: dict[str, bytes] | None = None):
        self.what = what
        self.blobs: dict[str, bytes] = {} if blobs is None else blobs
        self.total = 0

    def offer(self, name: str, data: bytes | bytearray) -> None:
        if not looks_like_json(data):
            return
        self.blobs[name] = bytes(data)
        self.total += len(data)
        if self.total > KEPT_JSON_TOTAL:
            raise BadInput(f"{self.what}: over {KEPT_JSON_TOTAL >> 20} MiB of JSON members")


Chunk = Union[bytes, memoryview]  # what a member's data arrives as
ProgressCallback = Callable[[int], None]   # told the bytes done so far


def pass_member(member: Member, sinks: Sequence[Callable[[Chunk], object]], kept: KeptJson | None, *,
                what: str | None = None, chunks: Iterable[Chunk] | None = None,
                want_xxh3: bool = True) -> dict:
    """Hash one member's data while handing every chunk to sinks, and offer it to kept when it is
    small; returns its digests ({} for a member that is not a regular file). The header and padding
    are the caller's to copy: not every copy writes them as read. chunks: the data when the caller
    has already read some of it."""
    hasher = BlobHasher(what or f"member {member.name!r}", want_xxh3=want_xxh3) if member.is_file else None
    keep = bytearray() if kept is not None and member.is_file and member.size <= JSON_CAP else None
    for chunk in member.iter_data() if chunks is None else chunks:
        if hasher is not None:
            hasher.update(chunk)
        if keep is not None:
            keep += chunk
        for sink in sinks:
            sink(chunk)
    if kept is not None and keep is not None:
        kept.offer(member.name, keep)
    return {} if hasher is None else hasher.result()


def scan_member(member: Member, rec: dict, kept: KeptJson | None,
                sink: Callable[[Chunk], object] | None = None) -> None:
    """Hash one member's data (and pass every raw byte to sink); keep it if it is small JSON."""
    sinks = [] if sink is None else [sink]
    for sink_ in sinks:
        sink_(member.header)
    rec.update(pass_member(member, sinks, kept))
    if member.padding:
        for sink_ in sinks:
            sink_(member.padding)


def recorded_members(reader: TarReader, scanned: ScannedArchive) -> Iterator[tuple[Member, dict]]:
    """Each member with its record, the record already listed in scanned.members; an archive past
    the member limit is refused at the member that crosses it, before anything was written."""
    for seq, member in enumerate(reader):
        check_member_count(seq + 1, scanned.name)
        rec = member_record(member, seq)
        scanned.members.append(rec)
        yield member, rec


def scan_metadata(source: Source) -> ScannedArchive:
    """Headers and small JSON members only (hashed and kept); other members are skipped (by seeking,
    on a file) after their first bytes tell whether they are compressed. Enough to plan, not to
    verify: the digests of the rest are pack's to take, and not holding them keeps a plan of many
    small members small (docs/formats.md, "Limits")."""
    scanned = ScannedArchive(name=source.name)
    kept = KeptJson(source.name, scanned.blobs)
    reader = TarReader(source)
    for member, rec in recorded_members(reader, scanned):
        head = member.read_all(JSON_CAP) if member.is_file and member.size <= JSON_CAP else None
        if head is not None and looks_like_json(head):
            rec.update(pass_member(member, [], kept, chunks=[head]))
        elif head is not None:
            compression = sniff_compression(head[:4])
            if compression:
                rec["compression"] = compression
        elif member.is_file:
            compression = sniff_compression(member.head_then_skip(4))
            if compression:
                rec["compression"] = compression
    scanned.trailer = reader.trailer
    scanned.size = source.offset
    return scanned


def scan(source: Source, *, sink: Callable | None = None,
         progress: ProgressCallback | None = None) -> ScannedArchive:
    """One pass over a tar stream. sink, when given, receives every raw byte in order."""
    scanned = ScannedArchive(name=source.name)
    kept = KeptJson(source.name, scanned.blobs)
    reader = TarReader(source)
    for member, rec in recorded_members(reader, scanned):
        scan_member(member, rec, kept, sink)
        if progress is not None:
            progress(source.offset)
    if sink is not None:
        sink(reader.trailer)
    scanned.trailer = reader.trailer
    scanned.size = source.offset
    return scanned


# --- interpretation ----------------------------------------------------------------------------

@dataclass
class Layer:
    diff_id: str
    path: str          # the name the image's metadata uses (manifest.json Layers[i] or blobs/…)
    member: str        # the member that carries the bytes (symlinks resolved)
    media_type: str
    size: int
    digest: str | None     # None after a metadata-only scan
    xxh3: str | None


@dataclass
class Image:
    tags: list[str]
    config_member: str
    config_digest: str | None
    config: dict
    diff_ids: list[str]
    layers: list[Layer]
    platform: dict
    owned: set[str] = field(default_factory=set)   # metadata members that belong to this image only
    manifest_entry: dict | None = None             # its manifest.json entry, verbatim
    index_descriptors: list = field(default_factory=list)  # its index.json entries

    def to_json(self) -> dict:
        return {
            "tags": self.tags, "config": {"member": self.config_member, "digest": self.config_digest},
            "platform": self.platform, "diff_ids": self.diff_ids,
            "layers": [vars(layer) for layer in self.layers], "owned": sorted(self.owned),
            "manifest_entry": self.manifest_entry, "index_descriptors": self.index_descriptors,
            "legacy_layers": [[lid, text.decode()] for lid, text in podman_v1_from_config(self.config)],
        }


def link_target(name: str, link: str, kind: str) -> str:
    """The member a link names: a hard link names it from the archive's root, a symlink relative to
    its own directory."""
    if kind == "hardlink":
        return link
    return posixpath.normpath(posixpath.join(posixpath.dirname(name), link))


def follow_links(name: str, link_of: Callable[[str], str | None]) -> str:
    """Where a chain of links from name ends: link_of gives the next name (None: not a link). At
    most MAX_LINK_HOPS are followed, so that a loop ends, at a name that is still a link."""
    for _ in range(MAX_LINK_HOPS):
        target = link_of(name)
        if target is None:
            break
        name = target
    return name


def symlinks_in(table: dict[str, dict]) -> Callable[[str], str | None]:
    """link_of for follow_links over member records by name: their symlinks only."""
    def link_of(name: str) -> str | None:
        rec = table.get(name)
        if rec is None or rec.get("type") != "symlink":
            return None
        return link_target(rec["name"], str(rec.get("link")), "symlink")
    return link_of


def resolve_link(name: str, table: dict[str, dict], what: str, role: str = "layer") -> dict:
    """Follow symlinks and hard links to the regular member holding the bytes (ROLE names it in
    messages: layer or config)."""
    rec = table.get(name)
    hops = 0
    while rec is not None and rec["type"] in ("symlink", "hardlink"):
        if hops == MAX_LINK_HOPS:
            kind = "symlink" if rec["type"] == "symlink" else "hard link"
            raise BadInput(f"{what}: {kind} loop at {name!r}")
        hops += 1
        rec = table.get(link_target(rec["name"], str(rec.get("link")), rec["type"]))
    if rec is None:
        raise BadInput(f"{what}: {role} member {name!r} is missing from the archive")
    if rec["type"] != "file":
        raise BadInput(f"{what}: {role} member {name!r} is a {_KIND_WORDS.get(rec['type'], rec['type'])}, "
                       f"not a regular file")
    return rec


_KIND_WORDS = {"dir": "directory", "char": "character device", "block": "block device", "fifo": "FIFO"}


def blob_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _member_json(scanned: ScannedArchive, name: str, what: str):
    if name not in scanned.parsed:  # a config named by many entries is parsed once
        scanned.parsed[name] = _parse_member_json(scanned, name, what)
    return scanned.parsed[name]


def _parse_member_json(scanned: ScannedArchive, name: str, what: str):
    data = scanned.blobs.get(name)
    if data is None:
        table = scanned.by_name()
        if name not in table:
            raise BadInput(f"{what}: {name!r} is missing from the archive")
        rec = resolve_link(name, table, what, "JSON")
        data = scanned.blobs.get(rec["name"])
        if data is None:
            raise BadInput(f"{what}: {name!r} is not a JSON document of at most {JSON_CAP} bytes")
    return load_json(data, f"{what} {name}", loader_fields=True)


def detect_format(scanned: ScannedArchive) -> str:
    table = scanned.by_name()
    has = table.__contains__
    if has("oci-layout") and has("index.json") and not has("manifest.json"):
        return "oci-archive"
    if not has("manifest.json"):
        if has("repositories"):
            raise BadInput(f"{scanned.name}: a pre-1.10 Docker archive (no manifest.json) is not supported")
        raise BadInput(f"{scanned.name}: not an image archive (no manifest.json or index.json)")
    if has("oci-layout"):
        compressed = any(r.get("compression") for r in scanned.members if r["name"].startswith("blobs/"))
        return "docker-cstore" if compressed or not has("repositories") else "docker-oci"
    manifest = _member_json(scanned, "manifest.json", scanned.name)
    paths = [p for entry in manifest if isinstance(entry, dict) for p in entry.get("Layers") or []]
    if any(table.get(p, {}).get("type") == "file" and p.endswith("/layer.tar") for p in paths):
        return "docker-legacy"
    if paths and all("/" not in p for p in paths):
        return "podman"
    return "docker-legacy" if any(p.endswith("/layer.tar") for p in paths) else "podman"


def _check_list(value, what: str) -> list:
    if not isinstance(value, list):
        raise BadInput(f"{what} is not a list")
    return value


def _diff_ids(config: dict, what: str) -> list[str]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(d, str) and d.startswith("sha256:") for d in ids):
        raise BadInput(f"{what}: no valid rootfs.diff_ids")
    return ids


def _platform(config: dict) -> dict:
    return {k: config[k] for k in ("os", "architecture", "variant") if isinstance(config.get(k), str)}


def _layer_from(rec: dict, path: str, diff_id: str, position: int, what: str) -> Layer:
    actual = rec.get("diff_id") or rec.get("sha256")
    if actual is not None and actual != diff_id:  # None: a metadata-only scan, checked when packing
        raise IntegrityError(f"{what}: layer {position} ({path}) has diffID {actual}, "
                             f"the config says {diff_id}")
    compression = rec.get("compression")
    media = "application/vnd.oci.image.layer.v1.tar" + ({"gzip": "+gzip", "zstd": "+zstd"}.get(compression or "", ""))
    return Layer(diff_id=diff_id, path=path, member=rec["name"], media_type=media, size=rec["size"],
                 digest=rec.get("sha256"), xxh3=rec.get("xxh3"))


def _image_from_entry(scanned: ScannedArchive, entry, table: dict, n: int) -> Image:
    what = f"{scanned.name}: manifest.json entry {n}"
    if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
        raise BadInput(f"{what} has no Config")
    paths = _check_list(entry.get("Layers"), f"{what} Layers")
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadInput(f"{what}: RepoTags is not a list of strings")
    config_name = entry["Config"]
    config_rec = resolve_link(config_name, table, what, "config")
    config = _member_json(scanned, config_rec["name"], what)
    diff_ids = _diff_ids(config, f"{what} config {config_name}")
    if len(diff_ids) != len(paths):
        raise IntegrityError(f"{what}: {len(paths)} layers listed, the config has {len(diff_ids)} diffIDs")
    layers = [_layer_from(resolve_link(p, table, what), p, d, i, what)
              for i, (p, d) in enumerate(zip(paths, diff_ids))]
    owned = {config_name, config_rec["name"]}
    return Image(tags=list(tags), config_member=config_rec["name"], config_digest=config_rec.get("sha256"),
                 config=config, diff_ids=diff_ids, layers=layers, platform=_platform(config),
                 owned=owned, manifest_entry=entry)


MAX_INDEX_NESTING = 16


def _walk_descriptors(scanned: ScannedArchive, table: dict, desc: dict, what: str, seen: set,
                      out: list, depth: int = 0) -> None:
    """Collect (descriptor, parsed manifest) pairs reachable from an index descriptor."""
    if depth > MAX_INDEX_NESTING:
        raise BadInput(f"{what}: image indexes nested deeper than {MAX_INDEX_NESTING} levels")
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or digest in seen:
        return
    seen.add(digest)
    name = blob_name(digest)
    if name not in table:  # OCI allows missing blobs (other platforms, attestations)
        present = scanned.__dict__.get("_content_digests")  # computed once: an index may be large
        if present is None:
            present = scanned.__dict__["_content_digests"] = {rec.get("sha256") for rec in table.values()}
        if digest in present:  # containerd finds content by digest, whatever its name
            raise BadInput(f"{what}: {name} is missing, yet another member holds its bytes (containerd "
                           f"would load it)")
        return
    doc = _member_json(scanned, name, what)
    if not isinstance(doc, dict):
        raise BadInput(f"{what}: {name} is not a JSON object")
    media = doc.get("mediaType") or desc.get("mediaType")
    if doc.get("mediaType") and desc.get("mediaType") and doc["mediaType"] != desc["mediaType"]:
        raise BadInput(f"{what}: {name} is a {doc['mediaType']!r}, its descriptor says {desc['mediaType']!r} "
                       f"(containerd refuses it)")
    if media in INDEX_MEDIA_TYPES or "manifests" in doc:
        out.append((desc, doc, name, True))
        for child in _check_list(doc.get("manifests") or [], f"{what} {name} manifests"):
            _walk_descriptors(scanned, table, child, what, seen, out, depth + 1)
    else:
        out.append((desc, doc, name, False))


def _annotations(desc) -> dict:
    ann = desc.get("annotations") if isinstance(desc, dict) else None
    return ann if isinstance(ann, dict) else {}


def _tag_from_annotations(desc: dict) -> str | None:
    ann = _annotations(desc)
    tag = ann.get("io.containerd.image.name") or ann.get("org.opencontainers.image.ref.name")
    return tag if isinstance(tag, str) else None


def _oci_images(scanned: ScannedArchive, table: dict, index: dict, by_config: dict[str, Image] | None):
    """Images of index.json; with by_config (archives that also have manifest.json) only ownership."""
    what = f"{scanned.name}: index.json"
    found: list[Image] = []
    for top in _check_list(index.get("manifests") or [], f"{what} manifests"):
        reached: list = []
        _walk_descriptors(scanned, table, top, what, set(), reached)
        owned = {name for _, _, name, _ in reached}
        manifests = [(d, doc) for d, doc, _, is_index in reached if not is_index
                     and isinstance(doc.get("config"), dict)
                     and _annotations(d).get("vnd.docker.reference.type") != "attestation-manifest"]
        for _desc, doc, _, is_index in reached:  # attestations: everything they reference is the image's
            if is_index or any(doc is m for _, m in manifests):
                continue
            refs = [doc.get("config")] + list(doc.get("layers") or [])
            owned |= {blob_name(r["digest"]) for r in refs if isinstance(r, dict) and isinstance(r.get("digest"), str)}
        tag = _tag_from_annotations(top)
        for _desc, doc in manifests:
            config_digest = doc["config"].get("digest")
            if by_config is not None:  # a hybrid archive: containerd loads index.json, Docker manifest.json
                image = by_config.get(config_digest)
                declared = table.get(blob_name(config_digest) if isinstance(config_digest, str) else "", {})
                if image is None and declared.get("sha256") == config_digest:  # else: an integrity error
                    raise BadInput(f"{what}: names an image (config {config_digest}) that manifest.json "
                                   f"lacks, so containerd and Docker would load different images")
                if image is not None:
                    image.owned |= owned
                    if not any(top is d for d in image.index_descriptors):
                        image.index_descriptors.append(top)
                continue
            image = _image_from_oci_manifest(scanned, table, doc, tag, owned, what)
            image.index_descriptors.append(top)
            found.append(image)
    return found


def _image_from_oci_manifest(scanned, table, doc: dict, tag: str | None, owned: set, what: str) -> Image:
    digest = doc["config"].get("digest")
    if not isinstance(digest, str):
        raise BadInput(f"{what}: an image manifest's config has no digest")
    config_name = blob_name(digest)
    config_rec = resolve_link(config_name, table, what, "config")
    config = _member_json(scanned, config_name, what)
    diff_ids = _diff_ids(config, f"{what} config {config_name}")
    descs = _check_list(doc.get("layers"), f"{what} manifest layers")
    if len(descs) != len(diff_ids):
        raise IntegrityError(f"{what}: {len(descs)} layers listed, the config has {len(diff_ids)} diffIDs")
    layers = []
    for i, (desc, diff_id) in enumerate(zip(descs, diff_ids)):
        digest = desc.get("digest") if isinstance(desc, dict) else None
        path = blob_name(digest if isinstance(digest, str) else "")
        layers.append(_layer_from(resolve_link(path, table, what), path, diff_id, i, what))
    return Image(tags=[tag] if tag else [], config_member=config_name, config_digest=config_rec.get("sha256"),
                 config=config, diff_ids=diff_ids, layers=layers, platform=_platform(config),
                 owned=owned | {config_name})


def interpret(scanned: ScannedArchive) -> tuple[str, list[Image]]:
    """The producer format and the images of a scanned archive, every layer's diffID checked."""
    fmt = detect_format(scanned)
    table = scanned.by_name()
    if "oci-layout" in table:  # containerd reads the archive as OCI only with this exact version
        layout = _member_json(scanned, "oci-layout", scanned.name)
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise BadInput(f"{scanned.name}: oci-layout does not say imageLayoutVersion 1.0.0")
        if "index.json" not in table:
            raise BadInput(f"{scanned.name}: oci-layout without index.json, which containerd refuses")
    if fmt == "oci-archive":
        index = _member_json(scanned, "index.json", scanned.name)
        images = _oci_images(scanned, table, index, None)
    else:
        manifest = _member_json(scanned, "manifest.json", scanned.name)
        if not isinstance(manifest, list):
            raise BadInput(f"{scanned.name}: manifest.json is not a list")
        images = [_image_from_entry(scanned, entry, table, n) for n, entry in enumerate(manifest)]
        if "index.json" in table:
            index = _member_json(scanned, "index.json", scanned.name)
            if isinstance(index, dict):
                _oci_images(scanned, table, index, {im.config_digest: im for im in images})
    if not images:
        raise BadInput(f"{scanned.name}: the archive holds no image")
    for rec in table.values():  # content-addressed blobs: the name is the digest of the bytes
        if rec["name"].startswith("blobs/sha256/") and rec.get("sha256") \
                and rec["sha256"] != "sha256:" + rec["name"][len("blobs/sha256/"):]:
            raise IntegrityError(f"{scanned.name}: {rec['name']!r} holds bytes of digest {rec['sha256']}")
    lacking = [im.tags or im.config_digest for im in images if not im.index_descriptors]
    if lacking and fmt != "oci-archive" and "index.json" in table and "oci-layout" in table:
        raise BadInput(f"{scanned.name}: index.json lacks images manifest.json names ({lacking}), "
                       f"so containerd and Docker would load different images")
    return fmt, images


def build_index(scanned: ScannedArchive) -> dict:
    fmt, images = interpret(scanned)
    return {
        "schema": INDEX_SCHEMA,
        "format": fmt,
        "source": {"name": scanned.name, "size": scanned.size, "members": len(scanned.members),
                   "trailer_size": len(scanned.trailer)},
        "images": [image.to_json() for image in images],
        "members": scanned.members,
    }


def index_stream(source: Source, sink: Callable | None = None,
                 progress: ProgressCallback | None = None) -> dict:
    return build_index(scan(source, sink=sink, progress=progress))
