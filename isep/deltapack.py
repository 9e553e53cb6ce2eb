"""Delta parts, the sending side: `isep-pack --delta-from STORE`.

DeltaTarget wraps the pack's real output (a store directory or a bundle stream). Parts are packed as
always, into temporary files; when the pack finishes, each part is read back once and every layer
member becomes, in this order:

- referenced: STORE's parts carry its bytes (same sha256 and size): nothing of it is shipped;
- a delta: compressed against the best-ranked layer of STORE (isep.deltarank.rank_references), when the
  delta is smaller than the layer's plain estimate; the delta is a member `isep-delta/<seq>` of the
  delta part;
- plain: verbatim in the part, as without --delta-from (no reference, or the delta does not win).

A part in which nothing changed is shipped as packed. The manifest entry of a delta part keeps every
member's record, with the original tar header and a `from` object for each member not carried
(isep.deltajoin reads them), and `needs`: the store layers its deltas and references read. A bundle
stream announces those needs (`isep-needs.json`) before the first delta part's bytes.
"""
from __future__ import annotations

import base64
import json
import tempfile
from typing import BinaryIO, Iterable

from .bundle import Bundle, open_bundle, part_for_layers
from .delta import DEFAULT_LEVEL, DEFAULT_MEMORY, decode_layer, encode_layer, peak_memory, plan_segments
from .deltarank import LayerInfo, rank_references
from .deltajoin import StoreLayers, delta_member_name, part_needs
from .errors import IntegrityError, UsageError
from .names import split_tag
from .parts import DecompressingReader, PartWriter, TemporaryPart, rewound_chunks
from .targets import OutputTarget, rehash_isula_manifest
from .tarstream import CHUNK, Member, Source, TarReader, padded
from .tarwrite import build_header

MIN_DELTA = 64 << 10      # smaller layers ship plain: a delta's frame and record cost more than they save
# A delta must beat the plain estimate (a 1-in-8 sample) by a sixteenth: within its noise a delta is
# not clearly smaller, and it would tie the release to a reference for nothing.
WIN_FRACTION = 16


def open_reference_store(path: str) -> Bundle:
    """The store --delta-from names: an isep store (an isula-build bundle has no member records)."""
    bundle = open_bundle(path)
    if bundle.kind != "isep":
        raise UsageError(f"--delta-from {path}: an isula-build bundle; name an isep store")
    return bundle


def store_candidates(doc: dict) -> list[LayerInfo]:
    """The uncompressed layers a store's parts carry, as delta reference candidates."""
    layer_ids = {d for im in doc.get("images") or [] for d in im.get("diff_ids") or []}
    layer_ids |= {d for p in doc.get("parts") or [] for d in p.get("layers") or []}
    where = _positions(doc.get("images") or [])
    out = []
    for newness, entry in enumerate(doc.get("parts") or []):
        for rec in entry.get("members") or []:
            digest = rec.get("sha256")
            if rec.get("type") == "file" and digest in layer_ids and "from" not in rec \
                    and not rec.get("compression"):
                repo, position = where.get(digest, ("", -1))
                out.append(LayerInfo(digest, rec.get("size") or 0, repo, position, entry.get("role") or "app",
                                     name=rec.get("name") or "", newness=newness))
    return out


def _positions(images: list[dict]) -> dict[str, tuple[str, int]]:
    """diffID -> (repository of the first image that has it, its position there)."""
    out: dict[str, tuple[str, int]] = {}
    for im in images:
        repo = split_tag(im["tags"][0])[0] if im.get("tags") else ""
        for i, d in enumerate(im.get("diff_ids") or []):
            out.setdefault(d, (repo, i))
    return out


