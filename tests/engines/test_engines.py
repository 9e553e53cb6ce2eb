"""Real-engine tier: isep-pack / isep-verify / isep-join against archives made by
real engines, and loads of the joined archives into real engines.

Run: bash tests/engines/engines.sh install start && python -m pytest -m engines tests/engines
See README.md beside this file.
"""
from __future__ import annotations

import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


lib = sys.modules["isep_engines_lib"]  # loaded by this directory's conftest.py, which pytest imports first
cell, run, tail, isep_cmd, isep_env = lib.cell, lib.run, lib.tail, lib.isep_cmd, lib.isep_env
REPO, WORK = lib.REPO, lib.WORK

pytestmark = pytest.mark.engines

TIMEOUT = 300

# producer dir (in the engines.sh build OUTDIR) -> archives it has
ALL_ARCHIVES = ["app1", "app2", "app1-2", "app1+app2"]
PRODUCERS = {
    "docker-legacy": ALL_ARCHIVES,            # dockerd 20.10, legacy save format
    "docker-oci": ALL_ARCHIVES,               # dockerd 26, OCI layout + manifest.json
    "docker-cstore": ALL_ARCHIVES,            # dockerd 28, containerd image store
    "podman-docker-archive": ALL_ARCHIVES,    # podman save --format docker-archive (-m)
    "podman-oci-archive": ["app1", "app2", "app1-2"],   # pure OCI archive (no multi-image)
    "umoci": ["app1", "app2", "app1-2"],      # umoci layout -> skopeo docker-archive; app2 has a whiteout
}
# the engine holding each producer's images (release update / ssh target)
TARGET = {"docker-legacy": "legacy", "docker-oci": "oci", "docker-cstore": "cstore",
          "podman-docker-archive": "podman", "podman-oci-archive": "podman", "umoci": "legacy"}
IMAGES_IN = {"app1": ["app1"], "app2": ["app2"], "app1-2": ["app1-2"], "app1+app2": ["app1", "app2"]}
IMG_REF = {"base": "isep-test/base:1", "lib": "isep-test/lib:1", "app1": "isep-test/app1:1",
           "app2": "isep-test/app2:1", "app1-2": "isep-test/app1:2"}
LOADERS = ["legacy", "oci", "cstore", "podman", "ctr"]
CASES = [(p, a) for p, archives in PRODUCERS.items() for a in archives]
ISULA_DIR = REPO / "tests" / "data" / "isula"
ISULA_BUNDLES = ["sep-with-lib", "sep-no-lib", "sep-renamed"]


# --------------------------------------------------------------- helpers
def norm(tag: str) -> str:
    """Engine-independent image name: podman says localhost/..., containerd docker.io/..."""
    for p in ("docker.io/library/", "docker.io/", "localhost/"):
        if tag.startswith(p):
            return tag[len(p):]
    return tag


def cmdline(argv) -> str:
    return shlex.join(str(a) for a in argv)


def verify_and_join(store: Path, tag: str, joined: Path) -> None:
    """isep-verify STORE must pass, then isep-join STORE TAG > joined must succeed."""
    r = run(isep_cmd("verify") + [str(store)], env=isep_env(), timeout=TIMEOUT)
    assert r.returncode == 0, f"isep-verify {store} rc={r.returncode}: {tail(r.stdout, 6)} {tail(r.stderr, 4)}"
    r = run_to_file(isep_cmd("join") + [str(store), tag], joined, env=isep_env())
    assert r.returncode == 0, f"isep-join {store} {tag} rc={r.returncode}: {tail(r.stderr, 1)}\n{tail(r.stderr, 8)}"


def ref_file(engines, producer: str, key: str) -> Path:
    d = engines.out / producer
    for f in (d / f"inspect-{key}.json", d / f"config-{key}.json"):
        if f.exists():
            return f
    raise AssertionError(f"no inspect/config JSON for {key} in {d}")


