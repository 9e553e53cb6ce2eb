"""isep-push, isep-join oci:// and isep-verify oci:// against a real registry (Debian's
docker-registry, tests/registry/registry.sh): a three-release chain (full, delta, delta) for two apps
on one base; devices with empty, release-1 and release-2 stores join each release byte for byte and
fetch exactly the blobs they lack; a cut download resumes; a wrong signature, a garbage-collected
delta and a missing blob each give one line and no wrong image."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Optional

import pytest

from isep.artifact import DELTA_BUNDLE, DELTA_PART_TYPES, PART_TYPES
from isep.pull import pull_directory_in_use
from isep.samples import Image, Layer, write_archive
from tests.release_samples import base_layer
from tests.harness import command_argv, copy_store, is_complete_archive, isep, run
from tests.registry.proxy import CuttingProxy
from tests.release_chain import APPS, RELEASES, build_chain

pytestmark = pytest.mark.registry

BASE = "base_1_base_image.tar.zst"


def _app_part(app: str, n: int) -> str:
    return f"{app}_{n}_app_image.tar.zst"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def fleet(registry, chain):
    """The chain pushed under a repository prefix of its own; app2 mounts from app1's repository."""
    prefix = f"isep-artifact/{uuid.uuid4().hex[:12]}"
    pushes = {}
    for app in APPS:
        mount = [] if app == "app1" else ["--mount-from", f"{prefix}/app1"]
        for n in RELEASES:
            delta = ["--delta", chain[f"{app}/d{n - 1}{n}"]] if n > 1 else []
            res = isep("push", chain[f"{app}/r{n}"], f"oci://{registry.host}/{prefix}/{app}:{n}", *delta, *mount,
                       check=0)
            assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", res.stdout.decode()), res.stdout
            pushes[f"{app}:{n}"] = res
    return {"prefix": prefix, "pushes": pushes, "host": registry.host}


def _ref(fleet, app: str, n: int) -> str:
    return f"oci://{fleet['host']}/{fleet['prefix']}/{app}:{n}"


def _fetched(res) -> int:
    match = re.search(r"blob\(s\) needed, ([\d,]+) bytes fetched", res.stderr)
    assert match, res.stderr
    return int(match.group(1).replace(",", ""))


def _entry(bundle: Path, file_name: str) -> dict:
    doc = json.loads((bundle / "isep-bundle.json").read_text())
    return next(p for p in doc["parts"] if p["file"] == file_name)


def test_push_mounts_the_shared_base_and_skips_what_is_present(fleet):
    pushes = fleet["pushes"]
    assert f"uploaded: {BASE}" in pushes["app1:1"].stderr
    assert f"present: {BASE}" in pushes["app1:2"].stderr and f"uploaded: {BASE}" not in pushes["app1:2"].stderr
    assert f"mounted: {BASE}" in pushes["app2:1"].stderr and f"uploaded: {BASE}" not in pushes["app2:1"].stderr