class DeltaTarget:
    """An OutputTarget that packs into temporary files and ships delta parts through `inner`.

    Parts reach it plain (spool_compression "none"): each is read back once and compressed as it
    ships, so that a layer that becomes a delta is never compressed whole (pair c of
    bench/delta_wire.py: 0.5 CPU-seconds of its 185 MB layer). The price is temporary disk: the
    parts' tar size, not their compressed size (docs/formats.md, "Temporary disk")."""

    spool_compression = "none"

    def __init__(self, inner: OutputTarget, reference: Bundle, *, compression: str = "zstd",
                 level: int | None = None, memory: int = DEFAULT_MEMORY, delta_level: int = DEFAULT_LEVEL):
        self.inner = inner
        self.compression = compression
        self.reference = reference
        self.layers = StoreLayers([reference])
        self.candidates = store_candidates(reference.doc)
        self.level = level
        self.memory = memory
        self.delta_level = delta_level
        self._spools: dict[str, TemporaryPart] = {}
        self.shipped: list[dict] = []   # per layer: how it crossed (for the summary)

    @property
    def existing(self) -> dict | None:
        return self.inner.existing

    @property
    def spool_dir(self) -> str | None:
        return self.inner.spool_dir

    @property
    def reference_doc(self) -> dict | None:
        return self.reference.doc

    def holds_part(self, entry: dict) -> bool:
        return self.inner.holds_part(entry)

    def open(self, file_name: str) -> TemporaryPart:
        spool = TemporaryPart(self.inner.spool_dir, ".isep-tmp-delta-")
        self._spools[file_name] = spool
        return spool

    def open_section(self) -> TemporaryPart:
        return TemporaryPart(self.inner.spool_dir, ".isep-tmp-delta-")

    def reopen(self, out: TemporaryPart) -> BinaryIO:
        return out.rewound()

    def name(self, out: TemporaryPart, file_name: str | None) -> None:
        if file_name is not None:
            self._spools[file_name] = out

    def finish(self, parts: list[dict], images: list[dict], isula: bytes | None) -> dict:
        positions = _positions(images)
        layer_ids = set(positions) | {d for p in parts for d in p.get("layers") or []}
        shipped = []
        final: dict[str, dict] = {}  # each part as it ships, or as the receiver holds it
        for part in parts:
            spool = self._spools[part["file"]]
            held = None if part["role"] == "app" else part_for_layers(self.reference.doc, part["role"],
                                                                        part["diff_ids"])
            if held is not None:
                spool.raw.close()  # the receiver holds this very stack: as with --parts app, not shipped
                final[part["file"]] = held
                continue
            entry, out = self._delta_part(part, spool, layer_ids, positions)
            final[part["file"]] = entry
            shipped.append((entry, out))
        needs = [n for entry, _ in shipped for n in entry.get("needs") or []]
        announce = getattr(self.inner, "announce_needs", None)
        if needs and announce is not None:
            announce(needs)
        for entry, spool in shipped:
            sink = self.inner.open(entry["file"])
            for data in spool.chunks(CHUNK):
                sink.write(data)
            sink.close()
            spool.raw.close()
        has_deltas = any(entry.get("needs") for entry, _ in shipped)
        # isula-build cannot read a delta part: its manifest is not written for one; else it names
        # the parts as they ship (it was made from the spooled ones)
        if isula is not None and not has_deltas:
            isula = rehash_isula_manifest(isula, final)
        return self.inner.finish([entry for entry, _ in shipped], images, None if has_deltas else isula)

    def abort(self) -> None:
        for spool in self._spools.values():
            spool.raw.close()
        self.inner.abort()

    def _delta_part(self, part: dict, spool: TemporaryPart, layer_ids: set[str],
                   positions: dict[str, tuple[str, int]]) -> tuple[dict, TemporaryPart]:
        """(entry, file) of a part, compressed as it ships, its layers referenced or delta-compressed
        where that wins."""
        delta_spool = TemporaryPart(self.inner.spool_dir, ".isep-tmp-delta-")
        writer = PartWriter(part["file"], delta_spool, self.compression, self.level)
        members: list[dict] = []
        source = Source(DecompressingReader(spool.rewound(), part["compression"], part["raw_size"], part["file"]),
                        name=part["file"])  # decompressed ahead on the Source's thread, while layers encode
        try:
            reader = iter(TarReader(source))
            for rec in map(_record, part["members"]):
                member = next(reader, None)
                if member is None or member.name != rec["name"]:
                    raise IntegrityError(f"{part['file']}: packed part does not read back as written")
                is_layer = (rec.get("diff_id") or rec.get("sha256")) in layer_ids and rec.get("type") == "file"
                if is_layer and self._route_layer(
                        part, rec, member, writer, members, positions):
                    continue
                for data in member.raw_chunks():
                    writer.write(data)
                members.append(rec)
        finally:
            source.close()
        info = writer.finish()
        spool.raw.close()
        entry = {**part, "compression": info["compression"], "size": info["size"], "sha256": info["sha256"],
                 "xxh3": info["xxh3"], "raw_size": info["raw_size"], "members": members}
        if any("from" in rec for rec in members):
            entry["needs"] = part_needs(entry)
        return entry, delta_spool

    def _route_layer(self, part: dict, rec: dict, member: Member, writer: PartWriter, members: list[dict],
                     positions: dict[str, tuple[str, int]]) -> bool:
        """Reference or delta-compress one layer member; False: it is to be copied as it is."""
        header = base64.b64encode(member.header).decode()
        hit = self.layers.by_digest.get(rec.get("sha256") or "")
        if hit is not None and hit[2].get("size") == rec["size"]:
            member.skip()
            members.append({**rec, "header": header, **_padding(member),
                            "from": {"kind": "reference", "reference": _describe(hit)}})
            self._note(part, rec, "reference", 0, hit[1]["file"])
            return True
        if rec.get("compression") or rec["size"] < MIN_DELTA:
            self._note(part, rec, "plain", rec["size"], "")
            return False
        repo, position = positions.get(rec["sha256"], ("", -1))
        target = LayerInfo(rec["sha256"], rec["size"], repo, position, part["role"], name=rec["name"])
        ranked = rank_references(target, self.candidates)
        if not ranked:
            self._note(part, rec, "plain", rec["size"], "")
            return False
        need = _describe(self.layers.by_digest[ranked[0].diff_id])
        self._encode(part, rec, member, writer, members, need, header)
        return True

    def _encode(self, part: dict, rec: dict, member: Member, writer: PartWriter, members: list[dict],
                need: dict, header: str) -> None:
        what = f"layer {rec['sha256']} ({rec['name']})"
        reference = self.layers.reference(need, what)
        with tempfile.TemporaryFile(dir=self.inner.spool_dir, prefix=".isep-tmp-delta-") as delta:
            record = encode_layer(member.iter_data(), member.size, reference, delta.write,
                                  level=self.delta_level, memory=self.memory)
            if record.target_diff_id != rec["sha256"]:
                raise IntegrityError(f"{what}: read back with sha256 {record.target_diff_id}")
            if record.method != "plain" and record.size < record.plain_estimate - record.plain_estimate // WIN_FRACTION:
                name = delta_member_name(rec["seq"])
                writer.write(build_header(name, record.size, mode=0o644))
                for data in rewound_chunks(delta, CHUNK):
                    writer.write(data)
                writer.write(bytes(padded(record.size) - record.size))
                members.append({**rec, "header": header, **_padding(member), "from": {
                    "kind": "delta", "member": name, "record": record.to_json(), "reference": need}})
                self._note(part, rec, "delta", record.size, need["part"], record.note)
                return
            # the delta does not win: the layer, rebuilt from it, goes in plain
            writer.write(member.header)
            _write_all(writer, decode_layer(record, rewound_chunks(delta, CHUNK), reference,
                                            memory=self.memory, what=what))
            writer.write(member.padding)
            members.append(rec)
            self._note(part, rec, "plain", rec["size"], "", record.note or "the delta is not smaller")

    def _note(self, part: dict, rec: dict, ship: str, size: int, reference: str, note: str = "") -> None:
        self.shipped.append({"part": part["file"], "layer": rec.get("sha256"), "size": rec["size"],
                             "ship": ship, "bytes": size, "reference": reference, "note": note})


