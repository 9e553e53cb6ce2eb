"""Tests for isep.samples: synthetic archives must look like the real producers' ones."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import re
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isep import samples
from isep.samples import FORMATS, Image, Layer
from tests.harness import SAMPLE_LAYER_KIB

REAL = Path(__file__).parent / "data" / "real"
REAL_DIR = {
    "docker-legacy": "docker-legacy",
    "docker-oci": "docker-oci",
    "docker-cstore": "docker-cstore",
    "podman": "podman-docker-archive",
    "oci-archive": "podman-oci-archive",
}
HEX = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- helpers

def raw_headers(data: bytes):
    """[(name, typeflag, mode, mtime, uname)] from the raw ustar headers (PAX aware
    enough for our archives), plus the number of trailing bytes after the last member."""
    off, out = 0, []
    while off + 512 <= len(data):
        h = data[off:off + 512]
        if h == bytes(512):
            return out, len(data) - off
        size = int(h[124:136].strip(b"\0 ") or b"0", 8)
        name = h[:100].rstrip(b"\0").decode()
        prefix = h[345:500].rstrip(b"\0").decode()
        if prefix:
            name = prefix + "/" + name
        out.append((name, h[156:157].decode(), int(h[100:108].strip(b"\0 ") or b"0", 8),
                    int(h[136:148].strip(b"\0 ") or b"0", 8), h[265:297].rstrip(b"\0").decode()))
        off += 512 + (-(-size // 512)) * 512
    return out, 0


def pattern(name: str) -> str:
    return HEX.sub("<h>", name)


def blob_sha(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_layers_match_configs(path: Path) -> int:
    """Every layer referenced by manifest.json / the OCI index hashes (decompressed) to
    the config's diff_ids. Returns the number of images checked."""
    t = tarfile.open(fileobj=path) if isinstance(path, io.BytesIO) else tarfile.open(path)
    with t:
        names = set(t.getnames())

        def read(name):
            m = t.getmember(name)
            while m.issym():  # one level in practice (legacy dirs, podman v1 dirs)
                name = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
                m = t.getmember(name)
            return t.extractfile(m).read()

        n = 0
        if "manifest.json" in names:
            for ent in json.loads(read("manifest.json")):
                cfg = json.loads(read(ent["Config"]))
                got = [blob_sha(read(p)) for p in ent["Layers"]]
                assert got == cfg["rootfs"]["diff_ids"], path
                n += 1
        if "index.json" in names:
            def manifests(desc):
                b = read("blobs/sha256/" + desc["digest"][7:])
                assert "sha256:" + hashlib.sha256(b).hexdigest() == desc["digest"]
                assert len(b) == desc["size"]
                doc = json.loads(b)
                if "manifests" in doc:
                    for d in doc["manifests"]:
                        if d.get("platform", {}).get("os") == "unknown":
                            continue
                        yield from manifests(d)
                else:
                    yield doc
            k = 0
            for desc in json.loads(read("index.json"))["manifests"]:
                for man in manifests(desc):
                    cfg = json.loads(read("blobs/sha256/" + man["config"]["digest"][7:]))
                    got = []
                    for l in man["layers"]:
                        b = read("blobs/sha256/" + l["digest"][7:])
                        assert len(b) == l["size"]
                        assert "sha256:" + hashlib.sha256(b).hexdigest() == l["digest"]
                        got.append(blob_sha(b))
                    assert got == cfg["rootfs"]["diff_ids"]
                    k += 1
            n = max(n, k)
        return n


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sample_sets(samples):  # noqa: F811 - the session's sets (tests/conftest.py), not isep.samples
    return samples


# ----------------------------------------------------------------------------- tests