def test_the_manifest_carries_delta_parts_annotated_with_their_bundle(fleet, registry):
    res = subprocess.run(["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                          f"http://{registry.host}/v2/{fleet['prefix']}/app1/manifests/2"], capture_output=True)
    doc = json.loads(res.stdout)
    assert doc["artifactType"] == "application/vnd.isep.bundle.v1"
    types = [layer["mediaType"] for layer in doc["layers"]]
    assert types.count(PART_TYPES["zstd"]) == 2 and types.count(DELTA_PART_TYPES["zstd"]) == 1
    delta = next(layer for layer in doc["layers"] if layer["mediaType"] == DELTA_PART_TYPES["zstd"])
    manifest = next(layer for layer in doc["layers"] if layer["mediaType"].endswith("delta-bundle.manifest.v1+json"))
    assert delta["annotations"][DELTA_BUNDLE] == manifest["digest"]


@pytest.fixture(scope="module")
def devices(fleet, chain, tmp_path_factory):
    """Device stores as devices build them: release 1 pulled into an empty store, then release 2."""
    root = tmp_path_factory.mktemp("devices")
    made = {}
    for app in APPS:
        store = root / f"{app}-r1"
        assert isep("join", _ref(fleet, app, 1), store, "-q", check=0).stdout == chain[f"{app}/save1"].read_bytes()
        made[(app, 1)] = store
        store2 = copy_store(store, root / f"{app}-r2")
        assert isep("join", _ref(fleet, app, 2), store2, "-q", check=0).stdout == chain[f"{app}/save2"].read_bytes()
        made[(app, 2)] = store2
    return made


def _expected_bytes(chain, app: str, n: int, held: int) -> int:
    """What a device whose store holds releases up to HELD fetches for release N: everything from an
    empty store; the delta part from the release just before; else the plain app part; nothing for
    a release it holds."""
    release = chain[f"{app}/r{n}"]
    if held == 0:
        return sum(_entry(release, f)["size"] for f in (BASE, _app_part(app, n)))
    if held >= n:
        return 0
    if held == n - 1:
        return _entry(chain[f"{app}/d{held}{n}"], _app_part(app, n))["size"]
    return _entry(release, _app_part(app, n))["size"]


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("n", RELEASES)
@pytest.mark.parametrize("held", [0, 1, 2])
def test_a_device_joins_each_release_byte_for_byte_fetching_only_what_it_lacks(fleet, chain, devices, tmp_path,
                                                                              app, n, held):
    store = tmp_path / "store" if held == 0 else copy_store(devices[(app, held)], tmp_path / "store")
    res = isep("join", _ref(fleet, app, n), store, check=0)
    assert res.stdout == chain[f"{app}/save{n}"].read_bytes()
    assert _fetched(res) == _expected_bytes(chain, app, n, held)
    assert (store / _app_part(app, n)).is_file()  # kept for the next release
    assert not [p for p in os.listdir(store) if p.startswith(".isep-tmp")]
    if held == n - 1 and n > 1:  # the kept part is the one rebuilt from the delta, complete
        assert _entry(store, _app_part(app, n))["size"] > 10 * _expected_bytes(chain, app, n, held)


def test_a_join_without_a_store_fetches_everything_into_a_temporary_directory(fleet, chain, tmp_path):
    res = isep("join", _ref(fleet, "app2", 3), "-o", tmp_path / "out.tar", check=0,
               env={**os.environ, "TMPDIR": str(tmp_path)})
    assert (tmp_path / "out.tar").read_bytes() == chain["app2/save3"].read_bytes()
    assert _fetched(res) == _expected_bytes(chain, "app2", 3, 0)
    assert sorted(os.listdir(tmp_path)) == ["out.tar"]


def test_an_interrupted_download_resumes_where_it_stopped(fleet, chain, tmp_path):
    """What an interrupted pull leaves in STORE/.isep-tmp-pull-*/: a rerun fetches only the rest."""
    store = tmp_path / "store"
    res = isep("join", _ref(fleet, "app1", 1), store, "-o", tmp_path / "first.tar", check=0)
    pull_name = next(iter(re.findall(r"\(sha256:([0-9a-f]{12})", res.stderr)))
    shutil.rmtree(store)
    entry = _entry(chain["app1/r1"], _app_part("app1", 1))
    blob = (chain["app1/r1"] / entry["file"]).read_bytes()
    half = len(blob) // 2
    manifest_digest = _digest_of(fleet, "app1", 1)
    blobs = store / f".isep-tmp-pull-{manifest_digest[7:23]}" / ".isep-blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{entry['sha256'][7:]}.partial").write_bytes(blob[:half])
    res = isep("join", _ref(fleet, "app1", 1), store, check=0)
    assert manifest_digest[7:19] == pull_name
    assert res.stdout == chain["app1/save1"].read_bytes()
    assert _fetched(res) == _expected_bytes(chain, "app1", 1, 0) - half
    assert not [p for p in os.listdir(store) if p.startswith(".isep-tmp")]


def _digest_of(fleet, app: str, n: int) -> str:
    res = subprocess.run(["curl", "-sfI", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                          f"http://{fleet['host']}/v2/{fleet['prefix']}/{app}/manifests/{n}"],
                         capture_output=True, text=True)
    return re.search(r"(?i)docker-content-digest: (sha256:[0-9a-f]{64})", res.stdout).group(1)


def test_a_corrupt_partial_download_is_refused_and_removed_then_fetched_again(fleet, chain, tmp_path):
    store = tmp_path / "store"
    entry = _entry(chain["app1/r1"], _app_part("app1", 1))
    blobs = store / f".isep-tmp-pull-{_digest_of(fleet, 'app1', 1)[7:23]}" / ".isep-blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{entry['sha256'][7:]}.partial").write_bytes(b"\0" * 1000)
    res = isep("join", _ref(fleet, "app1", 1), store, "-o", tmp_path / "out.tar")
    assert res.rc == 5 and len(res.error_lines) == 1 and "sha256" in res.error, res
    assert not (tmp_path / "out.tar").exists()
    assert not (blobs / f"{entry['sha256'][7:]}.partial").exists()
    res = isep("join", _ref(fleet, "app1", 1), store, check=0)
    assert res.stdout == chain["app1/save1"].read_bytes()


