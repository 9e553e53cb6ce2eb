"""An isep release as an OCI artifact (docs/formats.md, "Registry artifacts"): the image manifest
that carries a bundle, that manifest read back as untrusted input, and the plan of a pull (which
blobs a device's store lacks). No network here: isep.registry moves the bytes."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .archive import load_json
from .bundle import Bundle, find_part, is_delta_part
from .deltajoin import StoreLayers, part_needs
from .errors import BadInput
from .fields import DIGEST
from .limits import MANIFEST_CAP
from .names import check_file_name
from .registry import MANIFEST_LIMIT, OCI_MANIFEST
from .signing import MAX_SIGNATURE

ARTIFACT_TYPE = "application/vnd.isep.bundle.v1"
CONFIG_TYPE = "application/vnd.isep.bundle.manifest.v1+json"
SIGNATURE_TYPE = "application/vnd.isep.bundle.signature.v1"
DELTA_MANIFEST_TYPE = "application/vnd.isep.delta-bundle.manifest.v1+json"
PART_TYPES = {"zstd": "application/vnd.isep.part.v1.tar+zstd", "gzip": "application/vnd.isep.part.v1.tar+gzip",
              "none": "application/vnd.isep.part.v1.tar"}
DELTA_PART_TYPES = {c: t.replace(".part.", ".delta-part.") for c, t in PART_TYPES.items()}
TITLE = "org.opencontainers.image.title"
DELTA_BUNDLE = "vnd.isep.delta-bundle"  # annotation: the digest of the delta manifest a blob belongs to
_KNOWN_TYPES = {CONFIG_TYPE, SIGNATURE_TYPE, DELTA_MANIFEST_TYPE, *PART_TYPES.values(), *DELTA_PART_TYPES.values()}


@dataclass(frozen=True)
class Descriptor:
    """One blob of the artifact, as an OCI descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def title(self) -> Optional[str]:
        return self.annotations.get(TITLE)

    @property
    def delta_bundle(self) -> Optional[str]:
        return self.annotations.get(DELTA_BUNDLE)

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Upload:
    """A blob to push: its descriptor, and where its bytes are (a file, or the bytes themselves)."""

    descriptor: Descriptor
    path: Optional[str] = None
    data: Optional[bytes] = None


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- building the artifact (isep-push) ---------------------------------------------------------------

def artifact_blobs(bundle: Bundle, deltas: Sequence[Bundle]) -> tuple[Upload, list[Upload]]:
    """(config, layers) of a release: the bundle's parts and signature, then each delta bundle's
    manifest, signature and parts (annotated with the delta manifest's digest). A blob already
    listed (a delta bundle's part equal to a release part) is listed once."""
    config = Upload(Descriptor(CONFIG_TYPE, sha256_of(bundle.manifest_bytes), len(bundle.manifest_bytes)),
                    data=bundle.manifest_bytes)
    layers = _bundle_layers(bundle, PART_TYPES, {})
    seen = {u.descriptor.digest for u in layers}
    for delta in deltas:
        digest = sha256_of(delta.manifest_bytes)
        mark = {DELTA_BUNDLE: digest}
        own = [Upload(Descriptor(DELTA_MANIFEST_TYPE, digest, len(delta.manifest_bytes)), data=delta.manifest_bytes)]
        own += _bundle_layers(delta, DELTA_PART_TYPES, mark)
        for upload in own:
            if upload.descriptor.digest not in seen:
                seen.add(upload.descriptor.digest)
                layers.append(upload)
    return config, layers


def _bundle_layers(bundle: Bundle, types: dict[str, str], mark: dict) -> list[Upload]:
    out = []
    for entry in bundle.doc["parts"]:
        media_type = types.get(entry["compression"])
        if media_type is None:
            raise BadInput(f"{bundle.path}: part {entry['file']} has an unknown compression {entry['compression']!r}")
        out.append(Upload(Descriptor(media_type, entry["sha256"], entry["size"], {TITLE: entry["file"], **mark}),
                          path=f"{bundle.path}/{entry['file']}"))
    if bundle.signature is not None:
        out.append(Upload(Descriptor(SIGNATURE_TYPE, sha256_of(bundle.signature), len(bundle.signature), dict(mark)),
                          data=bundle.signature))
    return out


