"""Packing: one pass over an archive routes every member's original bytes into its part.

With a plan, every member's part is known from its position: nothing is decided again and nothing
is spooled. Without one (`--base/--lib` on a pipe) a member is routed when its header arrives if its
name tells its layer (digest-named blobs, containers/image symlinks). A member whose layer is known
only from its content (a legacy `<v1id>/layer.tar`, a compressed blob named by its compressed
digest) is held in a spool of at most one member until its digest is known; the small `<v1id>/`
siblings that precede it wait in memory. App members go to one app section, which becomes the app
part when the save holds one image and is split per image otherwise.
"""
from __future__ import annotations

import hashlib
import json
import itertools
import re
import tempfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

import xxhash

from .archive import (JSON_CAP, Chunk, KeptJson, ProgressCallback, ScannedArchive, build_index, link_target, load_json,
                      pass_member, recorded_members)
from .bundle import encode_isula_manifest, part_for_layers
from .digests import digest_hex, sniff_compression
from .errors import BadInput, EnvironmentFailure, IntegrityError
from .legacy import gojson
from .names import coexisting_name, follow_renames
from .partition import make_plan, shared_part_names
from .parts import DecompressingReader, PartWriter, Sink, rewound_chunks
from .refs import Ref
from .targets import OutputTarget
from .tarstream import Member, Source, TarReader, padded
from .tarwrite import build_header

DIGEST_NAME = re.compile(r"^(?:blobs/sha256/([0-9a-f]{64})|([0-9a-f]{64})\.tar)$")
BLOB_NAME = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
V1_MEMBER = re.compile(r"^([0-9a-f]{64})/(?:|VERSION|json|layer\.tar)$")
SPOOL_IN_MEMORY = 1 << 20
ROLES = ("base", "lib", "app")


@dataclass
class PackOptions:
    compression: str = "zstd"
    level: int | None = None
    parts: tuple[str, ...] = ROLES        # which roles are written
    isula_manifest: bool = True
    layout: str = "isep"                  # "isula": isula-build's separated layout (not verbatim)
    renames: dict | None = None
    progress: ProgressCallback | None = None


@dataclass
class PackResult:
    manifest: dict
    written: list[dict]
    reused: list[str]
    spool_peak: int
    source_bytes: int


def save_id(members: list[dict]) -> str:
    """Identifies one save: members, sizes and digests (parts of one save merge by position)."""
    h = hashlib.sha256()
    for m in members:
        h.update(f"{m['name']}\0{m['size']}\0{m['offset']}\n".encode())
    return h.hexdigest()[:16]


# --- copying members -------------------------------------------------------------------------------

def copy_member(member: Member, rec: dict, writers: list[PartWriter], kept: KeptJson | None,
                chunks: Iterable[Chunk] | None = None, *, listed: bool = True) -> None:
    """Copy one member's raw bytes to the writers while hashing its data (and keep it, when kept is
    given, if it is small JSON); listed: rec goes into each writer's members."""
    for w in writers:
        w.write(member.header)
        if listed:
            w.members.append(rec)
    rec.update(pass_member(member, [w.write for w in writers], kept, chunks=chunks))
    if member.padding:
        for w in writers:
            w.write(member.padding)


def _digests_of(data: bytes) -> dict:
    return {"sha256": "sha256:" + hashlib.sha256(data).hexdigest(), "xxh3": xxhash.xxh3_128(data).hexdigest()}


def restrict_metadata(name: str, data: bytes, image: dict) -> bytes:
    """A multi-image save's manifest.json, repositories or index.json restricted to one image."""
    doc = load_json(data, name)
    if name == "manifest.json":
        entry = image.get("manifest_entry")
        doc = [entry] if entry is not None else []
    elif name == "repositories" and isinstance(doc, dict):
        tags = set(image["tags"])
        doc = {repo: {t: v for t, v in entries.items() if f"{repo}:{t}" in tags}
               for repo, entries in doc.items() if isinstance(entries, dict)}
        doc = {repo: entries for repo, entries in doc.items() if entries}
    elif name == "index.json" and isinstance(doc, dict):
        doc = {**doc, "manifests": image.get("index_descriptors") or []}
    return gojson(doc) + b"\n"  # Go's json.Encoder, as Docker writes it