def expected(engines, producer: str, key: str) -> tuple[str, list[str]]:
    """(tag as the producer wrote it, RootFS.Layers) of image KEY."""
    d = engines.out / producer
    f = d / f"inspect-{key}.json"
    if f.exists():
        j = json.loads(f.read_text())[0]
        return j["RepoTags"][0], list(j["RootFS"]["Layers"])
    c = json.loads((d / f"config-{key}.json").read_text())
    tag = IMG_REF[key]
    try:   # the tag as written into the producer's own save of KEY (skopeo: docker.io/...)
        with tarfile.open(d / f"{key}.tar") as t:
            tag = json.load(t.extractfile("manifest.json"))[0]["RepoTags"][0]
    except (OSError, KeyError, IndexError, tarfile.TarError, ValueError):
        pass
    return tag, list(c["rootfs"]["diff_ids"])


def archive_path(engines, producer: str, archive: str) -> Path:
    p = engines.out / producer / f"{archive}.tar"
    assert p.exists(), f"{p} was not built by engines.sh build"
    return p


def pack_args(engines, producer: str) -> list[str]:
    return ["--base", str(ref_file(engines, producer, "base")),
            "--lib", str(ref_file(engines, producer, "lib"))]


def run_to_file(argv, path: Path, *, env=None, stdin=None, timeout=TIMEOUT):
    e = dict(os.environ)
    e.update(env or {})
    with open(path, "wb") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.PIPE, env=e, timeout=timeout,
                           stdin=stdin if stdin is not None else subprocess.DEVNULL)
    return r


@dataclass
class PipeResult:
    argv1: list
    argv2: list
    rc1: int
    err1: bytes
    rc2: int
    out2: bytes
    err2: bytes

    def describe(self) -> str:
        return (f"$ {cmdline(self.argv1)} | {cmdline(self.argv2)}\n"
                f"left rc={self.rc1}: {tail(self.err1, 8)}\nright rc={self.rc2}: "
                f"{tail(self.err2, 8)} {tail(self.out2, 4)}")


def pipe(argv1, argv2, *, env1=None, env2=None, stdin=None, timeout=TIMEOUT) -> PipeResult:
    """argv1 | argv2 through a real OS pipe."""
    e1 = dict(os.environ, **(env1 or {}))
    e2 = dict(os.environ, **(env2 or {}))
    with tempfile.TemporaryFile() as f1, tempfile.TemporaryFile() as f2:
        p1 = subprocess.Popen(argv1, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=f1, env=e1)
        p2 = subprocess.Popen(argv2, stdin=p1.stdout, stdout=subprocess.PIPE, stderr=f2, env=e2)
        p1.stdout.close()
        try:
            out2, _ = p2.communicate(timeout=timeout)
            rc1 = p1.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p1.kill()
            p2.kill()
            p1.wait()
            p2.wait()
            raise AssertionError(f"timeout after {timeout}s: {cmdline(argv1)} | {cmdline(argv2)}")
        f1.seek(0)
        f2.seek(0)
        return PipeResult(list(argv1), list(argv2), rc1, f1.read(), p2.returncode, out2, f2.read())


def first_difference(a: Path, b: Path) -> str:
    sa, sb = a.stat().st_size, b.stat().st_size
    off = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 16), fb.read(1 << 16)
            if x != y:
                n = min(len(x), len(y))
                i = next((k for k in range(n) if x[k] != y[k]), n)
                off += i
                break
            if not x:
                break
            off += len(x)
    members = ""
    try:
        with tarfile.open(a) as ta, tarfile.open(b) as tb:
            ma = [(m.name, m.size, m.mode, m.mtime, m.type) for m in ta.getmembers()]
            mb = [(m.name, m.size, m.mode, m.mtime, m.type) for m in tb.getmembers()]
        if ma != mb:
            only_a = [m for m in ma if m not in mb][:5]
            only_b = [m for m in mb if m not in ma][:5]
            members = f"; members only in original: {only_a}; only in joined: {only_b}"
        else:
            members = "; same member list (name,size,mode,mtime,type): content/padding differs"
    except (tarfile.TarError, OSError) as e:
        members = f"; joined is not a readable tar: {e}"
    return f"sizes original={sa} joined={sb}, first differing byte at offset {off}{members}"


# --------------------------------------------------------------- bundles
_BUNDLES: dict[tuple[str, str], Path | str] = {}


