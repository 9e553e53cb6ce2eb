"""isula-build's separated layout (`isep-pack --format isula`): from a file and from a pipe, against
isula-build's own bundles, multi-tag images, and the gzip that carries it."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib

import pytest

from tests.harness import ISULA, REAL, Sandbox, run
from isep.digests import OUT_PIECE, Decompressor
from isep.errors import BadInput
from isep.parts import compress_frame

ISULA_FORMAT = ("--format", "isula", "--compress", "gzip")
# isula-build 0.9.6's own separated save of app1:latest (base:latest, lib:latest), tests/data/isula
REAL_ISULA_LAYERS = ["205536eb8b37216b1e954989575956b35dcd54252ecac3bbd72a35b24bccaa91",
                     "4e3036cc10de9fb1bd61ab09decf7908aebb0c072792d3da1b5743d5406aaf8b",
                     "a498b34b6451aad56f02cdd3f845be41a227cb40da95b42bac8957492fdaaf3f"]


def listing(path) -> list[tuple]:
    """(name, type, mode, size, mtime, sha256 of data) of every member of a .tar.gz."""
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isfile() else b""
            out.append((m.name.rstrip("/"), m.type, m.mode, m.size, m.mtime, hashlib.sha256(data).hexdigest()))
    return out


def inspect_json(tmp_path, name: str, diff_ids: list[str]):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps([{"RepoTags": [f"{name}:latest"],
                                 "RootFS": {"Type": "layers", "Layers": ["sha256:" + d for d in diff_ids]}}]))
    return path


def gz_parts(store) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name.endswith(".tar.gz")}


@pytest.mark.parametrize("folder", ["docker-legacy", "docker-oci", "docker-cstore", "podman-docker-archive"])
def test_pipe_and_file_give_the_same_isula_bundle(sb: Sandbox, folder):
    d = REAL / folder
    refs = ("--base", d / "inspect-base.json", "--lib", d / "inspect-lib.json")
    from_file, from_pipe = sb.root / "file", sb.out
    run("pack", d / "app1+app2.tar", *refs, *ISULA_FORMAT, "-o", from_file, sandbox=sb, out=from_file)
    # the sandbox checks that the pipe's pack leaves no temporary file (the app section) anywhere
    run("pack", *refs, *ISULA_FORMAT, "-o", from_pipe, stdin=(d / "app1+app2.tar").read_bytes(), sandbox=sb)
    assert len(gz_parts(from_pipe)) == 4 and gz_parts(from_pipe) == gz_parts(from_file)
    assert (from_pipe / "manifest").read_bytes() == (from_file / "manifest").read_bytes()
    assert run("verify", from_pipe).json["ok"]
    for app in ("app1", "app2"):
        image = json.loads((d / f"inspect-{app}.json").read_text())[0]
        joined = run("join", from_pipe, image["RepoTags"][0]).stdout
        assert run("index", stdin=joined).json["images"][0]["diff_ids"] == image["RootFS"]["Layers"]


def test_pipe_pack_lays_out_what_isula_build_itself_wrote(tmp_path):
    """isula-build's normal save of app1, packed from a pipe, gives isula-build's separated save of it:
    the same members (names, modes, sizes, mtimes, data) in each tarball, the same layer IDs."""
    base = inspect_json(tmp_path, "base", REAL_ISULA_LAYERS[:1])
    lib = inspect_json(tmp_path, "lib", REAL_ISULA_LAYERS)
    store = tmp_path / "s"
    run("pack", "--base", base, "--lib", lib, *ISULA_FORMAT, "-o", store,
         stdin=(ISULA / "app1-normal.tar").read_bytes())
    ours = json.loads((store / "manifest").read_text())["app1:latest"]
    theirs = json.loads((ISULA / "sep-with-lib" / "manifest").read_text())["app1:latest"]
    for key in ("appLayers", "libLayers", "baseLayer"):
        assert ours[key] == theirs[key]
    for role in ("base", "lib", "app"):
        assert sorted(listing(store / ours[role])) == sorted(listing(ISULA / "sep-with-lib" / theirs[role]))


def with_tags(src, dst, tags: list[str]) -> None:
    """A copy of a docker-archive whose image has these RepoTags."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read() if m.isfile() else None
            if m.name == "manifest.json":
                doc = json.loads(data)
                doc[0]["RepoTags"] = tags
                data = json.dumps(doc).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)