def _write_restricted(member: Member, rec: dict, data: bytes, writer: PartWriter, image: dict) -> dict:
    """Write the metadata member restricted to one image; its record."""
    body = restrict_metadata(member.name, data, image)
    writer.write(build_header(member.name, len(body), mode=member.mode, mtime=member.mtime))
    writer.write(body)
    writer.write(bytes(padded(len(body)) - len(body)))
    return {**rec, **_digests_of(body), "size": len(body), "rewritten": True,
            "raw_size": len(build_header(member.name, len(body))) + padded(len(body))}


encode_record = json.JSONEncoder(separators=(",", ":")).encode


def manifest_record(member: Member, seq: int) -> dict:
    """What the bundle manifest keeps of a member, before its digests (slim's fields)."""
    rec = {"seq": seq, "name": member.name, "type": member.kind, "size": member.size,
           "raw_size": member.raw_size, "mode": member.mode}
    if member.linkname and member.kind in ("symlink", "hardlink"):
        rec["link"] = member.linkname
    return rec


def check_plan_member(member: Member, seq: int, want: dict | None, source_name: str) -> dict:
    """The plan's record of member seq, when it names this member; BadInput otherwise."""
    if want is None or want["name"] != member.name or want["size"] != member.size:
        got = f"{member.name!r} ({member.size} bytes)"
        exp = f"{want['name']!r} ({want['size']} bytes)" if want else "no member"
        raise BadInput(f"{source_name} does not match the plan: member {seq} is {got}, the plan has {exp}")
    return want


class PlanRouter:
    """Sends each member to the parts a plan names for its position. It consumes the plan's member
    records (each is dropped once its member is routed) so that per-member state is held once, the
    plan's or the manifest's record (docs/formats.md, "Limits")."""

    def __init__(self, plan: dict, writers: dict[str, PartWriter], records: dict[str, list[bytes]]):
        self.writers = writers
        self.records = records  # per part file: its members' manifest records as JSON, in stream order
        self.expected: list[dict | None] = plan["members"]   # indexed by seq (check_plan, make_plan)
        files_of: dict[tuple[str, ...], tuple[str, ...]] = {}
        seq_files: dict[int, list[str]] = {}
        self.restrict: dict[str, set[int]] = {}
        for part in plan["parts"]:
            if part["file"] not in writers:
                continue
            for seq in part["members"]:
                seq_files.setdefault(seq, []).append(part["file"])
            self.restrict[part["file"]] = set(part.get("rewrite") or [])
        # one tuple per distinct combination of parts, shared by the members routed alike
        self.part_of_seq = {seq: files_of.setdefault(tuple(f), tuple(f)) for seq, f in seq_files.items()}
        del seq_files
        self.image_of_app = {im["app_part"]: im for im in plan["images"]}

    def route(self, member: Member, seq: int, source_name: str) -> dict:
        want = check_plan_member(member, seq, self.expected[seq] if seq < len(self.expected) else None,
                                 source_name)
        self.expected[seq] = None
        rec = manifest_record(member, seq)
        planned_sha256 = want.get("sha256")
        files = self.part_of_seq.get(seq, ())
        plain = [self.writers[f] for f in files if seq not in self.restrict[f]]
        special = [f for f in files if seq in self.restrict[f]]
        restricted = {}
        if special:
            data = member.read_all(JSON_CAP)
            rec.update(_digests_of(data))
            for w in plain:
                w.write(member.header + data + member.padding)
            for f in special:
                restricted[f] = _write_restricted(member, rec, data, self.writers[f], self.image_of_app[f])
        else:
            copy_member(member, rec, plain, None, listed=False)  # the plan knows the metadata: keep nothing
        if planned_sha256 and rec.get("sha256") != planned_sha256 and not special:
            raise IntegrityError(f"member {member.name!r} has sha256 {rec.get('sha256')}, "
                                 f"the plan says {planned_sha256}")
        # a plan from headers alone has not hashed small compressed layers; the copy of a name that
        # counts (the last, as in a load) is the one the plan marks as the layer
        named = BLOB_NAME.match(member.name) if want.get("layer_diff_id") else None
        if named and rec.get("sha256") and rec["sha256"] != "sha256:" + named.group(1):
            raise IntegrityError(f"{source_name}: {member.name!r} holds bytes of digest {rec['sha256']}")
        layer = want.get("layer_diff_id")
        if layer and (rec.get("diff_id") or rec.get("sha256")) != layer:
            raise IntegrityError(f"layer member {member.name!r} has diffID "
                                 f"{rec.get('diff_id') or rec.get('sha256')}, the image config says {layer}")
        line = encode_record(slim(rec)).encode()  # a third of the dict's memory (docs/formats.md)
        for f in files:
            self.records.setdefault(f, []).append(encode_record(slim(restricted[f])).encode()
                                                  if f in restricted else line)
        return rec


