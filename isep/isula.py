"""isula-build's separated layout, for `isep-pack --format isula`.

isula-build loads a bundle by untarring its three tarballs into one directory and loading that as a
containers/image docker-archive: every layer as `<legacyID>/layer.tar` (a regular file) with
`VERSION` and `json` beside it, the config as `<hex>.json`, and in the app tarball a `manifest.json`
listing all layers and a `repositories`. Legacy IDs are containers/image's (isep.legacy). Layer
bytes are copied verbatim under these names; the tar headers are new (mode 0444, isula-build's
mtime 2016-12-31), so this layout is loadable but not byte-exact.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Iterable

from .archive import Chunk, KeptJson, ScannedArchive, build_index, pass_member, recorded_members
from .digests import BlobHasher, digest_hex, sniff_compression
from .errors import BadInput, IntegrityError, Misfit
from .legacy import chain_ids, gojson, sorted_map
from .names import follow_renames, split_tag
from .pack import (DIGEST_NAME, PackOptions, PackResult, PackRun, _Spool, check_plan_member, copy_member)
from .partition import make_plan, shared_part_names
from .parts import DecompressingReader, PartWriter
from .refs import Ref
from .tarstream import Member, Source, TarReader, padded
from .tarwrite import build_header

ISULA_MTIME = 1483142400  # time.Date(2017, 1, 0, ...) = 2016-12-31T00:00:00Z, as isula-build writes


class _Emitter:
    """Synthesised members of one part, numbered in the order they are written."""

    def __init__(self, counter: list[int]):
        self.counter = counter
        self.dirs: set[str] = set()

    def member(self, writer, name: str, size: int, mode: int, typeflag: bytes = b"0", data: bytes | None = None,
               digests: dict | None = None) -> bytes:
        mode |= 0o40000 if typeflag == b"5" else 0o100000
        header = _go_mode(build_header(name, size, mode=mode, mtime=ISULA_MTIME, typeflag=typeflag,
                                       uname="root", gname="root"), mode)
        writer.write(header)
        if data is not None:
            writer.write(data + bytes(padded(size) - size))
        rec = {"seq": self.counter[0], "name": name, "type": "dir" if typeflag == b"5" else "file",
               "size": size, "raw_size": len(header) + padded(size), "mode": mode, **(digests or {})}
        self.counter[0] += 1
        writer.members.append(rec)
        return header


def _go_mode(header: bytes, mode: int) -> bytes:
    """The header with the file-type bits in its mode field, as Go's archive/tar writes them for
    isula-build (040755, 0100444); build_header keeps permission bits only."""
    block = bytearray(header[-512:])
    block[100:108] = b"%07o\0" % mode
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(header[:-512]) + bytes(block)


def _digests(data: bytes) -> dict:
    hasher = BlobHasher("")
    hasher.update(data)
    return hasher.result()


def _layer_targets(plan: dict, files: dict[str, str]):
    """Where each layer and config member goes: member -> [(part file, legacy id, json)], and
    config member -> [(app part file, image)]."""
    below = len(plan["lib"]["diff_ids"]) if plan["lib"] else len(plan["base"]["diff_ids"])
    targets: dict[str, list[tuple[str, str, str]]] = {}
    configs: dict[str, list[tuple[str, dict]]] = {}
    for image in plan["images"]:
        app_file = image["app_part"]
        for pos, (member, (lid, text)) in enumerate(zip(image["layer_members"], image["legacy_layers"])):
            part = files["base"] if pos < len(plan["base"]["diff_ids"]) else files["lib"] if pos < below else app_file
            if (part, lid, text) not in targets.setdefault(member, []):
                targets[member].append((part, lid, text))
        configs.setdefault(image["config"]["member"], []).append((app_file, image))
    return targets, configs


def pack_isula(source: Source, plan: dict, target, options: PackOptions) -> PackResult:
    run = PackRun(target, options)
    for part in plan["parts"]:
        run.writer(part)
    counter = [0]
    emitters = {f: _Emitter(counter) for f in run.writers}
    targets, configs = _layer_targets(plan, {p["id"]: p["file"] for p in plan["parts"]})
    for seq, member in enumerate(TarReader(source)):
        want = plan["members"][seq] if seq < len(plan["members"]) else None
        want = check_plan_member(member, seq, want, source.name)
        layer_targets = targets.get(member.name, [])
        config_targets = configs.get(member.name, [])
        if not layer_targets and not config_targets:
            member.skip()
            continue
        _copy(member, want, layer_targets, config_targets, run, emitters)
        if options.progress:
            options.progress(source.offset)
    return _finish(plan, run, emitters, 0, source.offset)


def _finish(plan: dict, run: PackRun, emitters: dict, spool_peak: int, source_bytes: int) -> PackResult:
    for image in plan["images"]:
        _write_metadata(image, run.writers[image["app_part"]], emitters[image["app_part"]])
    isula_plan = {**plan, "images": [_isula_image(im) for im in plan["images"]],
                  "source": {**plan["source"], "format": "isula"}}
    for im in isula_plan["images"]:
        im["byte_exact"] = False
    return run.finish(isula_plan, 1024, spool_peak, source_bytes)


# --- from a pipe -----------------------------------------------------------------------------------

def legacy_layers_below(base: Ref, lib: Ref | None) -> dict[str, list[tuple[str, str, str]]]:
    """diffID -> [(role, legacy id, json)] of the base and lib layers. Below an image's top layer a
    legacy ID depends only on the diffIDs under it (isep.legacy), which the refs give."""
    stack = lib.diff_ids if lib is not None else base.diff_ids
    out: dict[str, list[tuple[str, str, str]]] = {}
    parent = ""
    for pos, (diff_id, chain) in enumerate(zip(stack, chain_ids(stack))):
        cfg = {"parent": parent} if parent else {}
        lid = hashlib.sha256(gojson(sorted_map({**cfg, "layer_id": chain}))).hexdigest()
        role = "base" if pos < len(base.diff_ids) else "lib"
        out.setdefault(diff_id, []).append((role, lid, gojson(sorted_map({**cfg, "id": lid})).decode()))
        parent = lid
    return out


class _StreamRouter:
    """Base and lib layers go straight into their parts under their legacy IDs; everything else (app
    layers, whose IDs need the image config, which may come last, and metadata) goes verbatim into
    the compressed app section, laid out once the save's end has shown the plan."""

    def __init__(self, below, run: PackRun, files: dict[str, str], emitters, section: PartWriter, spool: _Spool,
                 source_name: str):
        self.below, self.run, self.files, self.emitters = below, run, files, emitters
        self.section, self.spool = section, spool
        self.kept = KeptJson(source_name)
        self.placed: set[str] = set()

    def route(self, member: Member, rec: dict) -> None:
        match = DIGEST_NAME.match(member.name) if member.is_file else None
        named = "sha256:" + (match.group(1) or match.group(2)) if match else None
        if named is not None and named in self.below:
            self._place(member, rec, named, None)
            return
        if not member.is_file or not (member.name.endswith("/layer.tar") or member.name.startswith("blobs/")):
            copy_member(member, rec, [self.section], self.kept)
            return
        data = member.iter_data()
        first = next(data, b"")
        chunks: Iterable[Chunk] = itertools.chain([first], data)
        if member.name.startswith("blobs/") and not sniff_compression(first):
            copy_member(member, rec, [self.section], self.kept, chunks)  # named by its digest: not below
            return
        self._spool(member, rec, chunks)

    def _spool(self, member: Member, rec: dict, chunks) -> None:
        """A layer known only by its content: at most one, held until its digest is known."""
        rec.update(pass_member(member, [self.spool.write], self.kept, chunks=chunks))
        diff_id = rec.get("diff_id") or rec["sha256"]
        if diff_id in self.below:
            self._place(member, rec, diff_id, self.spool.replay())
            return
        self.section.write(member.header)
        for data in self.spool.replay():
            self.section.write(data)
        self.section.write(member.padding)
        self.section.members.append(rec)

    def _place(self, member: Member, rec: dict, diff_id: str, chunks) -> None:
        if diff_id in self.placed:  # the same layer twice in a save: once is enough
            for _ in chunks if chunks is not None else member.iter_data():
                pass
            return
        self.placed.add(diff_id)
        targets = [(self.files[role], lid, text) for role, lid, text in self.below[diff_id]]
        rec.update(_copy(member, {"layer_diff_id": diff_id}, targets, [], self.run, self.emitters, chunks))


