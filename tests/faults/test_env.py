"""Faults of the environment: a full disk (a 2 MiB tmpfs), SIGINT/SIGTERM/SIGKILL in the middle of a
pack, a stdout closed by its reader, two packs into one store at once, output directories that are
symbolic links or not writable."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import (
    Sandbox,
    bundle_doc,
    check_sandbox,
    copy_store,
    is_complete_archive,
    isep,
    pack_args,
    run,
    start,
)

# --- a small tmpfs -----------------------------------------------------------------------------------

@contextmanager
def _mounted_tmpfs(sb, size: str):
    """A tmpfs of SIZE inside the sandbox (root only). In CI it must work: the test fails there
    instead of skipping."""
    mnt = sb.root / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs ({proc.stderr.strip() or proc.returncode}); run as root"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tmpfs(sb):
    with _mounted_tmpfs(sb, "2m") as mnt:
        yield mnt


def _fill(mnt: Path, size: int, free: int) -> None:
    """Leave about FREE bytes free on the tmpfs of SIZE bytes at MNT."""
    used = sum(p.stat().st_size for p in mnt.rglob("*") if p.is_file())
    filler = size - used - free
    if filler > 0:
        (mnt / "filler").write_bytes(os.urandom(filler) if filler < (1 << 20) else bytes(filler))


@pytest.fixture(scope="module")
def big_samples(tmp_path_factory):
    """Samples whose parts do not fit in 2 MiB (1 MiB of random data per layer file)."""
    from isep.samples import write_sample_set
    return write_sample_set(tmp_path_factory.mktemp("big-samples") / "s", "docker-oci", layer_kib=1024)


@pytest.mark.parametrize("how", ["file", "pipe"])
def test_disk_full_during_first_pack(how, tmpfs, big_samples, sb):
    s = big_samples
    store = tmpfs / "store"
    args = pack_args(s) if how == "file" else pack_args(s)[1:]
    res = run("pack", *args, "-o", store, stdin=s["app1"] if how == "pipe" else None,
              expect=3, sandbox=sb, out=tmpfs)
    assert "no space left on device" in res.error
    assert not store.exists() or sorted(p.name for p in store.iterdir()) in ([], ["isep-bundle.lock"])


@pytest.mark.parametrize("free_kib", [64, 192, 320, 448])
def test_disk_full_at_every_stage_of_an_update(free_kib, tmpfs, samples, stores, sb):
    """A store that holds a bundle, then a second pack with only so much room left: it fails
    cleanly (3, the store as it was and still verified) or succeeds completely."""
    store = copy_store(stores["docker-oci"], tmpfs / "store")
    _fill(tmpfs, 2 << 20, free_kib << 10)
    s = samples["docker-oci"]
    res = run("pack", *pack_args(s, "app2"), "-o", store, expect=(0, 3), sandbox=sb, out=tmpfs)
    run("verify", store, sandbox=sb, out=tmpfs)
    tags = [t for im in bundle_doc(store)["images"] for t in im["tags"]]
    assert ("isep-sample/app2:1" in tags) == (res.rc == 0)


def test_disk_full_during_join(tmpfs, stores, sb):
    store = copy_store(stores["docker-oci"], sb.work / "store")
    (tmpfs / "old.tar").write_bytes(b"an older archive")
    (tmpfs / "filler").write_bytes(bytes((2 << 20) - (64 << 10)))
    res = run("join", store, "-o", tmpfs / "old.tar", expect=3, sandbox=sb, out=tmpfs / "old.tar")
    assert res.error.endswith(f"cannot write {tmpfs / 'old.tar'}: no space left on device")
    assert (tmpfs / "old.tar").read_bytes() == b"an older archive"
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler", "old.tar"]


def test_join_into_a_missing_directory_names_the_output(stores, sb):
    store = copy_store(stores["docker-oci"], sb.work / "store")
    target = sb.out / "no-such-dir" / "app.tar"
    res = run("join", store, "-o", target, expect=3, sandbox=sb)
    assert res.error.endswith(f"cannot write {target}: No such file or directory")


@pytest.mark.parametrize("free_kib", [16, 512, 2048])
def test_disk_full_while_a_device_keeps_a_delta_stream(free_kib, rel, sb):
    """isep-join STORE - --keep of a multi-image delta stream on a device with little room: the
    stream is received, app:2's delta part rebuilt and kept in STORE. Out of room at any of these
    steps: exit 3, one line naming the file and the full disk, no archive a loader takes, the store as
    it was; else the image and the kept part."""
    stream = isep("pack", rel["r2+r3"], "--base", rel["base1"], "-o", "-", "--parts", "app",
                  "--delta-from", rel["build"], check=0).stdout
    with _mounted_tmpfs(sb, "4m") as mnt:
        store = copy_store(rel["build"], mnt / "store")
        before = sorted(p.name for p in store.iterdir())
        _fill(mnt, 4 << 20, free_kib << 10)
        res = run("join", store, "-", "--image", "isep-delta/app:2", "--keep", stdin=stream, expect=(0, 3),
                  sandbox=sb, out=mnt)
        run("verify", store, sandbox=sb, out=mnt)
        if res.rc == 3:
            assert "no space left on device" in res.error and str(store) in res.error
            assert not is_complete_archive(res.stdout)
            assert sorted(p.name for p in store.iterdir()) == before
        else:
            assert is_complete_archive(res.stdout) and (store / "app_2_app_image.tar.zst").exists()
    assert free_kib < 2048 or res.rc == 0  # with room to spare, the keep succeeds


# --- signals -----------------------------------------------------------------------------------------

@contextmanager
def _all_but_the_end(path: Path, keep: int = 1024):
    """A pipe for a command's stdin that carries every byte of PATH but the last KEEP (the tar
    trailer) and stays open until the block ends: the command is still waiting for its input
    whenever the test signals it, however fast or slow the machine."""
    data = path.read_bytes()
    read_fd, write_fd = os.pipe()
    done = threading.Event()

    def feed() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            try:
                pipe.write(data[:-keep])
            except BrokenPipeError:  # the command is gone already
                pass
            done.wait()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    stdin = open(read_fd, "rb", buffering=0)
    try:
        yield stdin
    finally:
        stdin.close()  # then a writer still blocked on a command that is gone gets EPIPE
        done.set()
        writer.join(30)


def _wait_for_temps(directory: Path, timeout: float = 20) -> None:
    """Until the command has a temporary file in DIRECTORY (polled: nothing else announces it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if directory.is_dir() and any(p.name.startswith(".isep-tmp-") for p in directory.iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError(f"the command never started writing into {directory}")


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("existing", [False, True], ids=["first-pack", "update"])
def test_signal_mid_pack(signum, status, existing, samples, stores, sb):
    s = samples["docker-legacy"]
    if existing:
        copy_store(stores["docker-legacy"], sb.out)
    with _all_but_the_end(s["app1-2" if existing else "app1"]) as stdin:
        proc = start("pack", *pack_args(s)[1:], "-o", sb.out, stdin=stdin, sandbox=sb)
        _wait_for_temps(sb.out)
        proc.signal(signum)
        res = proc.finish(status)
    assert res.error.endswith(f"interrupted by signal {int(signum)}")
    if existing:
        run("verify", sb.out, sandbox=sb)
    else:
        assert not sb.out.exists()


def test_sigkill_mid_pack_leaves_only_temporary_dot_files(samples, stores, sb):
    s = samples["docker-legacy"]
    copy_store(stores["docker-legacy"], sb.out)
    before = bundle_doc(sb.out)
    with _all_but_the_end(s["app1-2"]) as stdin:
        proc = start("pack", *pack_args(s)[1:], "-o", sb.out, stdin=stdin, sandbox=sb)
        _wait_for_temps(sb.out)
        proc.signal(signal.SIGKILL)
        proc.finish(-9, killed=True)
    leftovers = [p.name for p in sb.out.iterdir() if p.name.startswith(".isep-tmp-")]
    assert leftovers and bundle_doc(sb.out) == before
    res = run("verify", sb.out, sandbox=sb)  # still sound; the leftovers are reported, not failed
    assert any(c["check"] == "leftover" for c in res.json["checks"])
    run("pack", *pack_args(s, "app1-2"), "-o", sb.out, sandbox=sb)  # and the next pack works
    run("verify", sb.out, sandbox=sb)


def test_sigint_while_receiving_a_bundle_stream(samples, stores, sb):
    """join STORE - interrupted while the stream arrives: its receiving directory is removed."""
    s = samples["docker-oci"]
    copy_store(stores["docker-oci"], sb.out)
    stream = sb.put("stream", run("pack", *pack_args(s, "app1-2"), "-o", "-", "--parts", "app").stdout)
    with _all_but_the_end(stream) as stdin:
        proc = start("join", sb.out, "-", "-o", sb.work.parent / "joined.tar", stdin=stdin, sandbox=sb)
        _wait_for_temps(sb.out)
        proc.signal(signal.SIGINT)
        proc.finish(130)
    assert not (sb.work.parent / "joined.tar").exists()


# --- a closed stdout -------------------------------------------------------------------------------

def _into_head(cmd: str, args: list, nbytes: int, sb: Sandbox) -> tuple[int, str]:
    head = subprocess.Popen(["head", "-c", str(nbytes)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc = start(cmd, *args, sandbox=sb, stdout=head.stdin)
    head.stdin.close()
    res = proc.finish((0, 141))
    head.wait()
    return res.rc, res.stderr


@pytest.fixture(scope="module")
def many_members(tmp_path_factory, samples):
    """An archive with 6000 members: its index is megabytes of JSON."""
    from . import craft
    extra = [craft.member(f"junk/{i:05d}", b"x") for i in range(6000)]
    path = tmp_path_factory.mktemp("many") / "many.tar"
    path.write_bytes(craft.with_members(samples["docker-oci"]["app1"].read_bytes(), extra))
    return path


@pytest.mark.parametrize("case", ["join", "index-big", "pack-stream", "verify"])
def test_closed_stdout_is_quiet(case, stores, samples, many_members, sb):
    s = samples["docker-oci"]
    cmd, args, n = {
        "join": ("join", [stores["docker-oci"]], 10),
        "index-big": ("index", [many_members], 1),
        "pack-stream": ("pack", pack_args(s) + ["-o", "-"], 1),
        "verify": ("verify", [stores["docker-oci"]], 1),
    }[case]
    rc, stderr = _into_head(cmd, args, n, sb)
    assert rc in (0, 141) and stderr in ("",) or rc == 0
    if case in ("join", "index-big", "pack-stream"):
        assert rc == 141


# --- concurrency ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("round_", range(3))
def test_two_packs_into_one_store_at_once(round_, samples, sb):
    s = samples["docker-oci"]
    before = sb.snapshot()  # checked once both are done: each sees the other's temporary files
    a = start("pack", *pack_args(s, "app1"), "-o", sb.out, env=sb.env(), cwd=sb.work)
    b = start("pack", *pack_args(s, "app2")[1:], "-o", sb.out, stdin=s["app2"], env=sb.env(), cwd=sb.work)
    a.finish(0)
    b.finish(0)
    check_sandbox(sb, before, sb.snapshot(), sb.out, 0, False)
    tags = sorted(t for im in bundle_doc(sb.out)["images"] for t in im["tags"])
    assert tags == ["isep-sample/app1:1", "isep-sample/app2:1"]
    run("verify", sb.out, sandbox=sb)
    for image in bundle_doc(sb.out)["images"]:  # byte for byte, unless it shares another save's base
        name = image["tags"][0]
        joined = run("join", sb.out, name, sandbox=sb).stdout
        original = s[name.split("/")[1].split(":")[0]].read_bytes()
        if image["byte_exact"]:
            assert joined == original
        else:
            assert _layers(joined, sb) == _layers(original, sb)


def _layers(archive: bytes, sb) -> list:
    doc = run("index", stdin=archive, sandbox=sb).json
    return [(im["config"]["digest"], im["diff_ids"]) for im in doc["images"]]


# --- output directories that cannot be used ------------------------------------------------------------------------

def test_output_directory_is_a_symlink(samples, sb):
    target = sb.sibling / "target"
    target.mkdir()
    sb.out.symlink_to(target)
    res = run("pack", *pack_args(samples["docker-oci"]), "-o", sb.out, expect=3, sandbox=sb)
    assert "symbolic link" in res.error and list(target.iterdir()) == []


def test_output_directory_is_a_file(samples, sb):
    sb.out.write_bytes(b"a file")
    run("pack", *pack_args(samples["docker-oci"]), "-o", sb.out, expect=3, sandbox=sb)


def test_output_directory_read_only_bind_mount(samples, stores, sb):
    src = sb.root / "ro-src"
    copy_store(stores["docker-oci"], src)
    sb.out.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src), str(sb.out)], capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"bind mount failed: {mounted.stderr}")
        pytest.skip(f"bind mount failed: {mounted.stderr}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(sb.out)], check=True)
        res = run("pack", *pack_args(samples["docker-oci"], "app2"), "-o", sb.out, expect=3, sandbox=sb)
        assert "Read-only" in res.error or "read-only" in res.error
        run("join", sb.out, "-o", sb.out / "joined.tar", expect=3, sandbox=sb)
        run("verify", sb.out, sandbox=sb)
    finally:
        subprocess.run(["umount", "-l", str(sb.out)], check=False)


def test_output_directory_immutable(samples, sb):
    sb.out.mkdir()
    if subprocess.run(["chattr", "+i", str(sb.out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        run("pack", *pack_args(samples["docker-oci"]), "-o", sb.out, expect=3, sandbox=sb)
    finally:
        subprocess.run(["chattr", "-i", str(sb.out)], check=False)


def test_join_output_is_a_symlink_to_elsewhere(stores, sb):
    """join -o LINK follows the link as cp does: the file it names is replaced, the link stays
    (tests/faults/test_edges.py has the devices, FIFOs and dangling links)."""
    target = sb.sibling / "x"
    sb.out.mkdir()
    (sb.out / "joined.tar").symlink_to(target)
    run("join", stores["docker-oci"], "-o", sb.out / "joined.tar", sandbox=sb, out=target)
    assert (sb.out / "joined.tar").is_symlink() and is_complete_archive(target.read_bytes())