# --- the pack run ----------------------------------------------------------------------------------

class PackRun:
    """The writers of one pack, and the bundle manifest entries they become."""

    def __init__(self, target: OutputTarget, options: PackOptions):
        self.target = target
        self.options = options
        self.outs: dict[str, Sink] = {}
        self.writers: dict[str, PartWriter] = {}
        self.records: dict[str, list[bytes]] = {}  # a PlanRouter's: manifest records as JSON
        self.reused: list[str] = []

    def writer(self, part: dict) -> PartWriter:
        """A writer for a plan part: a real one when the role is wanted and the store lacks it."""
        existing = self.target.existing
        same = None if existing is None or part["role"] == "app" else \
            part_for_layers(existing, part["role"], part["diff_ids"])
        wanted = part["role"] in self.options.parts
        if same is not None and not self.target.holds_part(same):
            if not wanted:  # the image would name a part that is not there
                raise IntegrityError(f"the store lists the {part['role']} part {same['file']}, but its file is "
                                     f"gone; pack with --parts {part['role']},app to write it again")
            same = None  # its file is gone: written again, never listed as reused
        if same is not None:
            self.reused.append(same["file"])
            part["file"] = same["file"]
            wanted = False
        elif wanted:
            part["file"] = coexisting_name([existing, self.target.reference_doc], part)
        out = self.target.open(part["file"]) if wanted else None
        if out is not None:
            self.outs[part["file"]] = out
        w = part_writer(part["file"], out, self.target, self.options)
        self.writers[part["file"]] = w
        return w

    def finish(self, plan: dict, trailer_size: int, spool_peak: int, source_bytes: int,
               save: str | None = None) -> PackResult:
        """The bundle manifest's entries; save: save_id of the plan's members, when a PlanRouter
        has consumed them."""
        infos = {}
        for file_name, writer in self.writers.items():
            infos[file_name] = writer.finish()
            out = self.outs.get(file_name)
            if out is not None:
                out.close()
        existing = {p["file"]: p for p in (self.target.existing or {}).get("parts", [])}
        for file_name, writer in self.writers.items():
            if not writer.wanted:  # reused (its hashes are the store's) or not asked for (unknown)
                old = existing.get(file_name, {})
                infos[file_name] = {**infos[file_name], "sha256": old.get("sha256", ""),
                                    "size": old.get("size", 0)}
        save = save or save_id(plan["members"])
        parts_out = []
        for part in plan["parts"]:
            writer = self.writers[part["file"]]
            if not writer.wanted:
                continue
            info = infos[part["file"]]
            members: list = self.records.get(part["file"]) or [slim(m) for m in writer.members]
            parts_out.append({
                "file": part["file"], "role": part["role"], "image": part.get("image"),
                "compression": info["compression"], "size": info["size"], "sha256": info["sha256"],
                "xxh3": info["xxh3"], "raw_size": info["raw_size"], "diff_ids": part["diff_ids"],
                "layers": part["layers"], "format": plan["source"]["format"], "save": save,
                "members": members,
            })
        written_apps = {p["file"] for p in parts_out if p["role"] == "app"}
        images = [{
            "tags": im["tags"], "config": im["config"], "platform": im["platform"],
            "diff_ids": im["diff_ids"], "layer_paths": im["layer_paths"],
            "parts": im["parts"],
            "app_part": im["app_part"], "format": plan["source"]["format"], "save": save,
            "trailer_size": trailer_size, "byte_exact": im["byte_exact"] and not self.reused,
        } for im in plan["images"] if im["app_part"] in written_apps]  # a store of base/lib only has no image
        isula = isula_manifest(plan, infos) if self.options.isula_manifest else None
        doc = self.target.finish(parts_out, images, isula)
        return PackResult(doc, parts_out, self.reused, spool_peak, source_bytes)


SLIM_KEYS = frozenset(("seq", "name", "type", "size", "raw_size", "mode", "link", "sha256", "xxh3", "diff_id",
                       "compression", "rewritten"))


def slim(rec: dict) -> dict:
    """A member's manifest record: rec itself, without what the manifest does not keep (in place, so
    that a pack of many members does not hold two records of each)."""
    for key in [k for k, v in rec.items() if k not in SLIM_KEYS or v is None]:
        del rec[key]
    return rec