def test_sample_images_structure():
    im = samples.sample_images(seed=0, layer_kib=8)
    ids = {k: samples.diff_ids(v) for k, v in im.items()}
    assert len(ids["base"]) == 2 and len(ids["lib"]) == 4
    assert ids["lib"][:2] == ids["base"]
    for app in ("app1", "app2", "app1-2"):
        assert ids[app][:4] == ids["lib"]
    assert len(ids["app2"]) == 6
    # app1: the BuildKit empty layer, twice in one image
    assert ids["app1"].count(samples.EMPTY_LAYER_DIFFID) == 2
    assert im["app1"].layers[-1].tar_bytes() == bytes(1024)
    # app1-2: same base/lib, different app content, same shape
    assert ids["app1-2"][:4] == ids["app1"][:4] and ids["app1-2"][4] != ids["app1"][4]
    assert len(ids["app1-2"]) == len(ids["app1"])
    # app2's last layer whites out a base file
    with tarfile.open(fileobj=io.BytesIO(im["app2"].layers[-1].tar_bytes())) as t:
        wh = [n for n in t.getnames() if "/.wh." in "/" + n]
    assert "etc/.wh.base-remove-me.txt" in wh and any(n.endswith(".wh..wh..opq") for n in wh)
    with tarfile.open(fileobj=io.BytesIO(im["base"].layers[0].tar_bytes())) as t:
        assert "./etc/base-remove-me.txt" in t.getnames()
        kinds = {m.type for m in t.getmembers()}
    assert {tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.REGTYPE, tarfile.DIRTYPE} <= kinds
    # a name over 100 bytes, written as a PAX path record
    with tarfile.open(fileobj=io.BytesIO(im["lib"].layers[2].tar_bytes())) as t:
        long = [m for m in t.getmembers() if len(m.name) > 100]
    assert long and all("path" in m.pax_headers for m in long if len(m.name.rpartition("/")[2]) > 100)
    # history: base's history is a prefix of lib's, lib's of the apps'
    hist = {k: json.loads(samples.config_bytes(v))["history"] for k, v in im.items()}
    assert hist["lib"][:len(hist["base"])] == hist["base"]
    assert hist["app2"][:len(hist["lib"])] == hist["lib"]
    for k, v in hist.items():
        assert sum(not h.get("empty_layer") for h in v) == len(ids[k])


@pytest.mark.parametrize("fmt", FORMATS)
def test_readable_and_diffids(sample_sets, fmt):
    out = sample_sets[fmt]
    assert set(out) == {"base", "lib", "app1", "app2", "app1-2", "app1+app2",
                        "inspect-base", "inspect-lib", "inspect-app1", "inspect-app2", "inspect-app1-2"}
    im = samples.sample_images(seed=0, layer_kib=SAMPLE_LAYER_KIB)
    for key in ("base", "lib", "app1", "app2", "app1-2", "app1+app2"):
        with tarfile.open(out[key]) as t:
            assert t.getmembers()
        assert check_layers_match_configs(out[key]) == (2 if key == "app1+app2" else 1)
    for key in ("base", "lib", "app1", "app2", "app1-2"):
        ins = json.loads(out[f"inspect-{key}"].read_text())[0]
        assert ins["RootFS"]["Layers"] == samples.diff_ids(im[key])
        assert ins["RepoTags"] == [im[key].name]
        if fmt != "docker-cstore":
            assert ins["Id"] == samples.config_digest(im[key])


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_matches_real_producer(sample_sets, fmt):
    real = (REAL / REAL_DIR[fmt] / "app1.tar").read_bytes()
    ours = sample_sets[fmt]["app1"].read_bytes()
    rh, rtail = raw_headers(real)
    oh, otail = raw_headers(ours)
    # Go archive/tar: exactly two zero blocks, no record padding
    assert rtail == otail == 1024
    # same member-name patterns
    assert {pattern(h[0]) for h in rh} == {pattern(h[0]) for h in oh}

    def props(hs, skip_symlinks):
        return {(pattern(n), t, m, u) for n, t, m, mt, u in hs if not (skip_symlinks and t == "2")}
    sym = fmt == "docker-legacy"  # real legacy app1 has no repeated diffID, ours has
    assert props(rh, sym) == props(oh, sym)

    # mtime rule per name pattern: all zero / all non-zero / mixed
    def mrule(hs):
        d = {}
        for n, t, m, mt, u in hs:
            d.setdefault(pattern(n), set()).add(mt == 0)
        return d
    assert mrule(rh) == mrule(oh)

    # order
    names = [h[0] for h in oh]
    if fmt == "podman":
        def first_seen(hs):
            seen = []
            for h in hs:
                if pattern(h[0]) not in seen:
                    seen.append(pattern(h[0]))
            return seen
        assert first_seen(rh) == first_seen(oh)
        assert names[-2:] == ["manifest.json", "repositories"]
        n_layers = len(samples.sample_images(layer_kib=SAMPLE_LAYER_KIB)["app1"].layers)
        assert all(n.endswith(".tar") for n in names[:n_layers - 1])  # distinct diffIDs first
    else:
        assert names == sorted(names, key=lambda n: n.rstrip("/").split("/"))