def test_verify_checks_every_blob_and_deep_their_sha256(fleet):
    report = isep("verify", _ref(fleet, "app1", 3), check=0).json
    assert report["ok"] and report["kind"] == "registry artifact"
    deep = isep("verify", "--deep", _ref(fleet, "app1", 3), check=0).json
    assert sum(c["check"] == "blob sha256" for c in deep["checks"]) == 3  # base, app, the delta part


def test_an_unknown_tag_is_a_usage_error(fleet):
    res = isep("join", _ref(fleet, "app1", 9), "-q")
    assert res.rc == 2 and len(res.error_lines) == 1 and "no such manifest" in res.error and not res.stdout


@pytest.fixture
def own_repo(registry, chain):
    """A repository of this test's own (it deletes blobs from the registry's storage)."""
    return f"oci://{registry.host}/isep-artifact/{uuid.uuid4().hex[:12]}/app1"


def _delete_blob(registry, digest: str) -> None:
    """What a garbage collection does to a blob: its data gone from the storage."""
    shutil.rmtree(registry.blob_file(digest).parent)


def test_a_garbage_collected_delta_part_falls_back_to_the_plain_part(registry, chain, devices, own_repo, tmp_path):
    isep("push", chain["app1/r2"], f"{own_repo}:2", "--delta", chain["app1/d12"], check=0)
    delta = _entry(chain["app1/d12"], _app_part("app1", 2))
    _delete_blob(registry, delta["sha256"])
    store = copy_store(devices[("app1", 1)], tmp_path / "store")
    res = isep("join", f"{own_repo}:2", store, check=0)
    assert res.stdout == chain["app1/save2"].read_bytes()
    assert [line for line in res.stderr.splitlines() if "warning" in line] == [
        f"isep-join: warning: delta part {_app_part('app1', 2)} ({delta['sha256'][7:19]}) is gone from the registry "
        "(garbage-collected?): fetching the plain part instead"]
    assert _fetched(res) == _expected_bytes(chain, "app1", 2, 0) - _entry(chain["app1/r2"], BASE)["size"]
    report = isep("verify", f"{own_repo}:2")
    assert report.rc == 5 and any("missing" in c["detail"] for c in report.failed_checks())