def isula_manifest(plan: dict, infos: dict) -> bytes:
    """isula-build's `manifest`: one entry per tag of each app image, with its exact field names."""
    by_role = {p["role"]: p for p in plan["parts"]}

    def layer_ids(part, image):
        """Legacy layer IDs where the save has them (<v1id>/layer.tar), else diffID hex."""
        if not part:
            return None
        paths = dict(zip(image["diff_ids"], image["layer_paths"]))
        return [paths[d].split("/")[0] if paths.get(d, "").endswith("/layer.tar") else digest_hex(d)
                for d in part["layers"]]

    out: dict[str, dict] = {}
    for image in plan["images"]:
        if not image["tags"]:
            continue
        app = next(p for p in plan["parts"] if p["file"] == image["app_part"])
        lib, base = by_role.get("lib"), by_role["base"]
        entry = {
            "app": app["file"], "appHash": digest_hex(infos[app["file"]]["sha256"]),
            "appLayers": layer_ids(app, image),
            "lib": lib["file"] if lib else "", "libHash": digest_hex(infos[lib["file"]]["sha256"]) if lib else "",
            "libImageName": (plan["lib"] or {}).get("name") or "", "libLayers": layer_ids(lib, image),
            "base": base["file"], "baseHash": digest_hex(infos[base["file"]]["sha256"]),
            "baseImageName": plan["base"]["name"], "baseLayer": layer_ids(base, image)[-1],
        }
        # isula-build keys an image by its first tag only, and `ctr-img load -i` looks its argument
        # up exactly: every tag gets the same entry, so that the image loads by any of its names
        for tag in image["tags"]:
            out.setdefault(tag, entry)
    return encode_isula_manifest(out)


def _fix_image_parts(plan: dict) -> None:
    """Remember each part's planned name, so that images follow a part renamed by reuse."""
    for part in plan["parts"]:
        part["_original"] = part["file"]


def _rename_in_images(plan: dict) -> None:
    follow_renames(plan["images"], {p["_original"]: p["file"] for p in plan["parts"]})


def name_app_parts(plan: dict, stores: list[dict | None]) -> None:
    """An app part takes the chainID-suffixed name when a store manifest of STORES (the output store,
    the --delta-from store) lists another release under its planned one: a floating tag (app:stable)
    released again keeps both, and a join by the tag takes the newest image. Its image follows it."""
    renamed = {}
    for part in plan["parts"]:
        if part["role"] == "app":
            name = coexisting_name(stores, part, ("app",))
            renamed[part["file"]], part["file"] = name, name
    follow_renames(plan["images"], renamed)


def pack_with_plan(source: Source, plan: dict, target: OutputTarget, options: PackOptions) -> PackResult:
    """Execute a plan: every member goes where the plan says."""
    run = PackRun(target, options)
    name_app_parts(plan, [target.existing, target.reference_doc])
    _fix_image_parts(plan)
    for part in plan["parts"]:
        run.writer(part)
    _rename_in_images(plan)
    save = save_id(plan["members"])
    router = PlanRouter(plan, run.writers, run.records)
    reader = TarReader(source)
    count = 0
    for seq, member in enumerate(reader):
        router.route(member, seq, source.name)
        count += 1
        if options.progress:
            options.progress(source.offset)
    if count != len(plan["members"]) or len(reader.trailer) != plan.get("trailer_size", len(reader.trailer)):
        raise BadInput(f"{source.name} does not match the plan: it has {count} members, "
                       f"the plan {len(plan['members'])}")
    return run.finish(plan, len(reader.trailer), 0, source.offset, save)


# --- one shot, from a pipe -------------------------------------------------------------------------

