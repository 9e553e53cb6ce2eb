"""pack -> verify -> join, on real archives of every producer and on generated ones."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.harness import ISULA, REAL, ROOT, WITH_INSPECT, inspect_layers, isep

NO_INSPECT = ("podman-oci-archive", "skopeo-docker-archive", "skopeo-oci-archive", "umoci-docker-archive")


def refs_for(folder, tmp_path):
    if folder in WITH_INSPECT:
        return REAL / folder / "inspect-base.json", REAL / folder / "inspect-lib.json"
    out = []
    for x in ("base", "lib"):
        path = tmp_path / f"{x}.index.json"
        path.write_bytes(isep("index", REAL / folder / f"{x}.tar", check=0).stdout)
        out.append(path)
    return out


def listing(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


@pytest.mark.parametrize("folder", WITH_INSPECT + NO_INSPECT)
@pytest.mark.parametrize("app", ["app1", "app2"])
@pytest.mark.parametrize("via", ["file", "pipe"])
def test_real_round_trip_is_byte_exact(tmp_path, folder, app, via):
    archive = REAL / folder / f"{app}.tar"
    base, lib = refs_for(folder, tmp_path)
    store = tmp_path / "store"
    if via == "file":
        isep("pack", archive, "--base", base, "--lib", lib, "-o", store, check=0)
    else:
        isep("pack", "--base", base, "--lib", lib, "-o", store, stdin=archive.read_bytes(), check=0)
    doc = json.loads((store / "isep-bundle.json").read_text())
    for part in doc["parts"]:
        data = (store / part["file"]).read_bytes()
        assert len(data) == part["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == part["sha256"]
    roles = {p["role"]: p for p in doc["parts"]}
    # each part holds exactly the members of its layers (and the app part the metadata)
    index = isep("index", archive, check=0).json
    layer_of = {layer["member"]: layer["diff_id"] for im in index["images"] for layer in im["layers"]}
    for role in ("base", "lib"):
        held = {layer_of[m["name"]] for m in roles[role]["members"] if m["name"] in layer_of}
        assert held == set(roles[role]["layers"])
    assert isep("verify", store, check=0).json["ok"] is True
    joined = isep("join", store, check=0).stdout
    assert joined == archive.read_bytes()


@pytest.mark.parametrize("folder", WITH_INSPECT)
def test_real_multi_image_save_joins_each_image(tmp_path, folder):
    store = tmp_path / "store"
    isep("pack", REAL / folder / "app1+app2.tar", "--base", REAL / folder / "inspect-base.json",
         "--lib", REAL / folder / "inspect-lib.json", "-o", store, check=0)
    for app in ("app1", "app2"):
        name = f"isep-test/{app}:1"
        joined = isep("join", store, name, check=0).stdout
        idx = isep("index", stdin=joined, check=0).json
        assert len(idx["images"]) == 1
        assert idx["images"][0]["diff_ids"] == inspect_layers(folder, app)
        assert idx["images"][0]["tags"][0].endswith(f"isep-test/{app}:1")


@pytest.mark.parametrize("fmt", ["docker-legacy", "docker-oci", "docker-cstore", "podman", "oci-archive"])
def test_generated_formats_round_trip(tmp_path, samples, fmt):
    paths = samples[fmt]
    for app in ("app1", "app2"):
        store = tmp_path / f"store-{app}"
        for via_pipe in (False, True):
            if via_pipe:
                shutil.rmtree(store)
                isep("pack", "--base", paths["inspect-base"], "--lib", paths["inspect-lib"], "-o", store,
                     stdin=paths[app].read_bytes(), check=0)
            else:
                isep("pack", paths[app], "--base", paths["inspect-base"], "--lib", paths["inspect-lib"],
                     "-o", store, check=0)
            assert isep("join", store, check=0).stdout == paths[app].read_bytes()


def test_same_input_gives_identical_parts(tmp_path, samples):
    paths = samples["docker-legacy"]
    for n in (1, 2):
        isep("pack", paths["app1"], "--base", paths["inspect-base"], "--lib", paths["inspect-lib"],
             "-o", tmp_path / f"s{n}", check=0)
    a, b = listing(tmp_path / "s1"), listing(tmp_path / "s2")
    assert a == b


@pytest.mark.parametrize("compress", ["gzip", "none"])
def test_other_compressions(tmp_path, compress):
    folder = "docker-oci"
    isep("pack", REAL / folder / "app1.tar", "--base", REAL / folder / "inspect-base.json", "-c", compress,
         "-o", tmp_path / "s", check=0)
    ext = {"gzip": ".tar.gz", "none": ".tar"}[compress]
    assert all(p.name.endswith(ext) for p in (tmp_path / "s").iterdir() if "image" in p.name)
    assert isep("join", tmp_path / "s", check=0).stdout == (REAL / folder / "app1.tar").read_bytes()


def test_second_app_into_a_store_writes_only_its_app_part(tmp_path):
    folder = REAL / "docker-legacy"
    store = tmp_path / "store"
    isep("pack", folder / "app1.tar", "--base", folder / "inspect-base.json", "--lib", folder / "inspect-lib.json",
         "-o", store, check=0)
    before = listing(store)
    isep("pack", folder / "app2.tar", "--base", store, "--lib", store, "-o", store, check=0)
    after = listing(store)
    new = sorted(set(after) - set(before))
    assert new == ["app2_1_app_image.tar.zst"]
    assert all(after[f] == before[f] for f in before if f.endswith(".zst"))
    doc = json.loads((store / "isep-bundle.json").read_text())
    assert sorted(t for im in doc["images"] for t in im["tags"]) == ["isep-test/app1:1", "isep-test/app2:1"]
    assert isep("join", store, "isep-test/app1:1", check=0).stdout == (folder / "app1.tar").read_bytes()
    # app2's base and lib parts come from app1's save (other mtimes): same layers, not the same bytes
    joined = isep("join", store, "isep-test/app2:1", check=0).stdout
    assert isep("index", stdin=joined, check=0).json["images"][0]["diff_ids"] == inspect_layers("docker-legacy", "app2")
    assert [im["byte_exact"] for im in doc["images"]] == [True, False]


def test_two_concurrent_packs_into_one_store(tmp_path, samples):
    paths = samples["docker-oci"]
    store = tmp_path / "store"
    store.mkdir()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bin" / "isep-pack"), str(paths[app]), "--base",
                               str(paths["inspect-base"]), "--lib", str(paths["inspect-lib"]), "-o", str(store)],
                              stderr=subprocess.PIPE) for app in ("app1", "app2")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    doc = json.loads((store / "isep-bundle.json").read_text())
    assert sorted(t for im in doc["images"] for t in im["tags"]) == ["isep-sample/app1:1", "isep-sample/app2:1"]
    assert isep("verify", store, check=0).json["ok"]


def test_release_update_joins_base_from_release_1_with_app_from_release_2(tmp_path, samples):
    paths = samples["docker-legacy"]
    store = tmp_path / "store"
    isep("pack", paths["app1"], "--base", paths["inspect-base"], "--lib", paths["inspect-lib"], "-o", store, check=0)
    isep("pack", paths["app1-2"], "--base", store, "--lib", store, "-o", store, check=0)
    joined = isep("join", store, "isep-sample/app1:2", check=0).stdout
    idx = isep("index", stdin=joined, check=0).json
    want = isep("index", paths["app1-2"], check=0).json
    assert idx["images"][0]["diff_ids"] == want["images"][0]["diff_ids"]
    assert idx["images"][0]["tags"] == ["isep-sample/app1:2"]


@pytest.mark.parametrize("fmt", ["docker-legacy", "docker-oci", "docker-cstore", "podman"])
def test_bundle_stream_of_the_app_part_joins_with_a_store(tmp_path, samples, fmt):
    paths = samples[fmt]
    device = tmp_path / "device"
    isep("pack", paths["app1"], "--base", paths["inspect-base"], "--lib", paths["inspect-lib"], "-o", device,
         "--parts", "base,lib", check=0)
    assert not any(p.name.endswith("_app_image.tar.zst") for p in device.iterdir())
    stream = isep("pack", "--base", paths["inspect-base"], "--lib", paths["inspect-lib"], "-o", "-",
                  "--parts", "app", stdin=paths["app1-2"].read_bytes(), check=0).stdout
    names = tar_names(stream)
    assert names[0] == "isep-stream.json" and names[-1] == "isep-bundle.json"
    assert all("_app_image" in n for n in names if n.startswith("parts/"))
    assert isep("verify", "-", stdin=stream, check=0).json["ok"]
    joined = isep("join", device, "-", stdin=stream, check=0).stdout
    idx = isep("index", stdin=joined, check=0).json
    assert idx["images"][0]["diff_ids"] == isep("index", paths["app1-2"], check=0).json["images"][0]["diff_ids"]
    assert not any(p.name.startswith(".isep-tmp") for p in device.iterdir())


def test_isula_manifest_is_written_with_isula_field_names(tmp_path):
    folder = REAL / "docker-legacy"
    isep("pack", folder / "app1.tar", "--base", folder / "inspect-base.json", "--lib", folder / "inspect-lib.json",
         "-o", tmp_path / "s", check=0)
    text = (tmp_path / "s" / "manifest").read_text()
    doc = json.loads(text)
    entry = doc["isep-test/app1:1"]
    assert list(entry) == ["app", "appHash", "appLayers", "lib", "libHash", "libImageName", "libLayers",
                           "base", "baseHash", "baseImageName", "baseLayer"]
    for key in ("app", "lib", "base"):
        data = (tmp_path / "s" / entry[key]).read_bytes()
        assert entry[key + "Hash"] == hashlib.sha256(data).hexdigest()
    assert "\n" not in text


@pytest.mark.parametrize("bundle,image,layers", [
    ("sep-with-lib", "app1:latest", 5), ("sep-with-lib", "example.org/ns/app2:v2", 4),
    ("sep-no-lib", "app1:latest", 5), ("sep-renamed", "app1:latest", 5), ("sep-renamed", "example.org/ns/app2:v2", 4),
])
def test_isula_build_bundles_join(bundle, image, layers):
    joined = isep("join", ISULA / bundle, image, check=0).stdout
    idx = isep("index", stdin=joined, check=0).json
    assert idx["images"][0]["tags"] == [image] and len(idx["images"][0]["diff_ids"]) == layers
    normal = isep("index", ISULA / "app1-normal.tar", check=0).json
    if image == "app1:latest":
        assert idx["images"][0]["diff_ids"] == normal["images"][0]["diff_ids"]
    assert isep("verify", ISULA / bundle, check=0).json["ok"]


def test_tampered_isula_bundle_is_refused(tmp_path):
    shutil.copytree(ISULA / "sep-with-lib", tmp_path / "b")
    part = tmp_path / "b" / "app1_latest_lib_image.tar.gz"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    result = isep("join", tmp_path / "b", "app1:latest")
    assert result.rc == 5 and "manifest.json" not in tar_names_partial(result.stdout)
    assert isep("verify", tmp_path / "b").rc == 5
    # --no-verify skips the tarball hash, not the layer checks: the damaged gzip still fails
    assert isep("join", tmp_path / "b", "app1:latest", "--no-verify").rc == 5


def tar_names_partial(data: bytes) -> list[str]:
    """Names readable from a possibly incomplete archive."""
    names = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                names.append(member.name)
    except (tarfile.TarError, EOFError):
        pass
    return names


@pytest.fixture
def bundle(tmp_path):
    folder = REAL / "docker-oci"
    store = tmp_path / "store"
    isep("pack", folder / "app1.tar", "--base", folder / "inspect-base.json", "--lib", folder / "inspect-lib.json",
         "-o", store, check=0)
    return store


def _assert_refused(store, part_hint):
    joined = isep("join", store)
    assert joined.rc == 5, joined.stderr
    assert len(joined.error_lines) == 1
    assert "manifest.json" not in tar_names_partial(joined.stdout)
    report = isep("verify", store)
    assert report.rc == 5
    failed = [c for c in report.json["checks"] if c["status"] == "fail"]
    assert failed and any(part_hint in c["detail"] for c in failed), failed


def test_every_bit_flip_region_of_every_part_is_caught(bundle):
    doc = json.loads((bundle / "isep-bundle.json").read_text())
    for part in doc["parts"]:
        path = bundle / part["file"]
        original = path.read_bytes()
        for at in (0, 7, len(original) // 3, len(original) // 2, len(original) - 5):
            data = bytearray(original)
            data[at] ^= 0x10
            path.write_bytes(bytes(data))
            _assert_refused(bundle, part["file"])
        path.write_bytes(original)


def test_truncated_extended_swapped_missing_parts(bundle):
    doc = json.loads((bundle / "isep-bundle.json").read_text())
    base, lib = (bundle / doc["parts"][0]["file"]), (bundle / doc["parts"][1]["file"])
    original_base, original_lib = base.read_bytes(), lib.read_bytes()
    base.write_bytes(original_base[:-100])
    _assert_refused(bundle, base.name)
    base.write_bytes(original_base + b"extra")
    _assert_refused(bundle, base.name)
    base.write_bytes(original_lib)
    lib.write_bytes(original_base)
    _assert_refused(bundle, base.name)
    lib.write_bytes(original_lib)
    base.unlink()
    result = isep("join", bundle)
    assert result.rc == 3 and "cannot open part" in result.stderr
    assert isep("verify", bundle).rc == 5


def test_edited_bundle_manifest_is_caught(bundle):
    path = bundle / "isep-bundle.json"
    doc = json.loads(path.read_text())
    doc["images"][0]["diff_ids"][-1] = "sha256:" + "0" * 64
    path.write_text(json.dumps(doc))
    assert isep("join", bundle).rc == 5
    assert isep("verify", bundle).rc == 5
    path.write_text("{not json")
    result = isep("join", bundle)
    assert result.rc == 4 and len(result.error_lines) == 1


def test_failed_pack_leaves_the_store_exactly_as_before(bundle):
    before = listing(bundle)
    archive = (REAL / "docker-oci" / "app2.tar").read_bytes()
    result = isep("pack", "--base", REAL / "docker-oci" / "inspect-base.json", "-o", bundle,
                  stdin=archive[: len(archive) // 2])
    assert result.rc == 4
    assert listing(bundle) == before
    assert not [p for p in bundle.iterdir() if p.name.startswith(".isep-tmp")]


def test_join_output_file_is_atomic(bundle, tmp_path):
    out = tmp_path / "out.tar"
    isep("join", bundle, "-o", out, check=0)
    assert out.read_bytes() == (REAL / "docker-oci" / "app1.tar").read_bytes()
    part = next(bundle.glob("base_*"))
    part.write_bytes(part.read_bytes()[:-10])
    out2 = tmp_path / "out2.tar"
    assert isep("join", bundle, "-o", out2).rc == 5
    assert not out2.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".isep-tmp")]


def test_app_part_on_stdin_and_explicit_part_files(bundle):
    app = next(bundle.glob("app1_*"))
    original = (REAL / "docker-oci" / "app1.tar").read_bytes()
    assert isep("join", bundle, "-a", "-", stdin=app.read_bytes(), check=0).stdout == original
    base, lib = next(bundle.glob("base_*")), next(bundle.glob("lib_*"))
    assert isep("join", bundle, "-b", base, "-l", lib, check=0).stdout == original
    wrong = isep("join", bundle, "-b", lib)  # the lib part given as the base: refused, named
    assert wrong.rc == 5 and lib.name in wrong.stderr


@pytest.mark.parametrize("folder", WITH_INSPECT)
def test_normalize_writes_a_docker25_archive_with_the_same_layers(tmp_path, folder):
    store = tmp_path / "store"
    isep("pack", REAL / folder / "app1+app2.tar", "--base", REAL / folder / "inspect-base.json",
         "--lib", REAL / folder / "inspect-lib.json", "-o", store, check=0)
    joined = isep("join", store, "isep-test/app2:1", "--normalize", check=0).stdout
    idx = isep("index", stdin=joined, check=0).json
    assert idx["format"] in ("docker-oci", "docker-cstore")
    assert idx["images"][0]["diff_ids"] == inspect_layers(folder, "app2")
    names = tar_names(joined)
    assert "manifest.json" in names and "index.json" in names
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        assert all(m.isfile() or m.isdir() for m in tar.getmembers())
        index = json.loads(tar.extractfile("index.json").read())
    assert len(index["manifests"]) == 1
