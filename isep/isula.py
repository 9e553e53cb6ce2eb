"""isula-build's separated layout, for `isep-pack --format isula`.

isula-build loads a bundle by untarring its three tarballs into one directory and loading that as a
containers/image docker-archive: every layer as `<legacyID>/layer.tar` (a regular file) with
`VERSION` and `json` beside it, the config as `<hex>.json`, and in the app tarball a `manifest.json`
listing all layers and a `repositories`. Legacy IDs are containers/image's (isep.legacy). Layer
bytes are copied verbatim under these names; the tar headers are new (mode 0444, isula-build's
mtime 2016-12-31), so this layout is loadable but not byte-exact.
"""
from __future__ import annotations

from .digests import BlobHasher
from .errors import IntegrityError
from .legacy import gojson
from .names import split_tag
from .pack import PackOptions, PackResult, PackRun, check_plan_member
from .tarstream import Source, TarReader, padded
from .tarwrite import build_header

ISULA_MTIME = 1483142400  # time.Date(2017, 1, 0, ...) = 2016-12-31T00:00:00Z, as isula-build writes


class _Emitter:
    """Synthesised members of one part, numbered in the order they are written."""

    def __init__(self, counter: list[int]):
        self.counter = counter
        self.dirs: set[str] = set()

    def member(self, writer, name: str, size: int, mode: int, typeflag: bytes = b"0", data: bytes | None = None,
               digests: dict | None = None) -> bytes:
        header = build_header(name, size, mode=mode, mtime=ISULA_MTIME, typeflag=typeflag, uname="root", gname="root")
        writer.write(header)
        if data is not None:
            writer.write(data + bytes(padded(size) - size))
        rec = {"seq": self.counter[0], "name": name, "type": "dir" if typeflag == b"5" else "file",
               "size": size, "raw_size": len(header) + padded(size), "mode": mode, **(digests or {})}
        self.counter[0] += 1
        writer.members.append(rec)
        return header


def _digests(data: bytes) -> dict:
    hasher = BlobHasher("")
    hasher.update(data)
    return hasher.result()


def pack_isula(source: Source, plan: dict, target, options: PackOptions) -> PackResult:
    run = PackRun(target, options)
    for part in plan["parts"]:
        run.writer(part)
    files = {p["id"]: p["file"] for p in plan["parts"]}
    counter = [0]
    emitters = {f: _Emitter(counter) for f in run.writers}
    below = len(plan["base"]["diff_ids"]) + (len(plan["lib"]["diff_ids"]) - len(plan["base"]["diff_ids"])
                                              if plan["lib"] else 0)
    targets: dict[str, list[tuple[str, str, str]]] = {}   # member -> [(part file, legacy id, json)]
    configs: dict[str, list[tuple[str, dict]]] = {}       # member -> [(app part file, image)]
    for image in plan["images"]:
        app_file = image["app_part"]
        for pos, (member, (lid, text)) in enumerate(zip(image["layer_members"], image["legacy_layers"])):
            part = files["base"] if pos < len(plan["base"]["diff_ids"]) else files["lib"] if pos < below else app_file
            if (part, lid, text) not in targets.setdefault(member, []):
                targets[member].append((part, lid, text))
        configs.setdefault(image["config"]["member"], []).append((app_file, image))
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
    for image in plan["images"]:
        _write_metadata(image, run.writers[image["app_part"]], emitters[image["app_part"]])
    isula_plan = {**plan, "images": [_isula_image(im) for im in plan["images"]],
                  "source": {**plan["source"], "format": "isula"}}
    for im in isula_plan["images"]:
        im["byte_exact"] = False
    return run.finish(isula_plan, 1024, 0, source.offset)


def _copy(member, want: dict, layer_targets, config_targets, run: PackRun, emitters) -> None:
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
        writers.append((run.writers[part], emitters[part], image["config"]["digest"][7:] + ".json"))
    for writer, emit, name in writers:
        emit.member(writer, name, member.size, 0o444)
    hasher = BlobHasher(member.name)
    for chunk in member.iter_data():
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


def _write_metadata(image: dict, writer, emit: _Emitter) -> None:
    layers = [f"{lid}/layer.tar" for lid, _ in image["legacy_layers"]]
    manifest = gojson([{"Config": image["config"]["digest"][7:] + ".json", "RepoTags": image["tags"],
                        "Layers": layers}])
    emit.member(writer, "manifest.json", len(manifest), 0o600, data=manifest, digests=_digests(manifest))
    repositories = b"{}"
    if image["tags"]:
        repo, tag = split_tag(image["tags"][0])
        repositories = gojson({repo: {tag: image["legacy_layers"][-1][0]}})
    emit.member(writer, "repositories", len(repositories), 0o600, data=repositories, digests=_digests(repositories))


def _isula_image(image: dict) -> dict:
    return {**image, "layer_paths": [f"{lid}/layer.tar" for lid, _ in image["legacy_layers"]],
            "config": {"member": image["config"]["digest"][7:] + ".json", "digest": image["config"]["digest"]}}