class _Spool:
    """One member's raw bytes: in memory when small, else in an unnamed temporary file."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.mem = bytearray()
        self.file: IO[bytes] | None = None
        self.size = 0
        self.peak = 0

    def write(self, data: Chunk) -> None:
        self.size += len(data)
        self.peak = max(self.peak, self.size)
        if self.file is None and len(self.mem) + len(data) <= SPOOL_IN_MEMORY:
            self.mem += data
            return
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.directory, prefix=".isep-tmp-spool-")
                self.file.write(self.mem)
                self.mem = bytearray()
            self.file.write(data)
        except OSError as exc:
            raise EnvironmentFailure(f"cannot spool a layer: {exc.strerror}") from None

    def replay(self) -> Iterator[bytes]:
        if self.file is None:
            yield bytes(self.mem)
        else:
            yield from rewound_chunks(self.file)
            self.file.close()
            self.file = None
        self.mem = bytearray()
        self.size = 0


class OneShot:
    """Routes members of an archive nobody has indexed, for pack --base/--lib on a pipe."""

    def __init__(self, base: Ref, lib: Ref | None, writers: dict[str, PartWriter], spool_dir: str | None,
                 source_name: str):
        self.role_of_diff = {d: "base" for d in base.diff_ids}
        if lib is not None:
            for d in lib.diff_ids[len(base.diff_ids):]:
                self.role_of_diff.setdefault(d, "lib")
        self.writers = writers           # by role: base, lib, app (the app section)
        self.role_of_member: dict[str, str] = {}
        self.dir_role: dict[str, str] = {}
        self.held: list[tuple[bytes, dict]] = []
        self.held_dir: str | None = None
        self.spool = _Spool(spool_dir)
        self.kept = KeptJson(source_name)

    def role_by_name(self, name: str) -> str | None:
        m = DIGEST_NAME.match(name)
        return self.role_of_diff.get("sha256:" + (m.group(1) or m.group(2))) if m else None

    def put(self, role: str, member: Member, rec: dict) -> None:
        copy_member(member, rec, [self.writers[role]], self.kept)
        self.role_of_member[member.name] = role

    def flush_held(self, role: str) -> None:
        writer = self.writers[role]
        for raw, rec in self.held:
            writer.write(raw)
            writer.members.append(rec)
        self.held = []
        self.held_dir = None

    def route(self, member: Member, rec: dict) -> None:
        name = member.name
        v1 = V1_MEMBER.match(name)
        folder = v1.group(1) if v1 else None
        if self.held and folder != self.held_dir:
            self.flush_held("app")  # siblings whose layer.tar never came: safe in the app part
        if folder is not None and folder in self.dir_role:
            self.put(self.dir_role[folder], member, rec)
            return
        if folder is not None and not name.endswith("/layer.tar"):
            self._hold(member, rec, folder)
            return
        role = self.role_by_name(name)
        if member.kind == "symlink":
            target = link_target(name, member.linkname, "symlink")
            role = self.role_of_member.get(target) or self.role_by_name(target) or "app"
        if role is None and member.is_file and (folder is not None or name.startswith("blobs/")):
            chunks = member.iter_data()
            first = next(chunks, None)
            chunks = itertools.chain([] if first is None else [first], chunks)
            if folder is None and DIGEST_NAME.match(name) and not sniff_compression(first or b""):
                # uncompressed and named by its digest (its diffID if it is a layer): not base or lib
                copy_member(member, rec, [self.writers["app"]], self.kept, chunks)
                self.role_of_member[name] = "app"
                return
            role = self._resolve_by_content(member, rec, chunks)
            if folder is not None:
                self.dir_role[folder] = role
                self.flush_held(role)
            self._replay(role, rec)
            return
        role = role or "app"
        if folder is not None:
            self.dir_role[folder] = role
            self.flush_held(role)
        self.put(role, member, rec)

    def _hold(self, member: Member, rec: dict, folder: str) -> None:
        data = member.read_all(JSON_CAP) if member.is_file else b""
        if member.is_file:
            rec.update(_digests_of(data))
        self.held.append((member.header + data + member.padding, rec))
        self.held_dir = folder
        if sum(len(raw) for raw, _ in self.held) > JSON_CAP:  # not a real v1 folder: bound memory
            self.flush_held("app")

    def _resolve_by_content(self, member: Member, rec: dict, chunks: Iterable[Chunk]) -> str:
        self.spool.write(member.header)
        rec.update(pass_member(member, [self.spool.write], self.kept, chunks=chunks))
        self.spool.write(member.padding)
        role = self.role_of_diff.get(rec.get("diff_id") or rec["sha256"], "app")
        self.role_of_member[member.name] = role
        return role

    def _replay(self, role: str, rec: dict) -> None:
        writer = self.writers[role]
        for data in self.spool.replay():
            writer.write(data)
        writer.members.append(rec)


def _carried(writer: PartWriter) -> set[str | None]:
    return {m.get("diff_id") or m.get("sha256") for m in writer.members if m.get("type") == "file"}


def part_writer(file_name: str, out: Sink | None, target: OutputTarget, options: PackOptions) -> PartWriter:
    """A part's writer, compressing as the target takes parts (--delta-from: plain, encoded later)."""
    if target.spool_compression is not None:
        return PartWriter(file_name, out, target.spool_compression, None)
    return PartWriter(file_name, out, options.compression, options.level)


