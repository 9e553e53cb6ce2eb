"""isep-index on every real archive, and on the generated ones."""
from __future__ import annotations


import pytest

from tests.harness import REAL, REAL_FORMATS, WITH_INSPECT, inspect_layers, isep

REAL_ARCHIVES = sorted((p.parent.name, p.name) for p in REAL.glob("*/*.tar"))


@pytest.mark.parametrize("folder,name", REAL_ARCHIVES, ids=[f"{f}/{n}" for f, n in REAL_ARCHIVES])
def test_real_archive_indexes_with_the_engines_diff_ids_and_tags(folder, name):
    result = isep("index", REAL / folder / name, check=0)
    doc = result.json
    assert doc["schema"] == "isep-index/1"
    assert doc["format"] == REAL_FORMATS[folder]
    assert result.stderr == ""
    images = {tuple(im["tags"]): im for im in doc["images"]}
    stems = name[:-4].split("+")
    assert len(doc["images"]) == len(stems)
    for stem in stems:
        image = next(im for tags, im in images.items() if any(t.endswith(f"/{stem}:1") for t in tags))
        if folder in WITH_INSPECT:
            assert image["diff_ids"] == inspect_layers(folder, stem)
        for layer in image["layers"]:
            member = next(m for m in doc["members"] if m["name"] == layer["member"])
            assert (member.get("diff_id") or member["sha256"]) == layer["diff_id"]
    assert sum(m["raw_size"] for m in doc["members"]) + doc["source"]["trailer_size"] == (REAL / folder / name).stat().st_size


def test_index_from_a_pipe_equals_index_of_the_file():
    path = REAL / "docker-legacy" / "app1.tar"
    from_file = isep("index", path, check=0).json
    from_pipe = isep("index", stdin=path.read_bytes(), check=0).json
    from_file["source"]["name"] = from_pipe["source"]["name"]
    assert from_file == from_pipe


def test_sample_formats_index(samples):
    for fmt, paths in samples.items():
        doc = isep("index", paths["app1+app2"], check=0).json
        assert doc["format"] == fmt
        assert len(doc["images"]) == 2


def test_diff_id_mismatch_is_an_integrity_failure(tmp_path):
    data = bytearray((REAL / "docker-oci" / "base.tar").read_bytes())
    doc = isep("index", REAL / "docker-oci" / "base.tar", check=0).json
    layer = doc["images"][0]["layers"][0]
    member = next(m for m in doc["members"] if m["name"] == layer["member"])
    at = member["offset"] + 512 + member["size"] // 2
    data[at] ^= 0xFF
    result = isep("index", stdin=bytes(data))
    assert result.rc == 5
    assert len(result.error_lines) == 1 and "diffID" in result.error_lines[0]
    assert result.stdout == b""


@pytest.mark.parametrize("payload,code,message", [
    (b"", 4, "empty input"),
    (b"not a tar at all" * 64, 4, "not a tar archive"),
])
def test_bad_input_gives_one_line_and_its_code(payload, code, message):
    result = isep("index", stdin=payload)
    assert result.rc == code and result.stdout == b""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_tar_that_is_not_an_image_archive(tmp_path):
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    result = isep("index", stdin=buf.getvalue())
    assert result.rc == 4 and "not an image archive" in result.stderr


def test_missing_file_is_an_environment_error():
    result = isep("index", "/nonexistent/archive.tar")
    assert result.rc == 3 and "cannot open" in result.stderr


def test_truncated_archive_never_gives_an_index():
    data = (REAL / "podman-docker-archive" / "app1.tar").read_bytes()
    for cut in (100, 512 * 3 + 7, len(data) // 2, len(data) - 1500):
        result = isep("index", stdin=data[:cut])
        assert result.rc == 4 and result.stdout == b"", cut
        assert "truncated" in result.stderr