def test_docker_and_podman_v1_ids_match_real_archives():
    for d in ("docker-legacy", "docker-oci", "podman-docker-archive"):
        for key in ("base", "lib", "app1", "app2"):
            with tarfile.open(REAL / d / f"{key}.tar") as t:
                ent = json.loads(t.extractfile("manifest.json").read())[0]
                cfg = json.loads(t.extractfile(ent["Config"]).read())
                if d == "docker-legacy":
                    v1 = samples.docker_v1_from_config(cfg)
                    assert [p.split("/")[0] for p in ent["Layers"]] == [a for a, _ in v1]
                    assert all(t.extractfile(f"{a}/json").read() == js for a, js in v1)
                elif d == "docker-oci":
                    names = set(t.getnames())
                    assert all(f"blobs/sha256/{hashlib.sha256(js).hexdigest()}" in names
                               for _, js in samples.docker_v1_from_config(cfg))
                else:
                    v1 = samples.podman_v1_from_config(cfg)
                    assert all(t.extractfile(f"{a}/json").read() == js for a, js in v1)


def test_json_details_like_real(sample_sets):
    with tarfile.open(sample_sets["docker-oci"]["app1"]) as t:
        assert t.extractfile("oci-layout").read() == b'{"imageLayoutVersion": "1.0.0"}'
        idx = json.loads(t.extractfile("index.json").read())
        ann = idx["manifests"][0]["annotations"]
        assert ann == {"io.containerd.image.name": "docker.io/isep-sample/app1:1",
                       "org.opencontainers.image.ref.name": "1"}
        mj = t.extractfile("manifest.json").read()
        assert mj.endswith(b"]\n") and "LayerSources" in json.loads(mj)[0]
        repos = json.loads(t.extractfile("repositories").read())
        assert repos == {"isep-sample/app1": {"1": samples.EMPTY_LAYER_DIFFID[7:]}}
    with tarfile.open(sample_sets["docker-cstore"]["app1"]) as t:
        assert t.extractfile("oci-layout").read() == b'{"imageLayoutVersion":"1.0.0"}'
        assert "repositories" not in t.getnames()
        idx = json.loads(t.extractfile("index.json").read())
        assert idx["manifests"][0]["mediaType"] == samples.MT_OCI_INDEX
        ent = json.loads(t.extractfile("manifest.json").read())[0]
        assert set(ent) == {"Config", "RepoTags", "Layers"}
        assert "blobs/sha256/4f4fb700ef54461cfa02571ae0db9a0dc1e0cdb5577484a6d75e68dc38e8acc1" in ent["Layers"]
    with tarfile.open(sample_sets["podman"]["app1"]) as t:
        ent = json.loads(t.extractfile("manifest.json").read())[0]
        assert ent["RepoTags"] == ["docker.io/isep-sample/app1:1"]
        links = [m for m in t.getmembers() if m.issym()]
        assert links and all(re.fullmatch(r"\.\./[0-9a-f]{64}\.tar", m.linkname) for m in links)
    with tarfile.open(sample_sets["oci-archive"]["app1"]) as t:
        assert "manifest.json" not in t.getnames()
        idx = json.loads(t.extractfile("index.json").read())
        assert idx["manifests"][0]["annotations"] == {
            "org.opencontainers.image.ref.name": "docker.io/isep-sample/app1:1"}
    with tarfile.open(sample_sets["docker-legacy"]["app1"]) as t:
        links = [m for m in t.getmembers() if m.issym()]
        assert len(links) == 1 and re.fullmatch(r"\.\./[0-9a-f]{64}/layer\.tar", links[0].linkname)


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic(fmt):
    def render(seed):
        buf = io.BytesIO()
        im = samples.sample_images(seed=seed, layer_kib=4)
        samples.write_archive(buf, fmt, [im["app1"], im["app2"]])
        return buf.getvalue()
    a, b = render(0), render(0)
    assert a == b
    assert render(1) != a


def test_shared_layers_stored_once(sample_sets):
    for fmt in ("docker-oci", "docker-cstore", "podman", "oci-archive"):
        with tarfile.open(sample_sets[fmt]["app1+app2"]) as t:
            names = [m.name for m in t.getmembers() if m.isfile()]
        assert len(names) == len(set(names))
        layer_files = [n for n in names if n.endswith(".tar") or n.startswith("blobs/")]
        assert len(layer_files) == len(set(layer_files))
    with tarfile.open(sample_sets["docker-legacy"]["app1+app2"]) as t:
        regular = [m for m in t.getmembers() if m.isfile() and m.name.endswith("/layer.tar")]
    im = samples.sample_images(layer_kib=SAMPLE_LAYER_KIB)
    assert len(regular) == len(set(samples.diff_ids(im["app1"])) | set(samples.diff_ids(im["app2"])))


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=40).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh."))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.dictionaries(st.lists(_name, min_size=1, max_size=5).map("/".join),
                             st.binary(max_size=3000), max_size=6),
       fmt=st.sampled_from(FORMATS))