def test_a_missing_plain_part_is_one_line_and_no_image(registry, chain, own_repo, tmp_path):
    isep("push", chain["app1/r1"], f"{own_repo}:1", check=0)
    _delete_blob(registry, _entry(chain["app1/r1"], _app_part("app1", 1))["sha256"])
    res = isep("join", f"{own_repo}:1", tmp_path / "store", "-o", tmp_path / "out.tar")
    assert res.rc == 5 and len(res.error_lines) == 1 and "missing" in res.error, res
    assert not (tmp_path / "out.tar").exists()
    assert not (tmp_path / "store" / _app_part("app1", 1)).exists()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for who in ("release", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", who, "-f", root / who], check=True)
        (root / f"{who}.allowed").write_text(f"{who}@isep " + (root / f"{who}.pub").read_text())
        out[who] = root / who
        out[f"{who}.allowed"] = root / f"{who}.allowed"
    return out


def test_a_signed_release_joins_with_trust_and_a_wrong_key_fetches_no_part(registry, chain, keys, own_repo, tmp_path):
    signed = tmp_path / "signed"
    isep("pack", chain["app1/save1"], "--base", chain["base"], "-o", signed, "--sign", keys["release"], check=0)
    isep("push", signed, f"{own_repo}:1", check=0)
    res = isep("join", f"{own_repo}:1", tmp_path / "good", "--trust", keys["release.allowed"], check=0)
    assert res.stdout == chain["app1/save1"].read_bytes()
    assert (tmp_path / "good" / "isep-bundle.json.sig").is_file()  # kept with the manifest, byte for byte
    res = isep("join", f"{own_repo}:1", tmp_path / "bad", "--trust", keys["other.allowed"], "-o", tmp_path / "out.tar")
    assert res.rc == 5 and len(res.error_lines) == 1 and not (tmp_path / "out.tar").exists(), res
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    report = isep("verify", f"{own_repo}:1", "--trust", keys["other.allowed"])
    assert report.rc == 5 and [c["check"] for c in report.failed_checks()] == ["signature"]


def test_a_join_through_a_pull_through_cache(fleet, chain, cache_registry, tmp_path):
    """--mirror: blobs from the cache (which fetches them from the registry behind it)."""
    res = isep("join", _ref(fleet, "app2", 2), tmp_path / "store", "--mirror", cache_registry.host, check=0)
    assert res.stdout == chain["app2/save2"].read_bytes() and is_complete_archive(res.stdout)


def test_push_and_join_with_basic_auth_from_the_environment(auth_registry, chain, tmp_path):
    ref = f"oci://{auth_registry.host}/isep-artifact/{uuid.uuid4().hex[:12]}/app1:1"
    env = {**os.environ, **auth_registry.environ()}
    isep("push", chain["app1/r1"], ref, check=0, env=env)
    res = isep("join", ref, tmp_path / "store", check=0, env=env)
    assert res.stdout == chain["app1/save1"].read_bytes()
    anonymous = {k: v for k, v in env.items() if not k.startswith("ISEP_REGISTRY_")}
    res = isep("join", ref, tmp_path / "other", env={**anonymous, "DOCKER_CONFIG": str(tmp_path / "none")})
    assert res.rc == 3 and len(res.error_lines) == 1 and not res.stdout, res
    assert auth_registry.password not in res.stderr


def test_a_tampered_blob_in_the_registry_is_one_line_and_no_image(registry, chain, own_repo, tmp_path):
    """The registry's storage altered behind its back (same size): the fetch's sha256 check refuses it."""
    isep("push", chain["app1/r1"], f"{own_repo}:1", check=0)
    data = registry.blob_file(_entry(chain["app1/r1"], BASE)["sha256"])
    original = data.read_bytes()
    data.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])
    try:
        res = isep("join", f"{own_repo}:1", tmp_path / "store", "-o", tmp_path / "out.tar")
        assert res.rc == 5 and len(res.error_lines) == 1 and "sha256" in res.error, res
        assert not (tmp_path / "out.tar").exists() and not (tmp_path / "store" / BASE).exists()
        report = isep("verify", "--deep", f"{own_repo}:1")
        assert report.rc == 5 and [c["check"] for c in report.failed_checks()] == ["blob sha256"]
    finally:
        data.write_bytes(original)


def test_pack_straight_into_a_registry(registry, chain, own_repo, tmp_path):
    res = isep("pack", chain["app2/save3"], "--base", chain["base"], "-o", f"{own_repo}:3", check=0)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", res.stdout.decode())
    res = isep("join", f"{own_repo}:3", tmp_path / "store", check=0)
    assert res.stdout == chain["app2/save3"].read_bytes()