def artifact_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    """The OCI image manifest of a release, refused when a registry would refuse it (over 4 MiB)."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": config.to_json(), "layers": [d.to_json() for d in layers]}
    body = json.dumps(doc, separators=(",", ":")).encode()
    if len(body) > MANIFEST_LIMIT:
        raise BadInput(f"the artifact manifest would be {len(body):,} bytes; registries refuse more than "
                       f"{MANIFEST_LIMIT:,} (push fewer delta bundles)")
    return body


# --- reading it back (isep-join oci://, isep-verify oci://) -----------------------------------------

@dataclass
class Artifact:
    """A release artifact's manifest, checked: its config and its blobs sorted by what they are."""

    config: Descriptor
    signature: Optional[Descriptor]
    parts: dict[str, Descriptor]                  # by digest: every part and delta part
    delta_manifests: list[Descriptor]
    delta_signatures: dict[str, Descriptor]       # by the delta manifest's digest

    @property
    def blobs(self) -> list[Descriptor]:
        sigs = [self.signature] if self.signature else []
        return [self.config, *sigs, *self.parts.values(), *self.delta_manifests, *self.delta_signatures.values()]


def parse_artifact(body: bytes, what: str) -> Artifact:
    """An artifact manifest from a registry, as untrusted input: one BadInput per problem."""
    if len(body) > MANIFEST_LIMIT:
        raise BadInput(f"{what}: manifest of {len(body):,} bytes is over the {MANIFEST_LIMIT:,}-byte limit")
    doc = load_json(body, f"{what} manifest", MANIFEST_LIMIT)
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise BadInput(f"{what}: not an OCI image manifest (schemaVersion 2)")
    if doc.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
        raise BadInput(f"{what}: media type {doc.get('mediaType')!r} is not an OCI image manifest")
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise BadInput(f"{what}: not an isep release (artifactType {doc.get('artifactType')!r}, "
                       f"expected {ARTIFACT_TYPE})")
    config = _descriptor(doc.get("config"), f"{what}: config")
    if config.media_type != CONFIG_TYPE:
        raise BadInput(f"{what}: config media type {config.media_type!r} is not {CONFIG_TYPE}")
    if config.size > MANIFEST_CAP:
        raise BadInput(f"{what}: config of {config.size:,} bytes is over the bundle manifest limit")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise BadInput(f"{what}: layers is not a list")
    artifact = Artifact(config, None, {}, [], {})
    for n, raw in enumerate(layers):
        _sort_layer(artifact, _descriptor(raw, f"{what}: layer {n}"), f"{what}: layer {n}")
    return artifact


def _sort_layer(artifact: Artifact, d: Descriptor, what: str) -> None:
    if d.media_type not in _KNOWN_TYPES - {CONFIG_TYPE}:
        raise BadInput(f"{what}: unknown media type {d.media_type!r}")
    if d.media_type == SIGNATURE_TYPE:
        if d.size > MAX_SIGNATURE:
            raise BadInput(f"{what}: signature of {d.size:,} bytes is over the {MAX_SIGNATURE:,}-byte limit")
        if d.delta_bundle is None:
            if artifact.signature is not None:
                raise BadInput(f"{what}: a second release signature")
            artifact.signature = d
        else:
            artifact.delta_signatures[d.delta_bundle] = d
    elif d.media_type == DELTA_MANIFEST_TYPE:
        if d.size > MANIFEST_CAP:
            raise BadInput(f"{what}: delta bundle manifest of {d.size:,} bytes is over the limit")
        artifact.delta_manifests.append(d)
    else:
        problem = check_file_name(d.title, f"{what}: part title")
        if problem:
            raise BadInput(problem)
        artifact.parts[d.digest] = d