def test_hypothesis_arbitrary_layers(files, fmt):
    # drop paths that are also a parent directory of another path
    paths = sorted(files)
    files = {p: v for p, v in files.items() if not any(q.startswith(p + "/") for q in paths)}
    layer = Layer(files=sorted(files.items()))
    img = Image("hyp/test:1", [Layer(files=[("a", b"x")]), layer])
    buf = io.BytesIO()
    samples.write_archive(buf, fmt, [img])
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.getmembers()
    with tarfile.open(fileobj=io.BytesIO(layer.tar_bytes())) as lt:
        got = {m.name: lt.extractfile(m).read() for m in lt.getmembers() if m.isfile()}
    assert got == files
    assert check_layers_match_configs(_tmpfile(data)) == 1


@pytest.mark.parametrize("name_len", [99, 100, 101, 150, 254, 300])
def test_long_names_pax_like_go(name_len):
    name = ("d" * 60 + "/" + "f" * 200)[:name_len] if name_len > 100 else "f" * name_len
    if name.endswith("/"):
        name = name[:-1] + "g"
    hdr = samples.tar_header(name, 5, 0o644, 0)
    data = hdr + b"hello" + bytes(507) + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        (m,) = t.getmembers()
    assert m.name == name
    leaf = name.rpartition("/")[2]
    if len(name) > 100 and len(leaf) > 100:
        assert hdr[156:157] == b"x" and b"PaxHeaders.0" in hdr[:100]
    elif len(name) > 100:
        assert hdr[156:157] == b"0" and hdr[345:500].rstrip(b"\0")  # ustar prefix split


def test_big_image_lazy_diffids():
    fam = samples.big_image_family(6 << 20, random_fraction=0.5, layers=3, seed=3)
    img = fam["app"]
    assert [l.lazy is not None for l in img.layers] == [True] * 3
    assert samples.diff_ids(fam["base"]) == samples.diff_ids(img)[:len(fam["base"].layers)]
    buf = io.BytesIO()
    samples.write_archive(buf, "docker-oci", [img])
    assert check_layers_match_configs(_tmpfile(buf.getvalue())) == 1
    for l in img.layers:
        assert sum(len(c) for c in l.iter_tar()) == l.tar_size()
        assert max(len(c) for c in l.iter_tar()) <= 1 << 20
    # compressible vs random parts
    with tarfile.open(fileobj=io.BytesIO(b"".join(img.layers[0].iter_tar()))) as t:
        kinds = {m.name.rsplit(".", 1)[-1] for m in t.getmembers() if m.isfile()}
    assert kinds == {"bin", "txt"}


def test_big_image_gzip_format_small():
    img = samples.big_image(2 << 20, layers=2, seed=1)
    buf = io.BytesIO()
    samples.write_archive(buf, "oci-archive", [img])
    assert check_layers_match_configs(_tmpfile(buf.getvalue())) == 1


def _tmpfile(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


class _Sink:
    def __init__(self):
        self.n = 0
        self.head = bytearray()
        self.tail = b""

    def write(self, b):
        if len(self.head) < 4096:
            self.head += bytes(b[:4096 - len(self.head)])
        self.n += len(b)
        self.tail = (self.tail + bytes(b[-2048:]))[-2048:]
        return len(b)


def test_huge_member_archive_pax_size():
    size = (8 << 30) + 12345
    s = _Sink()
    samples.write_huge_member_archive(s, size)
    assert s.n % 512 == 0
    x = s.head[:512]
    assert x[156:157] == b"x"
    plen = int(x[124:136].strip(b"\0 "), 8)
    recs = bytes(s.head[512:512 + plen]).decode()
    assert f"size={size}\n" in recs
    main = s.head[512 + (-(-plen // 512)) * 512:][:512]
    assert main[156:157] == b"0" and main[124:136] == b"00000000000\0"
    assert s.tail[-1024:] == bytes(1024)
    assert s.n == 512 + (-(-plen // 512)) * 512 + 512 + size + (-size % 512) + 1024
    # a small one, fully parsed
    buf = io.BytesIO()
    samples.write_huge_member_archive(buf, (3 << 20) + 5, pattern=b"abc")
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        (m,) = t.getmembers()
        assert m.size == (3 << 20) + 5
        assert t.extractfile(m).read(6) == b"abcabc"
