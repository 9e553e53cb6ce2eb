"""Archives that two readers could read differently (issue #11, group 2), and the differential check
against tests/godiff, a Go program that reads archives with archive/tar and encoding/json the way
docker load and containerd's importer do.

The rule every case must meet: isep and the Go loaders see the same images (configs, tags, diffIDs,
layer bytes), or isep refuses the archive with exit 4.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from . import craft

ROOT = Path(__file__).resolve().parents[2]
GODIFF = ROOT / "tests" / "godiff"


# --- the Go side ---------------------------------------------------------------------------------

def build_godiff(out_dir: Path) -> Path | None:
    """Build tests/godiff into out_dir (caches there too; no network): its path, or None without go."""
    go = shutil.which("go")
    if go is None:
        return None
    env = dict(os.environ, GOCACHE=str(out_dir / "gocache"), GOPATH=str(out_dir / "gopath"),
               GOFLAGS="-mod=mod", GOPROXY="off", CGO_ENABLED="0")
    binary = out_dir / "godiff"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=GODIFF, env=env, check=True,
                   capture_output=True, timeout=600)
    return binary


def go_read(binary: Path, paths: list[Path]) -> list[dict]:
    proc = subprocess.run([str(binary), *map(str, paths)], capture_output=True, check=True, timeout=600)
    return [json.loads(line) for line in proc.stdout.splitlines()]


# --- comparing the two views ---------------------------------------------------------------------

def isep_images(index: dict) -> list[tuple]:
    return [(im["config"]["digest"], tuple(im["tags"]), tuple(im["diff_ids"]),
             tuple(layer["digest"] for layer in im["layers"])) for im in index["images"]]


def go_images(view: dict) -> list[tuple]:
    return [(im["config"], tuple(im["tags"] or ()), tuple(im["diff_ids"] or ()), tuple(im["layers"]))
            for im in view["images"]]


def disagreements(index: dict, go: dict) -> list[str]:
    """Where an archive isep accepted (its index) is loaded otherwise by a Go loader."""
    if go.get("tar_error"):
        return [f"Go's archive/tar refuses it: {go['tar_error']}"]
    if go.get("extract_error"):
        return [f"docker load's extraction refuses it: {go['extract_error']}"]
    mine, fmt, out = isep_images(index), index["format"], []
    if fmt != "oci-archive":
        docker = go["docker"]
        if docker.get("error"):
            out.append(f"docker load refuses it: {docker['error']}")
        elif go_images(docker) != mine:
            out.append(f"docker load sees {go_images(docker)}, isep {mine}")
    containerd = go["containerd"]
    if containerd.get("error"):
        out.append(f"containerd refuses it: {containerd['error']}")
    elif fmt in ("docker-legacy", "podman"):
        if go_images(containerd) != mine:
            out.append(f"containerd sees {go_images(containerd)}, isep {mine}")
    else:  # an OCI layout: containerd names images from index.json annotations
        theirs = go_images(containerd)
        if fmt != "oci-archive":
            theirs, mine = [t[:1] + t[2:] for t in theirs], [m[:1] + m[2:] for m in mine]
        if set(theirs) != set(mine):
            out.append(f"containerd sees {sorted(set(theirs))}, isep {sorted(set(mine))}")
    return out


# --- crafting ------------------------------------------------------------------------------------

def header_block(name: bytes, size_field: bytes, typeflag: bytes, *, linkname: bytes = b"",
                 magic: bytes = b"ustar\x0000", fields: dict | None = None) -> bytes:
    """A 512-byte header with raw field bytes; the checksum is filled in by craft.raw_member."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = size_field
    block[136:148] = b"00000000000\0"
    block[156:157] = typeflag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = magic
    for offset, value in (fields or {}).items():
        block[offset:offset + len(value)] = value
    return bytes(block)


def raw(name: str, data: bytes, typeflag: bytes = b"0", *, size_field: bytes | None = None,
        **kw) -> craft.Raw:
    size_field = b"%011o\0" % len(data) if size_field is None else size_field
    return craft.raw_member(header_block(name.encode(), size_field, typeflag, **kw), data)