def test_a_connection_cut_in_the_middle_of_a_part_resumes_and_verifies(fleet, chain, tmp_path):
    """The registry reached through a proxy that drops the connection once, halfway through the
    release's bytes: the join resumes the part with a Range request and is still byte for byte."""
    total = _expected_bytes(chain, "app1", 1, 0)
    with CuttingProxy(fleet["host"], cut_after=total // 2 + 300_000, direction="down") as proxy:
        ref = f"oci://{proxy.host}/{fleet['prefix']}/app1:1"
        res = isep("join", ref, tmp_path / "store", check=0)
    assert proxy.cuts == 1
    assert res.stdout == chain["app1/save1"].read_bytes()
    assert _fetched(res) == total  # nothing fetched twice
    assert proxy.bytes["down"] < total + (64 << 10)


def test_push_and_pull_of_a_large_release_in_flat_memory(registry, chain, own_repo, tmp_path):
    """128 MiB of incompressible layer data: push and join (fetch, join, keep) stay far below it."""
    big = Layer(files=[(f"data/{i}", os.urandom(8 << 20)) for i in range(16)], mtime=1700000000, created_by="ADD")
    save = tmp_path / "big.tar"
    with open(save, "wb") as fh:
        write_archive(fh, "docker-oci", [Image("isep-artifact/big:1", [base_layer(1), big])])
    isep("pack", save, "--base", chain["base"], "-o", tmp_path / "bundle", check=0)
    pushed = run("push", tmp_path / "bundle", f"{own_repo}:big", rss=True, timeout=300)
    with open(tmp_path / "out.tar", "wb") as fh:
        joined = run("join", f"{own_repo}:big", tmp_path / "store", stdout=fh, rss=True, timeout=300)
    assert (tmp_path / "out.tar").read_bytes() == save.read_bytes()
    print(f"peak RSS: push {pushed.maxrss_kb} kB, join {joined.maxrss_kb} kB")
    assert pushed.maxrss_kb < 80 << 10 and joined.maxrss_kb < 100 << 10, (pushed.maxrss_kb, joined.maxrss_kb)


def _stopped_while_pulling(ref: str, store: Path, out: Path) -> Optional[subprocess.Popen]:
    """isep-join REF STORE, stopped (SIGSTOP) as soon as it holds its pull directory; None if it
    finished first."""
    proc = subprocess.Popen(command_argv("join", [ref, store, "-o", out, "-q"]), stderr=subprocess.PIPE)
    while proc.poll() is None:
        held = [p for p in store.glob(".isep-tmp-pull-*") if pull_directory_in_use(str(p))]
        if held:
            os.kill(proc.pid, signal.SIGSTOP)
            return proc
    return None


def test_prune_leaves_a_running_pulls_directory_and_removes_an_interrupted_ones(fleet, chain, devices, tmp_path):
    """isep-prune while an isep-join oci:// holds its pull directory leaves it; once that pull is
    killed, the next prune removes it; a rerun still joins byte for byte."""
    for attempt in range(10):
        store = copy_store(devices[("app1", 1)], tmp_path / f"store{attempt}")
        proc = _stopped_while_pulling(_ref(fleet, "app1", 3), store, tmp_path / "out.tar")
        if proc is not None:
            break
    else:
        pytest.fail("the join never was caught holding its pull directory")
    try:
        pull_dir = next(store.glob(".isep-tmp-pull-*"))
        res = isep("prune", store, "--keep-last", "5", check=0)
        assert res.stdout == b"" and pull_dir.is_dir() and pull_directory_in_use(str(pull_dir))
    finally:
        proc.kill()
        proc.communicate()
    res = isep("prune", store, "--keep-last", "5", check=0)
    assert res.stdout.decode() == f"{pull_dir.name}/\n" and not pull_dir.exists()
    assert not [p for p in os.listdir(store) if p.startswith(".isep-tmp")]
    res = isep("join", _ref(fleet, "app1", 3), store, check=0)
    assert res.stdout == chain["app1/save3"].read_bytes()