def _descriptor(raw: object, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise BadInput(f"{what}: not a descriptor object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    notes = raw.get("annotations", {})
    if not isinstance(media_type, str):
        raise BadInput(f"{what}: no media type")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise BadInput(f"{what}: digest {digest!r} is not sha256:<64 hex digits>")
    if type(size) is not int or size < 0 or size > 1 << 50:
        raise BadInput(f"{what}: size {size!r} is not a byte count")
    if not isinstance(notes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()):
        raise BadInput(f"{what}: annotations are not string pairs")
    return Descriptor(media_type, digest, size, notes)


def check_listed(artifact: Artifact, doc: dict, what: str, delta_of: Optional[str] = None) -> None:
    """Every part a bundle manifest (the release's, or a delta bundle's) lists is a layer of the
    artifact with the part's sha256, size and file name; BadInput otherwise."""
    for entry in doc["parts"]:
        d = artifact.parts.get(entry["sha256"])
        if d is None or d.size != entry["size"] or d.title != entry["file"]:
            raise BadInput(f"{what}: part {entry['file']} ({entry['sha256']}, {entry['size']} bytes) is not "
                           f"a layer of the artifact as listed")
        if delta_of is not None and is_delta_part(entry) and d.delta_bundle != delta_of:
            raise BadInput(f"{what}: delta part {entry['file']} is not annotated with its delta bundle")


# --- the plan of a pull --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetch:
    """A part to fetch: its manifest entry (the release's, or a delta bundle's delta part)."""

    entry: dict = field(hash=False, compare=False)
    digest: str
    size: int
    delta: bool


def plan_pull(release: dict, image: dict, deltas: Sequence[dict], store: Optional[Bundle],
              engine_holds: int = 0) -> list[Fetch]:
    """The parts of IMAGE (in RELEASE, a bundle manifest) the device must fetch: nothing for a part
    STORE holds (its file as a join finds it: by file name and sha256 or layers, a base or lib part
    by its layers), nor for a base or lib part whose layers are all among the bottom ENGINE_HOLDS
    (--have: the archive leaves them out); else the smallest of the release's part and each delta
    bundle's delta part for it whose every need STORE holds."""
    held = _present(store)
    layers = StoreLayers([store] if store is not None else [])
    plan = []
    for file_name in image["parts"]:
        entry = find_part(release, file_name)
        if entry is None:
            raise BadInput(f"the release's manifest lists no part {file_name} for its image")
        if _holds(held, entry) or _left_out(entry, engine_holds):
            continue
        options = [Fetch(entry, entry["sha256"], entry["size"], False)]
        for doc in deltas:
            for other in doc["parts"]:
                if _same_content(entry, other) and not layers.missing(part_needs(other)):
                    options.append(Fetch(other, other["sha256"], other["size"], is_delta_part(other)))
        plan.append(min(options, key=lambda f: f.size))  # the release's own part first on a tie
    return plan


def leads_to(delta: dict, release: dict) -> bool:
    """Whether some part of a delta bundle rebuilds into a part of the release (else pushing it
    with the release would only cost room: no pull would ever choose it)."""
    return any(_same_content(entry, other) for entry in release["parts"] for other in delta["parts"])


def _present(store: Optional[Bundle]) -> list[dict]:
    if store is None:
        return []
    return [p for p in store.doc["parts"] if os.path.isfile(os.path.join(store.path, p["file"]))]


def _holds(held: list[dict], entry: dict) -> bool:
    """Whether the store serves this part to a join: the part under its name (the same file, or a
    part rebuilt from a delta: same role and layers), or, for a base or lib part, any part of its
    role carrying exactly its layers (a join looks by name first, so a different part under the
    same name means fetching)."""
    same_name = [p for p in held if p["file"] == entry["file"]]
    if same_name:
        return any(p["sha256"] == entry["sha256"] or _same_layers(p, entry) for p in same_name)
    return entry["role"] != "app" and any(_same_layers(p, entry) for p in held)


def _left_out(entry: dict, engine_holds: int) -> bool:
    """A base or lib part a thin join (--have) does without: the engine holds all its layers."""
    stack = entry.get("diff_ids") or []
    return entry["role"] != "app" and 0 < len(stack) <= engine_holds


def _same_layers(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and bool(a.get("diff_ids")) and a.get("diff_ids") == b.get("diff_ids")


def _same_content(entry: dict, other: dict) -> bool:
    """Whether another bundle's part rebuilds into this part's members (name, role, layers, and
    each member's position, name, size and sha256)."""
    if other["file"] != entry["file"] or not _same_layers(entry, other):
        return False
    key = ("seq", "name", "size", "sha256")
    return [[r.get(k) for k in key] for r in other["members"]] == [[r.get(k) for k in key] for r in entry["members"]]
