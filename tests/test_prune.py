"""isep-prune: the parts kept images need stay, the rest goes; manifest first, then the files."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from isep.bundle import Store, select_image
from isep.errors import EnvironmentFailure
from isep.pull import (BLOB_DIR, PULL_LOCK, PULL_PREFIX, pull_directory, pull_directory_in_use,
                       remove_idle_pull_directory)
from isep.stream import keep_received, receive_stream
from isep.targets import DirTarget
from isep.tarstream import Source
from tests.harness import bundle_doc, copy_store, hold_store_lock, isep
from tests.test_versions import OLD_BASE, floating_saves, new_base_name

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = {"isep-bundle.json", "manifest", "isep-bundle.lock"}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A store holding app:1 on base v1 and app:2 on base v2 (one floating base tag)."""
    root = tmp_path_factory.mktemp("prune")
    made = floating_saves(root / "saves")
    store = root / "store"
    for n in (1, 2):
        isep("pack", made[f"app{n}"], "--base", made[f"base{n}"], "-o", store, check=0)
    return {**made, "store": store, "root": root}


def files(store) -> set[str]:
    return {p.name for p in store.iterdir()}


def test_keep_one_image_removes_exactly_what_only_the_other_needs(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    res = isep("prune", store, "--keep", "isep-float/app:2", check=0)
    assert res.stdout.decode().splitlines() == sorted([OLD_BASE, "app_1_app_image.tar.zst"])
    assert files(store) == MANIFESTS | {new_base_name(two), "app_2_app_image.tar.zst"}
    doc = bundle_doc(store)
    assert [im["tags"] for im in doc["images"]] == [["isep-float/app:2"]]
    assert {p["file"] for p in doc["parts"]} == {new_base_name(two), "app_2_app_image.tar.zst"}
    assert isep("join", store, "isep-float/app:2", check=0).stdout == two["app2"].read_bytes()
    assert isep("join", store, "isep-float/app:1", check=2).error
    isep("verify", store, check=0)
    isula_raw = (store / "manifest").read_bytes()
    assert list(json.loads(isula_raw)) == ["isep-float/app:2"]
    assert doc["isula_manifest"] == "sha256:" + hashlib.sha256(isula_raw).hexdigest()
    assert "removed 2 part file(s)" in res.stderr and "1 dropped" in res.stderr


def test_keep_last_per_repository_and_json(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    report = isep("prune", store, "--keep-last", "1", "--json", check=0).json
    assert report["removed"] == sorted([OLD_BASE, "app_1_app_image.tar.zst"])
    assert report["images_kept"] == ["isep-float/app:2"] and report["images_dropped"] == ["isep-float/app:1"]
    assert report["freed_bytes"] > 0 and report["dry_run"] is False
    assert files(store) == MANIFESTS | {new_base_name(two), "app_2_app_image.tar.zst"}
    # keeping the old release instead keeps the first base name, as isula-build's tools know it
    store = copy_store(two["store"], tmp_path / "store1")
    isep("prune", store, "--keep", "isep-float/app:1", check=0)
    assert files(store) == MANIFESTS | {OLD_BASE, "app_1_app_image.tar.zst"}
    assert isep("join", store, "isep-float/app:1", check=0).stdout == two["app1"].read_bytes()


def test_keeping_everything_changes_nothing(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    before = (store / "isep-bundle.json").read_bytes()
    res = isep("prune", store, "--keep-last", "2", check=0)
    assert res.stdout == b"" and (store / "isep-bundle.json").read_bytes() == before


def test_dry_run_lists_and_changes_nothing(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    res = isep("prune", store, "--keep", "isep-float/app:2", "--dry-run", check=0)
    assert res.stdout.decode().splitlines() == sorted([OLD_BASE, "app_1_app_image.tar.zst"])
    assert "would remove 2" in res.stderr
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_crash_between_manifest_and_unlink_leaves_strays_the_next_prune_removes(two, tmp_path):
    """Simulated: the pruned manifest is in place, the files it no longer lists are still there."""
    store = copy_store(two["store"], tmp_path / "store")
    isep("prune", store, "--keep", "isep-float/app:2", check=0)
    for name in (OLD_BASE, "app_1_app_image.tar.zst"):
        shutil.copy(two["store"] / name, store / name)
    report = isep("verify", store, check=0).json
    strays = sorted(c["detail"].split(":")[0] for c in report["checks"] if c["check"] == "stray")
    assert strays == sorted([OLD_BASE, "app_1_app_image.tar.zst"])
    res = isep("prune", store, "--keep-last", "1", check=0)
    assert res.stdout.decode().splitlines() == strays and "2 unlisted" in res.stderr
    assert files(store) == MANIFESTS | {new_base_name(two), "app_2_app_image.tar.zst"}
    assert not [c for c in isep("verify", store, check=0).json["checks"] if c["check"] == "stray"]


def test_signed_store_loses_its_stale_signature(two, tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen (OpenSSH) is needed to sign a store")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@example.org", "-f", str(key)],
                   check=True)
    (tmp_path / "allowed").write_text(f"me@example.org {(tmp_path / 'key.pub').read_text()}")
    store = tmp_path / "store"
    for n in (1, 2):
        isep("pack", two[f"app{n}"], "--base", two[f"base{n}"], "-o", store, "--sign", key, check=0)
    isep("verify", "--trust", tmp_path / "allowed", store, check=0)
    res = isep("prune", store, "--keep-last", "1", check=0)
    assert not (store / "isep-bundle.json.sig").exists()
    assert any("isep-bundle.json.sig removed" in line for line in res.lines)
    isep("verify", store, check=0)
    assert isep("verify", "--trust", tmp_path / "allowed", store, check=5)


def test_a_delta_part_keeps_the_parts_it_reads(rel, tmp_path):
    """app:3 packed as a delta part in the store reads app:1's part: keeping app:3 keeps both."""
    store = copy_store(rel["build"], tmp_path / "store")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    res = isep("prune", store, "--keep", "isep-delta/app:3", check=0)
    assert res.stdout == b""
    assert "app_1_app_image.tar.zst" in files(store)
    assert [im["tags"] for im in bundle_doc(store)["images"]] == [["isep-delta/app:3"]]
    assert isep("join", store, "isep-delta/app:3", check=0).stdout == rel["r3"].read_bytes()
    isep("verify", "--deep", store, check=0)
    # keeping app:1 alone drops the delta part, which nothing else reads
    store = copy_store(rel["build"], tmp_path / "store1")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    res = isep("prune", store, "--keep", "isep-delta/app:1", check=0)
    assert res.stdout.decode().splitlines() == ["app_3_app_image.tar.zst"]
    assert bundle_doc(store)["schema"] == "isep-bundle/1"
    assert isep("join", store, "isep-delta/app:1", check=0).stdout == rel["r1"].read_bytes()


def test_a_device_store_of_rebuilt_parts(rel, tmp_path):
    """A device kept releases 2 and 3 from delta streams (rebuilt plain parts); --keep-last 1 leaves
    release 3 and its base."""
    build = copy_store(rel["build"], tmp_path / "build")
    device = copy_store(rel["build"], tmp_path / "device")
    for key in ("r2", "r3"):
        stream = isep("pack", rel[key], "--base", rel["base1"], "-o", "-", "--parts", "app",
                      "--delta-from", build, check=0).stdout
        isep("join", device, "-", "--keep", stdin=stream, check=0)
        isep("pack", rel[key], "--base", rel["base1"], "-o", build, check=0)
    res = isep("prune", device, "--keep-last", "1", check=0)
    assert res.stdout.decode().splitlines() == ["app_1_app_image.tar.zst", "app_2_app_image.tar.zst"]
    # isula-build's manifest named app:1 only (--keep does not write one): it goes with app:1's entry
    assert files(device) == {"isep-bundle.json", "isep-bundle.lock", "base_1_base_image.tar.zst",
                             "app_3_app_image.tar.zst"}
    assert isep("join", device, "isep-delta/app:3", check=0).stdout == rel["r3"].read_bytes()
    isep("verify", "--deep", device, check=0)


# --- hostile and usage ---------------------------------------------------------------------------------

def _one_line(res, code: int) -> str:
    assert res.rc == code and res.stdout == b"", res
    assert len(res.lines) == 1 and res.lines[0].startswith("isep-prune: error: "), res.lines
    return res.lines[0]


def test_keep_naming_no_image_is_refused(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    before = (store / "isep-bundle.json").read_bytes()
    line = _one_line(isep("prune", store, "--keep", "isep-float/app:2", "--keep", "nosuch:9"), 2)
    assert "nosuch:9" in line
    assert (store / "isep-bundle.json").read_bytes() == before and OLD_BASE in files(store)
    assert "--keep" in _one_line(isep("prune", store), 2)
    _one_line(isep("prune", store, "--keep-last", "0"), 2)


def test_store_locked_by_another_process(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    holder = hold_store_lock(store)
    try:
        line = _one_line(isep("prune", store, "--keep-last", "1", "--wait", "0"), 3)
        assert "busy" in line and str(holder.pid) in line
    finally:
        holder.kill()
        holder.wait()
    assert OLD_BASE in files(store)


def test_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not an isep store" in _one_line(isep("prune", tmp_path / "empty", "--keep-last", "1"), 2)
    _one_line(isep("prune", tmp_path / "missing", "--keep-last", "1"), 3)
    (tmp_path / "file").write_bytes(b"x")
    _one_line(isep("prune", tmp_path / "file", "--keep-last", "1"), 3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "isep-bundle.json").write_text("{\"schema\": 7}")
    _one_line(isep("prune", tmp_path / "bad", "--keep-last", "1"), 4)
    assert not (tmp_path / "missing").exists()


# --- a prune while another isep run uses the store -----------------------------------------------------

def _prune_app1_away(store) -> None:
    """What a prune keeping app:2 would leave, done behind another run's back."""
    isep("prune", store, "--keep", "isep-float/app:2", check=0)


def test_a_pack_whose_reused_part_was_pruned_meanwhile_fails(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    target = DirTarget(Store(str(store), create=False))  # read the manifest, as a pack does first
    _prune_app1_away(store)
    image = {"tags": ["isep-float/app:3"], "config": {"digest": "sha256:" + "3" * 64, "member": "c"},
             "parts": [OLD_BASE, "app_3_app_image.tar.zst"], "diff_ids": []}
    with pytest.raises(EnvironmentFailure, match="removed while it ran"):
        target.finish([], [image], None)
    assert [im["tags"] for im in bundle_doc(store)["images"]] == [["isep-float/app:2"]]


def test_a_keep_whose_store_base_was_pruned_meanwhile_keeps_nothing(two, tmp_path):
    """isep-join STORE - --keep of app:1's app part: the join read the store's old base, which a
    prune removed before the keep took the lock."""
    store = copy_store(two["store"], tmp_path / "store")
    stream = isep("pack", two["app1"], "--base", two["base1"], "-o", "-", "--parts", "app", check=0).stdout
    recv = store / ".isep-tmp-recv-test"
    recv.mkdir()
    received = receive_stream(Source(io.BytesIO(stream), prefetch=False), str(recv))
    joined = select_image(received.doc["images"], None, "the stream")
    (store / "app_1_app_image.tar.zst").unlink()  # the received app part must be new to the store
    _prune_app1_away(store)
    with pytest.raises(EnvironmentFailure, match="isep-prune"):
        keep_received(Store(str(store), create=False), received, joined)
    assert "app_1_app_image.tar.zst" not in files(store)
    assert [im["tags"] for im in bundle_doc(store)["images"]] == [["isep-float/app:2"]]


# --- interrupted pulls' directories ------------------------------------------------------------------

HOLD_PULL = """
import sys
from isep.bundle import Store
from isep.pull import pull_directory
held = pull_directory(Store(sys.argv[1], create=False), sys.argv[2])
open(held.path + "/.isep-blobs/" + "b" * 64 + ".partial", "wb").write(b"half a blob")
print(held.path, flush=True)
sys.stdin.read()  # holds the directory until the test closes stdin, as a running pull does
"""


def _digest(c: str) -> str:
    return "sha256:" + c * 64


def test_prune_removes_interrupted_pulls_directories_but_never_a_running_pulls(two, tmp_path):
    store = copy_store(two["store"], tmp_path / "store")
    running = subprocess.Popen([sys.executable, "-c", HOLD_PULL, str(store), _digest("a")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        held_path = running.stdout.readline().strip()
        assert held_path == str(store / f"{PULL_PREFIX}{'a' * 16}")
        idle = pull_directory(Store(str(store), create=False), _digest("c"))
        (Path(idle.path) / BLOB_DIR / ("c" * 64)).write_bytes(b"x" * 1000)
        idle.close()  # an interrupted pull: its lock is free
        unlocked = store / f"{PULL_PREFIX}{'d' * 16}"  # one without a lock file
        (unlocked / BLOB_DIR).mkdir(parents=True)
        res = isep("prune", store, "--keep-last", "5", check=0)
        assert res.stdout.decode().splitlines() == [f"{PULL_PREFIX}{'c' * 16}/", f"{PULL_PREFIX}{'d' * 16}/"]
        assert "2 pull directories" in res.stderr
        assert {p.name for p in store.iterdir() if p.name.startswith(".isep-tmp")} == {Path(held_path).name}
        assert sorted(os.listdir(Path(held_path) / BLOB_DIR)) == ["b" * 64 + ".partial"]
        assert isep("prune", store, "--keep-last", "5", "--dry-run", check=0).stdout == b""
    finally:
        running.communicate("")
    assert running.returncode == 0
    assert isep("prune", store, "--keep-last", "5", check=0).stdout.decode() == f"{PULL_PREFIX}{'a' * 16}/\n"
    assert not [p for p in os.listdir(store) if p.startswith(".isep-tmp")]


def test_a_pull_waiting_for_a_directory_prune_takes_away_makes_a_new_one(two, tmp_path):
    store = Store(str(copy_store(two["store"], tmp_path / "store")), create=False)
    old = pull_directory(store, _digest("e"))
    (Path(old.path) / BLOB_DIR / "stale").write_bytes(b"old")
    old.close()
    prune_fd = os.open(os.path.join(old.path, PULL_LOCK), os.O_RDWR)
    fcntl.flock(prune_fd, fcntl.LOCK_EX)  # a prune holding the lock, about to take the directory away
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(pull_directory(store, _digest("e"), wait=10)))
    waiter.start()
    time.sleep(0.5)
    assert not got  # the pull waits for the lock
    os.rename(old.path, os.path.join(store.path, ".isep-tmp-pruned-x"))
    os.close(prune_fd)
    waiter.join(10)
    new = got[0]
    try:
        assert new.path == old.path and os.listdir(Path(new.path) / BLOB_DIR) == []
        assert pull_directory_in_use(new.path)
        assert not remove_idle_pull_directory(store.path, os.path.basename(new.path))
        with pytest.raises(EnvironmentFailure, match="busy: another isep-join of the same release"):
            pull_directory(store, _digest("e"), wait=0)
    finally:
        new.close()
    assert remove_idle_pull_directory(store.path, os.path.basename(new.path))
    assert not os.path.exists(new.path)
    store.close()