def pack_one_shot(source: Source, base: Ref, lib: Ref | None, target: OutputTarget,
                  options: PackOptions) -> PackResult:
    run = PackRun(target, options)
    # the plan is known only at the end, but base and lib are named after their refs
    names = shared_part_names(base, lib, options.compression, options.renames or {})
    role_writers: dict[str, PartWriter] = {}
    for role, stack in (("base", base.diff_ids), ("lib", lib.diff_ids if lib else None)):
        if stack is not None:
            role_writers[role] = run.writer({"role": role, "file": names[role], "diff_ids": stack})
    section_out = target.open_section()
    section = part_writer("app-section", section_out, target, options)
    role_writers["app"] = section
    shot = OneShot(base, lib, role_writers, target.spool_dir, source.name)
    reader = TarReader(source)
    scanned = ScannedArchive(name=source.name)
    for member, rec in recorded_members(reader, scanned):
        shot.route(member, rec)
        if options.progress:
            options.progress(source.offset)
    shot.flush_held("app")
    scanned.trailer, scanned.size, scanned.blobs = reader.trailer, source.offset, shot.kept.blobs
    plan = make_plan(build_index(scanned), base, lib, compression=options.compression,
                     renames=options.renames)
    _check_routing(plan, role_writers, base, lib)
    name_app_parts(plan, [target.existing, target.reference_doc])
    save = save_id(plan["members"])
    section.finish()
    section_out.close()
    _adopt_routing(plan, role_writers, run)
    apps = [p for p in plan["parts"] if p["role"] == "app"]
    if len(apps) == 1 and not apps[0].get("rewrite"):
        apps[0]["members"] = [m["seq"] for m in section.members]
        adopted = section.adopt_as(apps[0]["file"], wanted="app" in options.parts)
        run.writers[apps[0]["file"]] = adopted
        target.name(section_out, apps[0]["file"] if adopted.wanted else None)
    else:
        _split_section(plan, section, section_out, target, run, options)
    return run.finish(plan, len(reader.trailer), shot.spool.peak, source.offset, save)


def _check_routing(plan: dict, writers: dict[str, PartWriter], base: Ref, lib: Ref | None) -> None:
    """Every base layer must have landed in the base part, every lib layer in base or lib."""
    missing = [d for d in base.diff_ids if d not in _carried(writers["base"])]
    if lib is not None:
        have = _carried(writers["base"]) | _carried(writers["lib"])
        missing += [d for d in lib.diff_ids[len(base.diff_ids):] if d not in have]
    if missing:
        raise BadInput(f"could not place layer {missing[0]} while streaming: its member did not show "
                       f"which layer it carries; run isep-index | isep-partition and pack with --plan")


def _adopt_routing(plan: dict, writers: dict[str, PartWriter], run: PackRun) -> None:
    """Base and lib hold what was routed to them while streaming; app parts hold the rest."""
    routed = {role: [m["seq"] for m in writers[role].members] for role in ("base", "lib") if role in writers}
    below = set().union(*routed.values())
    renamed = {}
    for part in plan["parts"]:
        if part["role"] in routed:
            part["members"] = routed[part["role"]]
            renamed[part["file"]] = writers[part["role"]].file_name
            part["file"] = writers[part["role"]].file_name
        else:
            part["members"] = [s for s in part["members"] if s not in below]
    app_files = [p for p in plan["parts"] if p["role"] == "app"]
    covered = set(below).union(*(set(p["members"]) for p in app_files))
    stray = [m["seq"] for m in plan["members"] if m["seq"] not in covered]
    for part in app_files:
        part["members"] = sorted(set(part["members"]) | set(stray))
    follow_renames(plan["images"], renamed)


def _split_section(plan: dict, section: PartWriter, section_out: Sink, target: OutputTarget, run: PackRun,
                   options: PackOptions) -> None:
    """Several app images: read the app section back and split it per image."""
    for part in plan["parts"]:
        if part["role"] == "app":
            run.writer(part)
    router = PlanRouter(plan, {f: w for f, w in run.writers.items()
                               if any(p["file"] == f and p["role"] == "app" for p in plan["parts"])}, run.records)
    with target.reopen(section_out) as raw:
        reader = TarReader(Source(DecompressingReader(raw, section.compression, None, "the app section"),
                                  name="the app section"))
        for member, rec in zip(reader, section.members):
            router.route(member, rec["seq"], "the app section")
    target.name(section_out, None)