def bundle_for(engines, producer: str, archive: str) -> Path:
    """isep-pack the producer's save into a bundle dir and isep-verify it (cached)."""
    key = (producer, archive)
    if key not in _BUNDLES:
        try:
            _BUNDLES[key] = _make_bundle(engines, producer, archive)
        except AssertionError as e:
            _BUNDLES[key] = str(e)
    v = _BUNDLES[key]
    if isinstance(v, str):
        raise AssertionError(v)
    return v


def _make_bundle(engines, producer, archive) -> Path:
    src = archive_path(engines, producer, archive)
    b = engines.tmp / "bundles" / f"{producer}--{archive}"
    shutil.rmtree(b, ignore_errors=True)
    b.parent.mkdir(parents=True, exist_ok=True)
    argv = isep_cmd("pack") + [str(src)] + pack_args(engines, producer) + ["-o", str(b)]
    r = run(argv, env=isep_env(), timeout=TIMEOUT)
    assert r.returncode == 0, f"isep-pack rc={r.returncode}: {tail(r.stderr, 1)}\n{tail(r.stderr, 8)}\n$ {cmdline(argv)}"
    argv = isep_cmd("verify") + [str(b)]
    r = run(argv, env=isep_env(), timeout=TIMEOUT)
    assert r.returncode == 0, (f"isep-verify rc={r.returncode}: {tail(r.stdout, 10)} {tail(r.stderr, 1)}\n{tail(r.stderr, 8)}\n"
                               f"$ {cmdline(argv)}")
    try:
        json.loads(r.stdout)
    except ValueError as e:
        raise AssertionError(f"isep-verify stdout is not JSON ({e}): {r.stdout[:300]!r}")
    return b


# --------------------------------------------------------------- loaders
def remove_images(engines, loader: str, tags: list[str]) -> None:
    if loader in ("legacy", "oci", "cstore"):
        for t in tags:
            engines.docker(loader, "rmi", "-f", norm(t), timeout=120)
    elif loader == "podman":
        names = []
        for t in tags:
            n = norm(t)
            names += [n, "docker.io/" + n, "localhost/" + n]
        engines.podman("rmi", "-f", "--ignore", *dict.fromkeys(names), timeout=120)
    elif loader == "ctr":
        r = engines.ctr("images", "ls", "-q", timeout=60)
        names = r.stdout.decode().split()
        if names:
            # --sync: wait for containerd's GC, or a following import may find a
            # parent snapshot collected under its feet ("parent snapshot ... does not exist")
            engines.ctr("images", "rm", "--sync", *names, timeout=120)
    else:
        raise ValueError(loader)


def _ctr_images(engines) -> dict[str, str]:
    r = engines.ctr("images", "ls", timeout=60)
    assert r.returncode == 0, f"ctr images ls: {tail(r.stderr)}"
    imgs = {}
    for line in r.stdout.decode().splitlines()[1:]:
        f = line.split()
        if len(f) >= 3:
            imgs[f[0]] = f[2]
    return imgs


def _ctr_json(engines, digest: str) -> dict:
    r = engines.ctr("content", "get", digest, timeout=60)
    assert r.returncode == 0, f"ctr content get {digest}: {tail(r.stderr)}"
    return json.loads(r.stdout)


def ctr_diff_ids(engines, digest: str) -> list[str]:
    m = _ctr_json(engines, digest)
    if "manifests" in m:   # image index: the linux/amd64 image manifest
        cands = [d for d in m["manifests"]
                 if (d.get("platform") or {}).get("architecture") == "amd64"
                 and (d.get("platform") or {}).get("os") == "linux"]
        if not cands:
            cands = [d for d in m["manifests"]
                     if "attestation" not in json.dumps(d.get("annotations") or {})]
        assert cands, f"no linux/amd64 manifest in index {digest}"
        return ctr_diff_ids(engines, cands[0]["digest"])
    return list(_ctr_json(engines, m["config"]["digest"])["rootfs"]["diff_ids"])


def loaded_names(output: bytes) -> list[str]:
    names = []
    for line in output.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("Loaded image"):
            rest = line.split(":", 1)[1]
            names += [n.strip() for n in rest.split(",") if n.strip()]
        elif line.startswith("unpacking "):      # ctr: unpacking NAME (sha256:...)...done
            names.append(line.split()[1])
    return names