def pack_isula_stream(source: Source, base: Ref, lib: Ref | None, target, options: PackOptions) -> PackResult:
    """--format isula from a pipe: one pass; temporary disk is the app section, compressed, plus one
    layer whose content alone tells whether it is a base or lib layer."""
    run = PackRun(target, options)
    names = shared_part_names(base, lib, options.compression, options.renames or {})
    files = {}
    for role, stack in (("base", base.diff_ids), ("lib", lib.diff_ids if lib else None)):
        if stack is not None:
            files[role] = run.writer({"role": role, "file": names[role], "diff_ids": stack}).file_name
    counter = [0]
    emitters = {f: _Emitter(counter) for f in run.writers}
    section_out = target.open_section()
    section = PartWriter("app-section", section_out, "zstd", 1)  # read back once: speed over size
    router = _StreamRouter(legacy_layers_below(base, lib), run, files, emitters, section,
                           _Spool(target.spool_dir), source.name)
    reader = TarReader(source)
    scanned = ScannedArchive(name=source.name)
    for member, rec in recorded_members(reader, scanned):
        router.route(member, rec)
        if options.progress:
            options.progress(source.offset)
    scanned.trailer, scanned.size, scanned.blobs = reader.trailer, source.offset, router.kept.blobs
    plan = make_plan(build_index(scanned), base, lib, compression=options.compression, renames=options.renames)
    _adopt_shared_parts(plan, files, router)
    for part in plan["parts"]:
        if part["role"] == "app":
            emitters[run.writer(part).file_name] = _Emitter(counter)
    section.finish()
    section_out.close()
    _lay_out_section(plan, files, section_out, target, run, emitters)
    target.name(section_out, None)
    return _finish(plan, run, emitters, router.spool.peak, source.offset)