def extended(typeflag: bytes, body: bytes) -> bytes:
    """An extended header (PAX x/g or GNU L/K) with its body, to put before a member's header."""
    m = craft.raw_member(header_block(b"././@LongLink" if typeflag in b"LK" else b"PaxHeaders/x",
                                     b"%011o\0" % len(body), typeflag), body)
    return m.raw


def pax(**records) -> bytes:
    return b"".join(_pax_record(k, v) for k, v in records.items())


def _pax_record(key: str, value) -> bytes:
    value = value if isinstance(value, bytes) else str(value).encode()
    payload = b" " + key.encode() + b"=" + value + b"\n"
    n = len(payload) + 1
    while len(str(n)) + len(payload) != n:
        n = len(str(n)) + len(payload)
    return str(n).encode() + payload


def with_block_field(headers: bytes, offset: int, value: bytes) -> bytes:
    """Extended-header bytes with a field of their first block changed (checksum fixed)."""
    block = bytearray(headers[:512])
    block[offset:offset + len(value)] = value
    return craft.raw_member(bytes(block)).header + headers[512:]


def prefixed(prefix: bytes, member: craft.Raw) -> craft.Raw:
    """member with extended headers put before its own header."""
    return craft.Raw(member.name, member.kind, 0, prefix + member.header, member.data, member.padding)


def with_size_field(m: craft.Raw, size_field: bytes) -> craft.Raw:
    block = bytearray(m.header[-512:])
    block[124:136] = size_field
    return craft.Raw(m.name, m.kind, 0, m.header[:-512] + craft.raw_member(bytes(block)).header,
                     m.data, m.padding)


def with_field(m: craft.Raw, offset: int, value: bytes) -> craft.Raw:
    block = bytearray(m.header[-512:])
    block[offset:offset + len(value)] = value
    return craft.Raw(m.name, m.kind, 0, m.header[:-512] + craft.raw_member(bytes(block)).header,
                     m.data, m.padding)


def _edit(archive: bytes, fn) -> bytes:
    members, trailer = craft.split(archive)
    return craft.build(fn(members), trailer)


def _swap(members, name, new):
    return [new if m.name == name else m for m in members]


CASE_NAMES = (
    "manifest-twice",
    "manifest-twice-first",
    "manifest-dot-slash",
    "manifest-absolute",
    "manifest-double-slash",
    "manifest-dotdot",
    "manifest-dotdot-deep",
    "manifest-trailing-slash",
    "manifest-is-symlink",
    "manifest-is-hardlink",
    "manifest-symlink-after",
    "repositories-twice",
    "index-twice",
    "oci-layout-twice",
    "blob-twice-different",
    "blob-twice-last-different",
    "file-inside-a-file",
    "file-replaces-directory",
    "hardlink-to-missing",
    "symlink-outside",
    "Config-and-config",
    "Layers-and-layers",
    "RepoTags-and-repotags",
    "repoTags-only",
    "config-key-twice-exact",
    "manifests-and-Manifests",
    "Manifests-only",
    "mediaType-spelled-otherwise",
    "config-rootfs-key-twice",
    "config-deep-key-twice",
    "tag-lone-surrogate",
    "config-nan",
    "size-leading-nul",
    "size-underscore",
    "size-garbage-after-nul",
    "ok-size-base256",
    "size-base256-negative",
    "size-base256-sign-bit",
    "uid-not-octal",
    "mtime-leading-nul",
    "star-header",
    "gnu-bad-atime-with-prefix",
    "directory-with-data",
    "symlink-with-data",
    "regA-trailing-slash",
    "old-gnu-sparse",
    "contiguous-type",
    "volume-label",
    "ok-pax-size-override",
    "pax-size-plus",
    "pax-size-negative",
    "pax-path-empty",
    "pax-path-nul",
    "pax-nul-padding",
    "pax-bad-uid",
    "pax-sparse-record",
    "pax-key-twice",
    "pax-header-uid-not-octal",
    "two-pax-headers",
    "longname-and-pax-path",
    "two-longnames",
    "longlink-and-pax-linkpath",
    "global-header-path",
    "pax-then-global",
    "trailing-garbage",
    "no-end-of-archive",
    "index-names-an-image-manifest-json-lacks",
    "manifest-json-names-an-image-index-lacks",
    "oci-manifest-blob-under-another-name",
    "descriptor-media-type-mismatch",
    "ok-global-header-comment",
    "ok-gnu-longlink",
    "ok-pax-linkpath",
    "ok-gnu-longname",
    "ok-case-collision",
    "ok-repeated-directory",
)