def _record(rec: dict | bytes) -> dict:
    """A member's manifest record: pack holds them as JSON lines (docs/formats.md, "Limits")."""
    return rec if isinstance(rec, dict) else json.loads(rec)


def _write_all(writer: PartWriter, pieces: Iterable) -> None:
    for piece in pieces:
        writer.write(piece)


def _describe(hit: tuple[Bundle, dict, dict]) -> dict:
    _, entry, rec = hit
    return {"part": entry["file"], "part_sha256": entry.get("sha256"), "member": rec["name"],
            "diff_id": rec["sha256"], "size": rec["size"], "xxh3": rec.get("xxh3") or ""}


def _padding(member: Member) -> dict:
    """A member's padding, recorded only when it is not zeros (a tar writer's leftovers)."""
    return {"padding": base64.b64encode(member.padding).decode()} if any(member.padding) else {}


# --- what a pack would ship (isep-partition --delta-from) ------------------------------------------

def shipping_plan(plan: dict, reference: Bundle, memory: int = DEFAULT_MEMORY) -> list[dict]:
    """For each layer member of the plan's parts: how `isep-pack --delta-from` would ship it, without
    reading any layer: referenced, a delta against the named layer (shipped plain after all when the
    delta is not smaller), or plain; with the memory a delta needs and the segmentation note."""
    layers = StoreLayers([reference])
    candidates = store_candidates(reference.doc)
    positions = _positions(plan.get("images") or [])
    by_seq = {m["seq"]: m for m in plan["members"]}
    out = []
    for part in plan["parts"]:
        for seq in part["members"]:
            rec = by_seq.get(seq) or {}
            if not rec.get("layer_diff_id") or rec.get("type") != "file":
                continue
            row = {"part": part["file"], "layer": rec["layer_diff_id"], "size": rec["size"], "ship": "plain"}
            hit = layers.by_digest.get(rec.get("sha256") or "")
            if hit is not None and hit[2].get("size") == rec["size"]:
                row.update(ship="reference", reference=_describe(hit))
            elif not rec.get("compression") and rec["size"] >= MIN_DELTA:
                repo, position = positions.get(rec["layer_diff_id"], ("", -1))
                ranked = rank_references(LayerInfo(rec["layer_diff_id"], rec["size"], repo, position, part["role"],
                                                   name=rec["name"]), candidates)
                if ranked:
                    segments, note = plan_segments(rec["size"], ranked[0].size, memory)
                    row.update(ship="delta", reference=_describe(layers.by_digest[ranked[0].diff_id]),
                               memory=peak_memory(segments), note=note)
            out.append(row)
    return out


def shipping_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'layer':<19} {'bytes':>14}  {'ships as':<9} reference"]
    for row in rows:
        ref = row.get("reference") or {}
        where = f"{ref['diff_id'][:19]} in {ref['part']}" if ref else ""
        extra = f" ({row['memory'] >> 20} MiB{'; ' + row['note'] if row.get('note') else ''})" \
            if row["ship"] == "delta" else ""
        lines.append(f"{row['layer'][:19]:<19} {row['size']:>14,}  {row['ship']:<9} {where}{extra}")
    return lines