def check_loaded(engines, loader: str, exp: list[tuple[str, list[str]]], load_out: bytes) -> None:
    """Each expected (tag, layers) is present in LOADER under its (normalised) tag."""
    for tag, layers in exp:
        want = norm(tag)
        if loader in ("legacy", "oci", "cstore"):
            r = engines.docker(loader, "image", "inspect", want, timeout=60)
            assert r.returncode == 0, (f"{loader}: image {want} not found after load "
                                       f"(load said: {tail(load_out, 4)}): {tail(r.stderr, 2)}")
            j = json.loads(r.stdout)[0]
            tags = [norm(t) for t in j.get("RepoTags") or []]
            got = j["RootFS"]["Layers"]
        elif loader == "podman":
            cands = [n for n in loaded_names(load_out) if norm(n) == want]
            assert cands, f"podman did not report {want} as loaded: {tail(load_out, 6)}"
            r = engines.podman("image", "inspect", cands[0], timeout=60)
            assert r.returncode == 0, f"podman inspect {cands[0]}: {tail(r.stderr, 2)}"
            j = json.loads(r.stdout)[0]
            tags = [norm(t) for t in j.get("RepoTags") or []]
            got = j["RootFS"]["Layers"]
        elif loader == "ctr":
            imgs = _ctr_images(engines)
            cands = [n for n in imgs if norm(n) == want]
            assert cands, f"ctr: {want} not among imported images {sorted(imgs)}"
            tags = [want]
            got = ctr_diff_ids(engines, imgs[cands[0]])
        else:
            raise ValueError(loader)
        assert want in tags, f"{loader}: tag {want} not in loaded RepoTags {tags}"
        assert got == layers, (f"{loader}: {want} RootFS.Layers differ: loaded "
                               f"{[x[7:19] for x in got]} expected {[x[7:19] for x in layers]}")


def load_joined(engines, join_argv: list[str], loader: str, exp, original: Path | None):
    """isep-join ... | LOADER load, then check tags/layers.  If the loader rejects
    the joined archive, try the original save: rejected too -> xfail (engine limit)."""
    remove_images(engines, loader, [t for t, _ in exp])
    res = pipe(join_argv, engines.loader_argv(loader), env1=isep_env())
    assert res.rc1 == 0, f"isep-join rc={res.rc1}: {tail(res.err1, 1)}\n" + res.describe()
    if res.rc2 != 0:
        msg = tail(res.err2 or res.out2, 1)
        if original is not None:
            remove_images(engines, loader, [t for t, _ in exp])
            with open(original, "rb") as f:
                r = run(engines.loader_argv(loader), input=f.read(), timeout=TIMEOUT)
            if r.returncode != 0:
                pytest.xfail(f"{loader} rejects the original save too: {tail(r.stderr or r.stdout, 1)}")
            raise AssertionError(f"{loader} rejects the joined archive but loads the original: {msg}\n"
                                 + res.describe())
        raise AssertionError(f"{loader} load failed: {msg}\n" + res.describe())
    check_loaded(engines, loader, exp, res.out2)


def _cp_member(engines, engine: str, cid: str, path: str):
    """docker cp CID:PATH - -> (TarInfo, bytes|None) or None if the path does not exist."""
    r = engines.docker(engine, "cp", f"{cid}:{path}", "-", timeout=60)
    if r.returncode != 0:
        return None
    import io
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as t:
        m = t.getmembers()[0]
        data = t.extractfile(m).read() if m.isfile() else None
    return m, data