def corpus(samples) -> dict[str, bytes]:
    """name -> archive: every ambiguity of issue #11 group 2 and its neighbours."""
    oci = samples["docker-oci"]["app1"].read_bytes()
    legacy = samples["docker-legacy"]["app1"].read_bytes()
    pod = samples["podman"]["app1"].read_bytes()
    two = samples["docker-oci"]["app1+app2"].read_bytes()
    oci_two = samples["oci-archive"]["app1+app2"].read_bytes()
    first_manifest = "blobs/sha256/" + json.loads(craft.get(oci_two, "index.json"))["manifests"][0]["digest"][7:]
    manifest = json.loads(craft.get(oci, "manifest.json"))
    entry = manifest[0]
    evil = json.dumps([dict(entry, RepoTags=["evil/app:1"])]).encode()
    index_text = craft.get(oci, "index.json").decode()
    config_name = entry["Config"]
    legacy_entry = json.loads(craft.get(legacy, "manifest.json"))[0]
    legacy_config = craft.get(legacy, legacy_entry["Config"])
    end = lambda a, *ms: craft.with_members(a, list(ms))  # noqa: E731
    start = lambda a, *ms: craft.with_members(a, list(ms), at="start")  # noqa: E731
    layout = next(m for m in craft.split(oci)[0] if m.name == "oci-layout")
    pod_link = next(m for m in craft.split(pod)[0] if m.kind == "symlink")
    hidden = craft.member("manifest.json", evil).raw
    cases = {
        # a second metadata member, or one that cleans to a metadata name
        "manifest-twice": end(oci, craft.member("manifest.json", evil)),
        "manifest-twice-first": start(oci, craft.member("manifest.json", evil)),
        "manifest-dot-slash": end(oci, craft.member("./manifest.json", evil)),
        "manifest-absolute": end(oci, craft.member("/manifest.json", evil)),
        "manifest-double-slash": end(oci, craft.member("//manifest.json", evil)),
        "manifest-dotdot": end(oci, craft.member("blobs/../manifest.json", evil)),
        "manifest-dotdot-deep": end(oci, craft.member("blobs/sha256/../../manifest.json", evil)),
        "manifest-trailing-slash": end(oci, craft.member("manifest.json/", evil)),
        "manifest-is-symlink": _edit(oci, lambda ms: [craft.member("evil.json", evil)] + _swap(
            ms, "manifest.json", craft.member("manifest.json", typeflag=b"2", linkname="evil.json"))),
        "manifest-is-hardlink": _edit(oci, lambda ms: [craft.member("evil.json", evil)] + _swap(
            ms, "manifest.json", craft.member("manifest.json", typeflag=b"1", linkname="evil.json"))),
        "manifest-symlink-after": end(oci, craft.member("evil.json", evil),
                                      craft.member("manifest.json", typeflag=b"2", linkname="evil.json")),
        "repositories-twice": end(legacy, craft.member("repositories", b'{"evil":{"1":"00"}}')),
        "index-twice": end(oci, craft.member("index.json", b'{"schemaVersion":2,"manifests":[]}')),
        "oci-layout-twice": end(oci, craft.member("oci-layout", b'{"imageLayoutVersion":"9.9.9"}')),
        "blob-twice-different": start(oci, craft.member(config_name, b'{"rootfs":{}}')),
        "blob-twice-last-different": end(oci, craft.member(config_name, b'{"rootfs":{}}')),
        "file-inside-a-file": end(oci, craft.member("manifest.json/x", b"x")),
        "file-replaces-directory": end(oci, craft.member("blobs", b"x")),
        "hardlink-to-missing": end(oci, craft.member("evil", typeflag=b"1", linkname="nothing")),
        "symlink-outside": end(oci, craft.member("blobs/evil", typeflag=b"2", linkname="../../x")),
        # JSON keys Go matches without regard to case (last wins)
        "Config-and-config": craft.replace(oci, "manifest.json", ("[" + json.dumps(entry)[:-1]
                                           + ', "config": "blobs/sha256/' + "0" * 64 + '"}]').encode()),
        "Layers-and-layers": craft.replace(oci, "manifest.json", ("[" + json.dumps(entry)[:-1]
                                           + ', "layers": []}]').encode()),
        "RepoTags-and-repotags": craft.replace(oci, "manifest.json", ("[" + json.dumps(entry)[:-1]
                                               + ', "repotags": ["evil/app:1"]}]').encode()),
        "repoTags-only": craft.replace(oci, "manifest.json", json.dumps(
            [{("repoTags" if k == "RepoTags" else k): v for k, v in entry.items()}]).encode()),
        "config-key-twice-exact": craft.replace(oci, "manifest.json", ("[" + json.dumps(entry)[:-1]
                                                + ', "Config": "evil"}]').encode()),
        "manifests-and-Manifests": craft.replace(oci, "index.json", index_text.rstrip()[:-1].encode()
                                                 + b', "Manifests": []}'),
        "Manifests-only": craft.replace(oci, "index.json", index_text.replace('"manifests"', '"Manifests"').encode()),
        "mediaType-spelled-otherwise": craft.replace(oci, "index.json",
                                                     index_text.replace('"mediaType"', '"MediaType"').encode()),
        "config-rootfs-key-twice": craft.replace(legacy, legacy_entry["Config"], legacy_config.replace(
            b'"rootfs":{', b'"rootfs":{"Diff_ids":[],')),
        "config-deep-key-twice": craft.replace(legacy, legacy_entry["Config"], legacy_config.replace(
            b'"rootfs":{', b'"rootfs":{"TYPE":"x",')),
        "tag-lone-surrogate": craft.replace(oci, "manifest.json", json.dumps(
            [dict(entry, RepoTags=["evil/app\ud800:1"])]).encode()),
        "config-nan": craft.replace(legacy, legacy_entry["Config"], legacy_config.replace(
            b'"rootfs":{', b'"x":NaN,"rootfs":{')),
        # tar headers
        "size-leading-nul": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_size_field(
            layout, b"\0" + b"%010o" % len(layout.data) + b"\0"))),
        "size-underscore": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_size_field(
            layout, b"000_" + b"%07o" % len(layout.data) + b"\0"))),
        "size-garbage-after-nul": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_size_field(
            layout, b"%07o\0" % len(layout.data) + b"123\0"))),
        "ok-size-base256": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_size_field(
            layout, b"\x80" + len(layout.data).to_bytes(11, "big")))),
        "size-base256-negative": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_size_field(
            layout, b"\xff" * 11 + b"\x00"))),
        "size-base256-sign-bit": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_size_field(
            layout, b"\xc0" + len(layout.data).to_bytes(11, "big")))),
        "uid-not-octal": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_field(layout, 108, b"12_4\0"))),
        "mtime-leading-nul": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_field(
            layout, 136, b"\x0000000000001"))),
        "star-header": _edit(oci, lambda ms: _swap(ms, "oci-layout", with_field(layout, 508, b"tar\0"))),
        "gnu-bad-atime-with-prefix": end(oci, raw("x.json", b"{}", magic=b"ustar  \0",
                                                  fields={345: b"zz", 357: b"manifest"})),
        "directory-with-data": end(oci, raw("d/", hidden, b"5")),
        "symlink-with-data": end(oci, raw("s", hidden, b"2", linkname=b"oci-layout")),
        "regA-trailing-slash": end(oci, raw("d2/", b"", b"\0")),
        "old-gnu-sparse": end(oci, raw("sparse", b"x" * 512, b"S", magic=b"ustar  \0")),
        "contiguous-type": end(oci, raw("contig", b"x", b"7")),
        "volume-label": end(oci, raw("vol", b"", b"V", magic=b"ustar  \0")),
        "ok-pax-size-override": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(size=len(layout.data))), with_size_field(layout, b"00000000000\0")))),
        "pax-size-plus": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(size=f"+{len(layout.data)}")), layout))),
        "pax-size-negative": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(size="-1")), layout))),
        "pax-path-empty": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(path="")), layout))),
        "pax-path-nul": end(oci, prefixed(extended(b"x", pax(path=b"evil\0/x")), raw("evil", b"x"))),
        "pax-nul-padding": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(mtime=1) + b"\0" * 20), layout))),
        "pax-bad-uid": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(uid="x1")), layout))),
        "pax-sparse-record": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(**{"GNU.sparse.name": "manifest.json"})), layout))),
        "pax-key-twice": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"x", pax(path="evil") + pax(path="oci-layout")), layout))),
        "pax-header-uid-not-octal": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            with_block_field(extended(b"x", pax(mtime=1)), 108, b"zz\0"), layout))),
        "two-pax-headers": end(oci, prefixed(extended(b"x", pax(path="manifest.json"))
                                             + extended(b"x", pax(mtime=1)), raw("evil.json", evil))),
        "longname-and-pax-path": end(oci, prefixed(extended(b"L", b"manifest.json\0")
                                                   + extended(b"x", pax(path="evil.json")), raw("e", evil))),
        "two-longnames": end(oci, prefixed(extended(b"L", b"evil.json\0") + extended(b"L", b"manifest.json\0"),
                                           raw("e", evil))),
        "longlink-and-pax-linkpath": end(oci, prefixed(extended(b"K", b"oci-layout\0") + extended(
            b"x", pax(linkpath="index.json")), raw("l", b"", b"2"))),
        "global-header-path": start(oci, craft.Raw("", "", 0, extended(b"g", pax(path="manifest.json")), b"", b"")),
        "pax-then-global": end(oci, prefixed(extended(b"x", pax(path="manifest.json"))
                                             + extended(b"g", pax(comment="x")), raw("evil.json", evil))),
        "trailing-garbage": oci + b"garbage",
        "no-end-of-archive": oci[:len(oci) - len(craft.split(oci)[1])],
        # the two indexes of a hybrid archive naming different images
        "index-names-an-image-manifest-json-lacks": craft.replace(two, "manifest.json", json.dumps(
            json.loads(craft.get(two, "manifest.json"))[:1]).encode()),
        "manifest-json-names-an-image-index-lacks": craft.replace(two, "index.json", json.dumps(
            dict(json.loads(craft.get(two, "index.json")),
                 manifests=json.loads(craft.get(two, "index.json"))["manifests"][:1])).encode()),
        "oci-manifest-blob-under-another-name": _edit(oci_two, lambda ms: [
            craft.Raw("moved/" + m.name, "", 0, craft.member("moved/" + m.name, m.data).header, m.data, m.padding)
            if m.name == first_manifest else m for m in ms]),
        "descriptor-media-type-mismatch": craft.replace(oci_two, "index.json", craft.get(oci_two, "index.json").replace(
            b'"application/vnd.oci.image.manifest.v1+json"', b'"application/vnd.oci.image.index.v1+json"', 1)),
        # well-formed neighbours both sides read alike (isep must accept them and agree)
        "ok-global-header-comment": start(oci, craft.Raw("", "", 0, extended(b"g", pax(comment="abc")), b"", b"")),
        "ok-gnu-longlink": _edit(pod, lambda ms: _swap(ms, pod_link.name, prefixed(
            extended(b"K", pod_link.header[157:257].split(b"\0")[0] + b"\0"),
            with_field(pod_link, 157, bytes(100))))),
        "ok-pax-linkpath": _edit(pod, lambda ms: _swap(ms, pod_link.name, prefixed(
            extended(b"x", pax(linkpath=pod_link.header[157:257].split(b"\0")[0])),
            with_field(pod_link, 157, bytes(100))))),
        "ok-gnu-longname": _edit(oci, lambda ms: _swap(ms, "oci-layout", prefixed(
            extended(b"L", b"oci-layout\0"), with_field(layout, 0, bytes(100))))),
        "ok-case-collision": end(oci, craft.member("Manifest.json", b"[]")),
        "ok-repeated-directory": end(oci, craft.member("blobs/", typeflag=b"5")),
    }
    assert tuple(cases) == CASE_NAMES
    digests = {hashlib.sha256(a).hexdigest() for a in cases.values()}
    assert len(digests) == len(cases), "two cases craft the same archive"
    return cases