def _adopt_shared_parts(plan: dict, files: dict[str, str], router: _StreamRouter) -> None:
    """The plan's base and lib parts are the ones written while streaming: same layers, same IDs."""
    renamed = {}
    for part in plan["parts"]:
        if part["role"] in files:
            missing = [d for d in part["layers"] if d not in router.placed]
            if missing:
                raise BadInput(f"could not place layer {missing[0]} while streaming: its member did not "
                               f"show which layer it carries; run isep-index | isep-partition and pack with --plan")
            renamed[part["file"]] = files[part["role"]]
            part["file"] = files[part["role"]]
    top = len(plan["lib"]["diff_ids"]) if plan["lib"] else len(plan["base"]["diff_ids"])
    for image in plan["images"]:
        if len(image["diff_ids"]) <= top:
            raise Misfit(f"image {', '.join(image['tags']) or image['config']['digest']} has no layer above "
                         f"the {'lib' if plan['lib'] else 'base'}: isula-build's layout needs one")
    follow_renames(plan["images"], renamed)


def _lay_out_section(plan: dict, files: dict[str, str], section_out, target, run: PackRun, emitters) -> None:
    """Read the app section back: app layers under their legacy IDs, configs, into the app parts."""
    targets, configs = _layer_targets(plan, files)
    shared = set(files.values())
    want_of = {m["name"]: m for m in plan["members"]}
    with target.reopen(section_out) as raw:
        reader = TarReader(Source(DecompressingReader(raw, "zstd", None, "the app section"), name="the app section"))
        for member in reader:
            layer_targets = [t for t in targets.get(member.name, []) if t[0] not in shared]
            config_targets = configs.get(member.name, [])
            if not layer_targets and not config_targets:
                member.skip()
                continue
            _copy(member, want_of.get(member.name), layer_targets, config_targets, run, emitters)


def _copy(member, want: dict | None, layer_targets, config_targets, run: PackRun, emitters, chunks=None) -> dict:
    """Write the member's data under each of its new names; its digests."""
    writers = []
    for part, lid, text in layer_targets:
        writer, emit = run.writers[part], emitters[part]
        if lid not in emit.dirs:
            emit.dirs.add(lid)
            emit.member(writer, f"{lid}/", 0, 0o755, b"5")
            emit.member(writer, f"{lid}/VERSION", 3, 0o444, data=b"1.0", digests=_digests(b"1.0"))
            body = text.encode()
            emit.member(writer, f"{lid}/json", len(body), 0o444, data=body, digests=_digests(body))
            writers.append((writer, emit, f"{lid}/layer.tar"))
    for part, image in config_targets:
        writers.append((run.writers[part], emitters[part], digest_hex(image["config"]["digest"]) + ".json"))
    for writer, emit, name in writers:
        emit.member(writer, name, member.size, 0o444)
    hasher = BlobHasher(member.name)
    for chunk in member.iter_data() if chunks is None else chunks:
        hasher.update(chunk)
        for writer, _, _ in writers:
            writer.write(chunk)
    pad = bytes(padded(member.size) - member.size)
    result = hasher.result()
    for writer, _, name in writers:
        writer.write(pad)
        next(r for r in reversed(writer.members) if r["name"] == name).update(result)
    layer = want.get("layer_diff_id") if want else None
    if layer and (result.get("diff_id") or result.get("sha256")) != layer:
        raise IntegrityError(f"layer member {member.name!r} has diffID {result.get('diff_id') or result['sha256']}, "
                             f"the image config says {layer}")
    return result


def _write_metadata(image: dict, writer, emit: _Emitter) -> None:
    layers = [f"{lid}/layer.tar" for lid, _ in image["legacy_layers"]]
    manifest = gojson([{"Config": digest_hex(image["config"]["digest"]) + ".json", "RepoTags": image["tags"],
                        "Layers": layers}])
    emit.member(writer, "manifest.json", len(manifest), 0o600, data=manifest, digests=_digests(manifest))
    repositories = b"{}"
    if image["tags"]:
        repo, tag = split_tag(image["tags"][0])
        repositories = gojson({repo: {tag: image["legacy_layers"][-1][0]}})
    emit.member(writer, "repositories", len(repositories), 0o600, data=repositories, digests=_digests(repositories))


def _isula_image(image: dict) -> dict:
    return {**image, "layer_paths": [f"{lid}/layer.tar" for lid, _ in image["legacy_layers"]],
            "config": {"member": digest_hex(image["config"]["digest"]) + ".json", "digest": image["config"]["digest"]}}