def check_fs(engines, engine: str, ref: str, whiteout_expected: bool) -> None:
    """Files of the loaded image, through a created (never started) container: the
    base's hardlink and symlink survive, and a whiteout hides the deleted base file."""
    r = engines.docker(engine, "create", norm(ref), timeout=60)
    assert r.returncode == 0, f"{engine}: docker create {norm(ref)}: {tail(r.stderr, 1)}"
    cid = r.stdout.decode().strip()
    try:
        readme = _cp_member(engines, engine, cid, "/usr/share/isep/base/README.txt")
        hard = _cp_member(engines, engine, cid, "/usr/share/isep/base/README.hardlink")
        assert readme and hard, f"{engine}: {ref}: base README.txt/README.hardlink missing"
        assert hard[1] == readme[1] and readme[1], f"{engine}: {ref}: hardlink content differs"
        link = _cp_member(engines, engine, cid, "/etc/os-release")
        assert link and link[0].issym() and link[0].linkname == "isep-release", \
            f"{engine}: {ref}: /etc/os-release is not the symlink -> isep-release"
        gone = _cp_member(engines, engine, cid, "/etc/base-remove-me.txt") is None
        assert gone == whiteout_expected, (
            f"{engine}: {ref}: /etc/base-remove-me.txt " + ("still visible: whiteout lost" if whiteout_expected
                                                             else "missing"))
    finally:
        engines.docker(engine, "rm", "-f", cid, timeout=60)


# =============================================================== 1. roundtrip
@pytest.mark.parametrize("producer,archive", CASES, ids=[f"{p}-{a}" for p, a in CASES])
def test_index(engines, producer, archive):
    """isep-index ARCHIVE and isep-index - (stdin) give the same JSON."""
    with lib.cell("roundtrip", f"{producer} {archive}", "index"):
        src = archive_path(engines, producer, archive)
        r1 = run(isep_cmd("index") + [str(src)], env=isep_env(), timeout=TIMEOUT)
        assert r1.returncode == 0, f"isep-index rc={r1.returncode}: {tail(r1.stderr, 1)}\n{tail(r1.stderr, 8)}"
        j1 = json.loads(r1.stdout)
        with open(src, "rb") as f:
            r2 = run(isep_cmd("index") + ["-"], env=isep_env(), input=f.read(), timeout=TIMEOUT)
        assert r2.returncode == 0, f"isep-index - rc={r2.returncode}: {tail(r2.stderr, 1)}\n{tail(r2.stderr, 8)}"
        j2 = json.loads(r2.stdout)
        for j in (j1, j2):   # the source name legitimately differs (path vs stdin)
            if isinstance(j.get("source"), dict):
                j["source"].pop("name", None)
        assert j2 == j1, "isep-index FILE and isep-index - (stdin) differ (beyond source.name)"
        text = json.dumps(j1)
        for key in IMAGES_IN[archive]:
            for diff_id in expected(engines, producer, key)[1]:
                assert diff_id in text, f"index lacks diff_id {diff_id[:19]} of {key}"


@pytest.mark.parametrize("producer,archive", CASES, ids=[f"{p}-{a}" for p, a in CASES])
def test_roundtrip(engines, producer, archive):
    """pack -> verify -> join -> byte-exact cmp with the original save (single-image saves).
    A multi-image save (app1+app2) is joined image by image (the contract promises byte
    equality only for single-image saves): each joined archive must pass isep-verify and
    isep-index must show the image's diff_ids."""
    with lib.cell("roundtrip", f"{producer} {archive}", "pack+verify+join+cmp"):
        src = archive_path(engines, producer, archive)
        b = bundle_for(engines, producer, archive)
        keys = IMAGES_IN[archive]
        for key in keys:
            tag, layers = expected(engines, producer, key)
            joined = engines.tmp / f"joined--{producer}--{archive}--{key}.tar"
            argv = isep_cmd("join") + [str(b), tag]
            r = run_to_file(argv, joined, env=isep_env())
            assert r.returncode == 0, (f"isep-join rc={r.returncode}: {tail(r.stderr, 1)}\n"
                                       f"{tail(r.stderr, 8)}\n$ {cmdline(argv)}")
            if len(keys) == 1:
                assert filecmp.cmp(src, joined, shallow=False), (
                    f"joined archive differs from the original save: {first_difference(src, joined)}\n"
                    f"$ {cmdline(argv)} > {joined}; cmp {src} {joined}")
                continue
            r = run(isep_cmd("verify") + [str(joined)], env=isep_env(), timeout=TIMEOUT)
            assert r.returncode == 0, (f"isep-verify of joined {tag} rc={r.returncode}: "
                                       f"{tail(r.stderr, 1)} {tail(r.stdout, 3)}")
            r = run(isep_cmd("index") + [str(joined)], env=isep_env(), timeout=TIMEOUT)
            assert r.returncode == 0, f"isep-index of joined {tag} rc={r.returncode}: {tail(r.stderr, 1)}"
            imgs = json.loads(r.stdout).get("images") or []
            assert len(imgs) == 1, f"joined {tag}: isep-index shows {len(imgs)} images, want 1"
            assert imgs[0].get("diff_ids") == layers, f"joined {tag}: diff_ids differ from the save's"