def test_every_tag_of_an_image_names_it_in_the_isula_manifest(tmp_path):
    archive = tmp_path / "two-tags.tar"
    with_tags(ISULA / "app1-normal.tar", archive, ["app1:latest", "example.org/app1:v2"])
    base = inspect_json(tmp_path, "base", REAL_ISULA_LAYERS[:1])
    lib = inspect_json(tmp_path, "lib", REAL_ISULA_LAYERS)
    store = tmp_path / "s"
    run("pack", archive, "--base", base, "--lib", lib, *ISULA_FORMAT, "-o", store)
    manifest = json.loads((store / "manifest").read_text())
    assert sorted(manifest) == ["app1:latest", "example.org/app1:v2"]
    assert manifest["app1:latest"] == manifest["example.org/app1:v2"]
    # isula-build loads by `-i <tag>`, an exact key; isep joins by either tag, or with none
    for name in ("example.org/app1:v2", "app1:latest", None):
        joined = run("join", store, *([name] if name else [])).stdout
        assert run("index", stdin=joined).json["images"][0]["tags"] == ["app1:latest", "example.org/app1:v2"]
    assert run("verify", store).json["ok"]
    # the same bundle as isula-build's own (no isep-bundle.json): each tag checked, the tarballs once
    (store / "isep-bundle.json").unlink()
    report = run("verify", store).json
    images = [c for c in report["checks"] if c["check"] == "image"]
    assert report["ok"] and len(images) == 2 and all(c["status"] == "ok" for c in images)
    assert sum("another tag" in c["detail"] for c in images) == 1
    joined = run("join", store, "example.org/app1:v2").stdout
    assert len(run("index", stdin=joined).json["images"][0]["diff_ids"]) == 5


def test_a_manifest_naming_one_image_twice_is_read_as_one(tmp_path):
    """isula-build's reader looks keys up exactly: a bundle whose manifest has an extra key for a tag
    of the same image joins without a name (one image)."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    for p in (ISULA / "sep-no-lib").iterdir():
        (bundle / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((bundle / "manifest").read_text())
    manifest["app1:other"] = manifest["app1:latest"]
    (bundle / "manifest").write_text(json.dumps(manifest))
    joined = run("join", bundle).stdout
    assert len(run("index", stdin=joined).json["images"][0]["diff_ids"]) == 5


# --- gzip ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [1, 2, 3, 6, 9])
def test_gzip_frames_are_standard_gzip_members(level):
    data = os.urandom(1 << 20) + b"text-like " * 300000
    frame = compress_frame("gzip", level, data)
    assert frame[:3] == b"\x1f\x8b\x08" and frame[4:8] == b"\0\0\0\0"  # gzip, deflate, mtime 0
    assert gzip.decompress(frame + frame) == data + data  # members concatenate
    assert zlib.decompress(frame, 16 + zlib.MAX_WBITS) == data


def test_gzip_levels_give_the_same_part_content(tmp_path):
    d = REAL / "docker-oci"
    contents = set()
    for level in (1, 2, 6):
        store = tmp_path / f"l{level}"
        run("pack", d / "app1.tar", "--base", d / "inspect-base.json", "--compress", "gzip",
             "--level", str(level), "-o", store)
        contents.add(tuple(gzip.decompress(p.read_bytes()) for p in sorted(store.glob("*.tar.gz"))))
        assert run("join", store, "isep-test/app1:1").stdout == (d / "app1.tar").read_bytes()
    assert len(contents) == 1


def test_gzip_decompression_output_is_bounded_per_step():
    zeros = gzip.compress(bytes(64 << 20), 9)  # 64 MiB from about 64 KiB
    dec = Decompressor("gzip", "bomb")
    total = 0
    for start in range(0, len(zeros), 1 << 16):
        for piece in dec.feed(zeros[start:start + (1 << 16)]):
            assert len(piece) <= OUT_PIECE
            total += len(piece)
    dec.finish()
    assert total == 64 << 20


def test_corrupt_and_truncated_gzip_are_bad_input():
    good = gzip.compress(os.urandom(100000))
    with pytest.raises(BadInput, match="corrupt gzip"):
        list(Decompressor("gzip", "x").feed(good[:20] + bytes(200) + good[220:]))
    dec = Decompressor("gzip", "x")
    list(dec.feed(good[:len(good) // 2]))
    with pytest.raises(BadInput, match="truncated gzip"):
        dec.finish()


def test_a_truncated_pipe_leaves_nothing_behind(sb: Sandbox):
    d = REAL / "docker-oci"
    data = (d / "app1.tar").read_bytes()
    run("pack", "--base", d / "inspect-base.json", "--lib", d / "inspect-lib.json", *ISULA_FORMAT,
        "-o", sb.out, stdin=data[:len(data) * 3 // 4], sandbox=sb, expect=4)
    assert not sb.out.exists() or not any(sb.out.iterdir())