# =============================================================== 2. loads
LOAD_CASES = [(p, a, l) for p, a in CASES for l in LOADERS]


@pytest.mark.parametrize("producer,archive,loader", LOAD_CASES,
                         ids=[f"{p}-{a}-{l}" for p, a, l in LOAD_CASES])
def test_load(engines, producer, archive, loader):
    """isep-join BUNDLE IMAGE | LOADER load (for each image of the save); loaded tags and
    RootFS.Layers = the originals; in docker engines also the files (hardlink, symlink, whiteout)."""
    with lib.cell("load", f"{producer} {archive}", loader):
        b = bundle_for(engines, producer, archive)
        for key in IMAGES_IN[archive]:
            tag, layers = expected(engines, producer, key)
            join_argv = isep_cmd("join") + [str(b), tag]
            load_joined(engines, join_argv, loader, [(tag, layers)], archive_path(engines, producer, archive))
            if loader in ("legacy", "oci", "cstore"):
                check_fs(engines, loader, tag, whiteout_expected=(producer == "umoci" and key == "app2"))


# =============================================================== 3. release update
def _snapshot(d: Path) -> dict[str, tuple[int, int, str]]:
    import hashlib
    snap = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            st = p.stat()
            snap[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns, h)
    return snap


def _pack_into(engines, producer, archive, store: Path, extra=()):
    argv = (isep_cmd("pack") + [str(archive_path(engines, producer, archive))]
            + pack_args(engines, producer) + ["-o", str(store), *extra])
    r = run(argv, env=isep_env(), timeout=TIMEOUT)
    assert r.returncode == 0, f"isep-pack rc={r.returncode}: {tail(r.stderr, 1)}\n{tail(r.stderr, 8)}\n$ {cmdline(argv)}"


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_release_update(engines, producer):
    """app1:1 then app1:2 (separate save, same base+lib) into one store: only a new
    app part is written; app1:2 joins and loads with the right layers; app1:1 still joins byte-exact."""
    with lib.cell("release", f"{producer} → {TARGET[producer]}", "result"):
        store = engines.tmp / "stores" / f"release--{producer}"
        shutil.rmtree(store, ignore_errors=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        _pack_into(engines, producer, "app1", store)
        s1 = _snapshot(store)
        time.sleep(0.05)
        _pack_into(engines, producer, "app1-2", store)
        s2 = _snapshot(store)
        big_before = {k: v for k, v in s1.items() if v[0] >= 100 * 1024}
        assert big_before, f"store after release 1 has no part >= 100 KiB: {sorted(s1)}"
        changed = [k for k, v in big_before.items() if s2.get(k) != v]
        assert not changed, f"release 2 rewrote/removed existing parts: {changed}"
        written = sum(v[0] for k, v in s2.items() if s1.get(k) != v)
        kept = sum(v[0] for v in big_before.values())
        assert 0 < written < kept / 2, (f"release 2 wrote {written} bytes (base+lib parts: {kept}); "
                                        f"new/changed files: {[k for k in s2 if s1.get(k) != s2[k]]}")
        # release 1 still joins byte-exact
        tag1, _ = expected(engines, producer, "app1")
        j1 = engines.tmp / f"release1--{producer}.tar"
        verify_and_join(store, tag1, j1)
        orig1 = archive_path(engines, producer, "app1")
        assert filecmp.cmp(orig1, j1, shallow=False), \
            f"app1:1 from the store differs from its save: {first_difference(orig1, j1)}"
        # release 2 joins and loads
        tag2, layers2 = expected(engines, producer, "app1-2")
        load_joined(engines, isep_cmd("join") + [str(store), tag2], TARGET[producer],
                    [(tag2, layers2)], None)


# =============================================================== 4. ssh hop
@pytest.fixture(scope="session")
def sshd(engines):
    with lib.ssh_server() as server:
        yield server


SSH_PRODUCERS = ["docker-legacy", "docker-oci", "docker-cstore", "podman-docker-archive", "podman-oci-archive"]


@pytest.mark.parametrize("producer", SSH_PRODUCERS)
def test_ssh_hop(engines, sshd, producer):
    """isep-pack app1-2.tar ... -o - --parts app | ssh HOST 'cd REPO && bin/isep-join STORE - | load'."""
    with lib.cell("ssh", f"{producer} → {TARGET[producer]}", "result"):
        store = engines.tmp / "stores" / f"ssh--{producer}"
        shutil.rmtree(store, ignore_errors=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        _pack_into(engines, producer, "app1", store)          # the remote side already has release 1
        tag2, layers2 = expected(engines, producer, "app1-2")
        target = TARGET[producer]
        remove_images(engines, target, [tag2])
        jc = isep_cmd("join")
        join_remote = ("bin/isep-join" if jc == [str(REPO / "bin" / "isep-join")] else cmdline(jc))
        remote = (f"cd {shlex.quote(str(REPO))} && "
                  f"export PATH={shlex.quote(os.environ.get('PATH', ''))} "
                  f"PYTHONPATH={shlex.quote(isep_env()['PYTHONPATH'])} && "
                  f"{join_remote} {shlex.quote(str(store))} - | {cmdline(engines.loader_argv(target))}")
        argv1 = (isep_cmd("pack") + [str(archive_path(engines, producer, "app1-2"))]
                 + pack_args(engines, producer) + ["-o", "-", "--parts", "app"])
        res = pipe(argv1, sshd["ssh"] + [remote], env1=isep_env())
        assert res.rc1 == 0 and res.rc2 == 0, (f"ssh hop failed: isep-pack rc={res.rc1} {tail(res.err1, 1)}; "
                                               f"ssh side rc={res.rc2} {tail(res.err2, 1)}\n" + res.describe())
        check_loaded(engines, target, [(tag2, layers2)], res.out2)


# =============================================================== 5. isula-build bundles
def _isula_images(bundle) -> list[tuple[str, list[str]]]:
    """(image name, diff_ids from the config inside its app tarball) per manifest entry
    of an isula-build bundle (a name under tests/data/isula, or a directory)."""
    d = ISULA_DIR / bundle if isinstance(bundle, str) else Path(bundle)
    man = json.loads((d / "manifest").read_text())
    out = []
    for name, ent in man.items():
        with tarfile.open(d / ent["app"], "r:gz") as t:
            m = json.load(t.extractfile("manifest.json"))[0]
            cfg = json.load(t.extractfile(m["Config"]))
        out.append((name, list(cfg["rootfs"]["diff_ids"])))
    return out


ISULA_CASES = [(b, l) for b in ISULA_BUNDLES for l in LOADERS]


@pytest.mark.parametrize("bundle,loader", ISULA_CASES, ids=[f"{b}-{l}" for b, l in ISULA_CASES])
def test_isula_bundle(engines, bundle, loader):
    """isep-join DIR IMAGE | LOADER load, for each image of a real isula-build bundle."""
    if not (ISULA_DIR / bundle / "manifest").exists():
        pytest.fail(f"missing test data {ISULA_DIR / bundle}")
    for name, layers in _isula_images(bundle):
        with lib.cell("isula", f"{bundle} {name}", loader):
            load_joined(engines, isep_cmd("join") + [str(ISULA_DIR / bundle), name], loader,
                        [(name, layers)], None)


# =============================================================== extra: pack variants, refusals
VARIANTS = {"compress-gzip": ["--compress", "gzip"], "compress-none": ["--compress", "none"],
            "format-isula": ["--format", "isula", "--compress", "gzip"]}
VARIANT_CASES = [(p, v) for p in ("docker-legacy", "docker-cstore") for v in VARIANTS]


@pytest.mark.parametrize("producer,variant", VARIANT_CASES, ids=[f"{p}-{v}" for p, v in VARIANT_CASES])
def test_pack_variant(engines, producer, variant):
    """isep-pack options from the contract: the bundle still verifies and joins byte-exact,
    and the join loads into the producer's engine."""
    with lib.cell("variants", f"{producer} app2", variant):
        store = engines.tmp / "stores" / f"variant--{producer}--{variant}"
        shutil.rmtree(store, ignore_errors=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        _pack_into(engines, producer, "app2", store, VARIANTS[variant])
        tag, layers = expected(engines, producer, "app2")
        joined = engines.tmp / f"variant--{producer}--{variant}.tar"
        verify_and_join(store, tag, joined)
        src = archive_path(engines, producer, "app2")
        if variant == "format-isula":
            # isula-build's layout is re-headed (not byte-exact by design); it must read like
            # a real isula-build bundle: manifest -> gzip app tarball with manifest.json + config
            imgs = _isula_images(store)
            assert [norm(n) for n, _ in imgs] == [norm(tag)], f"isula manifest names {[n for n, _ in imgs]}"
            assert imgs[0][1] == layers, "isula app tarball config diff_ids differ from the save's"
        else:
            assert filecmp.cmp(src, joined, shallow=False), f"differs from the save: {first_difference(src, joined)}"
        load_joined(engines, isep_cmd("join") + [str(store), tag], TARGET[producer], [(tag, layers)], None)


def test_refuses_foreign_lib(engines):
    """app1 of dockerd 20.10 with podman's lib (other diff_ids): exit 6, nothing usable written."""
    with lib.cell("refusals", "docker-legacy app1 + podman lib", "isep-pack exit 6"):
        out = engines.tmp / "stores" / "foreign-lib"
        shutil.rmtree(out, ignore_errors=True)
        argv = (isep_cmd("pack") + [str(archive_path(engines, "docker-legacy", "app1")),
                                    "--base", str(ref_file(engines, "docker-legacy", "base")),
                                    "--lib", str(ref_file(engines, "podman-docker-archive", "lib")),
                                    "-o", str(out)])
        r = run(argv, env=isep_env(), timeout=TIMEOUT)
        assert r.returncode == 6, f"want exit 6 (image does not fit base/lib), got {r.returncode}: {tail(r.stderr, 2)}"
        assert len(tail(r.stderr, 50).splitlines()) >= 1, "no message on stderr"


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    parts = sorted((p for p in dst.iterdir() if p.is_file() and "_app_image" in p.name),
                   key=lambda p: p.stat().st_size)
    assert parts, f"no *_app_image* part in {sorted(p.name for p in dst.iterdir())}"
    victim = parts[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("loader", ["legacy", "oci", "cstore", "podman"])
def test_corrupt_part_rejected(engines, loader):
    """One flipped byte in the app part: isep-verify exits 5, isep-join exits non-zero, and
    the loader does not end up with the image (the archive's final metadata is held back)."""
    with lib.cell("refusals", "docker-legacy app1, 1 byte flipped in app part", loader):
        b = bundle_for(engines, "docker-legacy", "app1")
        bad = engines.tmp / "bundles" / f"corrupt--{loader}"
        victim = _corrupt_copy(b, bad)
        r = run(isep_cmd("verify") + [str(bad)], env=isep_env(), timeout=TIMEOUT)
        assert r.returncode == 5, f"isep-verify of a corrupt bundle: want exit 5, got {r.returncode} ({victim.name})"
        tag, _ = expected(engines, "docker-legacy", "app1")
        remove_images(engines, loader, [tag])
        res = pipe(isep_cmd("join") + [str(bad), tag], engines.loader_argv(loader), env1=isep_env())
        assert res.rc1 != 0, "isep-join of a corrupt bundle exited 0\n" + res.describe()
        if loader == "podman":
            r = engines.podman("image", "exists", "localhost/" + norm(tag))
            r2 = engines.podman("image", "exists", "docker.io/" + norm(tag))
            present = r.returncode == 0 or r2.returncode == 0
        else:
            present = engines.docker(loader, "image", "inspect", norm(tag)).returncode == 0
        assert not present, (f"{loader} loaded {tag} from a corrupt bundle (loader rc={res.rc2})\n"
                             + res.describe())
