"""The edges of every command: what isep may write over (join -o, isula-build's `manifest`), files in
a bundle that are not regular files (FIFOs, devices, directories), a busy store lock, closed or full
standard streams, usage errors, and forged numbers (issue #11, groups 3, 5b, 6)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.harness import (
    hold_store_lock,
    ROOT,
    bundle_doc,
    command_argv,
    copy_store,
    is_complete_archive,
    pack_args,
    part_files,
    run,
    start,
)

from . import craft

FAST = 30  # seconds: each of these commands takes well under one; a hang is killed and fails the test


def _mknod_null(path: Path) -> None:
    """A character device like /dev/null (root only): the test fails elsewhere than in CI-less runs."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("mknod needs root")


# --- join -o: never clobber what is not ours -----------------------------------------------------

def test_join_output_new_file_gets_umask_permissions(stores, sb):
    out = sb.out / "joined.tar"
    sb.out.mkdir()
    run("join", stores["docker-oci"], "-o", out, sandbox=sb, env=sb.env(), out=out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    assert is_complete_archive(out.read_bytes())


def test_join_output_existing_file_keeps_its_permissions(stores, sb):
    sb.out.mkdir()
    out = sb.out / "joined.tar"
    out.write_bytes(b"old")
    out.chmod(0o640)
    run("join", stores["docker-oci"], "-o", out, sandbox=sb, out=out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and is_complete_archive(out.read_bytes())


def test_join_output_character_device_is_written_in_place(stores, sb):
    sb.out.mkdir()
    null = sb.out / "null"
    _mknod_null(null)
    before = null.lstat()
    run("join", stores["docker-oci"], "-o", null, sandbox=sb, out=null)
    after = null.lstat()
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_join_output_symlink_to_a_device_is_followed(stores, sb):
    """`-o /dev/null` through a link: the link and the device stay what they were."""
    sb.out.mkdir()
    null = sb.out / "null"
    _mknod_null(null)
    (sb.out / "link").symlink_to(null)
    run("join", stores["docker-oci"], "-o", sb.out / "link", sandbox=sb, out=sb.out)
    assert (sb.out / "link").is_symlink() and stat.S_ISCHR(null.lstat().st_mode)


def test_join_output_dev_stdout_is_the_pipe(stores, sb):
    """`-o /dev/stdout` (a link to /proc/self/fd/1, then to pipe:[N]) writes into the pipe."""
    res = run("join", stores["docker-oci"], "-o", "/dev/stdout", sandbox=sb)
    assert is_complete_archive(res.stdout)
    assert res.stdout == run("join", stores["docker-oci"], sandbox=sb).stdout


def test_join_output_fifo_is_written_in_place(stores, sb):
    sb.out.mkdir()
    fifo = sb.out / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    run("join", stores["docker-oci"], "-o", fifo, sandbox=sb, out=fifo, timeout=FAST)
    reader.join(FAST)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and is_complete_archive(got[0])


def test_join_output_symlink_is_followed_like_cp(stores, sb):
    """A link to a regular file: the file it names is replaced (atomically), the link stays."""
    sb.out.mkdir()
    real = sb.out / "real.tar"
    real.write_bytes(b"old")
    (sb.out / "link.tar").symlink_to("real.tar")
    run("join", stores["docker-oci"], "-o", sb.out / "link.tar", sandbox=sb, out=real)
    assert os.readlink(sb.out / "link.tar") == "real.tar" and is_complete_archive(real.read_bytes())


def test_join_output_dangling_symlink_is_refused(stores, sb):
    sb.out.mkdir()
    (sb.out / "link.tar").symlink_to("nowhere.tar")
    res = run("join", stores["docker-oci"], "-o", sb.out / "link.tar", expect=3, sandbox=sb)
    assert "does not exist" in res.error and not (sb.out / "nowhere.tar").exists()


def test_join_output_directory_is_a_usage_error(stores, sb):
    sb.out.mkdir()
    res = run("join", stores["docker-oci"], "-o", sb.out, expect=2, sandbox=sb)
    assert "is a directory" in res.error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- isula-build's manifest: only isep's own is changed -----------------------------------------

@pytest.mark.parametrize("content", [b"my notes\n", b'{"mine": 1}', b"[" * 100_000 + b"]" * 100_000,
                                     b'{"x": {"app": "not-a-part-here"}}'],
                         ids=["text", "json-object", "nested-100k", "foreign-isula"])
def test_pack_leaves_a_manifest_isep_did_not_write(content, samples, sb):
    sb.out.mkdir()
    (sb.out / "manifest").write_bytes(content)
    res = run("pack", *pack_args(samples["docker-oci"]), "-o", sb.out, sandbox=sb)
    assert (sb.out / "manifest").read_bytes() == content
    assert any("was not written by isep" in line for line in res.lines)
    assert "isula_manifest" not in bundle_doc(sb.out)
    run("verify", sb.out, sandbox=sb)


def test_pack_merges_the_manifest_isep_wrote(samples, sb):
    s = samples["docker-oci"]
    run("pack", *pack_args(s), "-o", sb.out, sandbox=sb)
    run("pack", *pack_args(s, "app2"), "-o", sb.out, sandbox=sb)
    entries = json.loads((sb.out / "manifest").read_bytes())
    assert sorted(entries) == ["isep-sample/app1:1", "isep-sample/app2:1"]
    recorded = bundle_doc(sb.out)["isula_manifest"]
    assert recorded == "sha256:" + hashlib.sha256((sb.out / "manifest").read_bytes()).hexdigest()


def test_pack_merges_the_manifest_of_a_store_packed_before_the_record(samples, stores, sb):
    copy_store(stores["docker-oci"], sb.out)
    craft.edit_manifest(sb.out, lambda doc: doc.pop("isula_manifest", None))
    run("pack", *pack_args(samples["docker-oci"], "app2"), "-o", sb.out, sandbox=sb)
    assert sorted(json.loads((sb.out / "manifest").read_bytes())) == ["isep-sample/app1:1", "isep-sample/app2:1"]


def test_pack_leaves_a_manifest_changed_after_isep_wrote_it(samples, stores, sb):
    copy_store(stores["docker-oci"], sb.out)
    changed = (sb.out / "manifest").read_bytes().replace(b"}}", b', "note": "mine"}}')
    (sb.out / "manifest").write_bytes(changed)
    res = run("pack", *pack_args(samples["docker-oci"], "app2"), "-o", sb.out, sandbox=sb)
    assert (sb.out / "manifest").read_bytes() == changed and "was not written by isep" in res.stderr


# --- files in a bundle that are not regular files -----------------------------------------------

def _replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        _mkzero(path)
    elif kind == "directory":
        path.mkdir()


def _mkzero(path: Path) -> None:
    """A character device like /dev/zero: it never ends."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("mknod needs root")


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory"])
def test_a_part_that_is_not_a_regular_file(kind, stores, sb):
    copy_store(stores["docker-oci"], sb.out)
    app = sb.out / part_files(sb.out)["app"]
    _replace_with(app, kind)
    for mode in ([], ["--fast"], ["--deep"]):
        res = run("verify", *mode, sb.out, expect=5, report=True, sandbox=sb, timeout=FAST)
        assert any("not a regular file" in c["detail"] for c in res.failed_checks())
    res = run("join", sb.out, expect=3, sandbox=sb, timeout=FAST)
    assert "not a regular file" in res.error and app.name in res.error


@pytest.mark.parametrize("name", ["isep-bundle.json", "isep-bundle.json.sig", "manifest"])
@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory"])
def test_a_bundle_manifest_that_is_not_a_regular_file(name, kind, stores, samples, sb):
    copy_store(stores["docker-oci"], sb.out)
    if not (sb.out / name).exists():
        (sb.out / name).write_bytes(b"")
    if name == "manifest":  # isula-build's manifest is read when there is no isep-bundle.json
        (sb.out / "isep-bundle.json").unlink()
    _replace_with(sb.out / name, kind)
    for cmd in (["verify", sb.out], ["join", sb.out]):
        res = run(*cmd, expect=3, sandbox=sb, timeout=FAST)
        assert "not a regular file" in res.error and name in res.error
    if name == "isep-bundle.json":  # pack reads only this one (it writes the others anew)
        run("pack", *pack_args(samples["docker-oci"], "app2"), "-o", sb.out, expect=3, sandbox=sb, timeout=FAST)


def test_a_base_ref_store_whose_manifest_is_a_fifo(stores, samples, sb):
    copy_store(stores["docker-oci"], sb.out)
    _replace_with(sb.out / "isep-bundle.json", "fifo")
    res = run("pack", samples["docker-oci"]["app2"], "--base", sb.out, "-o", sb.sibling / "new",
              expect=3, sandbox=sb, out=sb.sibling / "new", timeout=FAST)
    assert "not a regular file" in res.error


def test_a_part_named_by_the_user_may_be_a_pipe(stores, sb):
    """-a <(cat part): a FIFO named on the command line is read like stdin."""
    store = stores["docker-oci"]
    app = store / part_files(store)["app"]
    fifo = sb.work / "app.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as fh:
            fh.write(app.read_bytes())
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    res = run("join", store, "-a", fifo, sandbox=sb, timeout=FAST)
    writer.join(FAST)
    assert res.stdout == run("join", store, sandbox=sb).stdout


def test_a_plan_given_as_a_pipe_still_works(samples, sb):
    s = samples["docker-oci"]
    index = run("index", s["app1"]).stdout
    plan = run("partition", "--base", s["inspect-base"], stdin=index).stdout
    res = subprocess.run(["bash", "-c", 'exec "$@" --plan <(cat "$PLAN")', "_",
                          *command_argv("pack", [s["app1"], "-o", sb.out])],
                         env=sb.env({"PLAN": str(sb.put("plan.json", plan))}), capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    run("verify", sb.out)


# --- a busy store lock ---------------------------------------------------------------------------



@pytest.mark.parametrize("wait", ["0", "1.5"])
def test_pack_into_a_busy_store_gives_up_after_wait(wait, samples, stores, sb):
    copy_store(stores["docker-oci"], sb.out)
    holder = hold_store_lock(sb.out)
    try:
        started = time.monotonic()
        res = run("pack", *pack_args(samples["docker-oci"], "app2"), "-o", sb.out, "--wait", wait,
                  expect=3, sandbox=sb, timeout=FAST)
        assert time.monotonic() - started >= float(wait)
    finally:
        holder.kill()
        holder.wait()
    assert f"held by pid {holder.pid}" in res.error and "busy" in res.error
    waiting = [line for line in res.lines if "waiting for the lock" in line]
    assert len(waiting) == (1 if wait != "0" else 0) and all(str(holder.pid) in w for w in waiting)
    run("verify", sb.out, sandbox=sb)


def test_pack_waits_for_a_lock_that_is_released(samples, stores, sb):
    copy_store(stores["docker-oci"], sb.out)
    holder = hold_store_lock(sb.out)
    try:
        proc = start("pack", *pack_args(samples["docker-oci"], "app2"), "-o", sb.out, sandbox=sb, timeout=FAST)
        time.sleep(1.5)
    finally:
        holder.kill()
        holder.wait()
    res = proc.finish(0)
    assert sum("waiting for the lock" in line for line in res.lines) <= 1
    assert "isep-sample/app2:1" in [t for im in bundle_doc(sb.out)["images"] for t in im["tags"]]


# --- closed and full standard streams ---------------------------------------------------------------

def _with_streams(redirect: str, cmd: str, args: list, sb, stdin: Path | None) -> subprocess.CompletedProcess:
    """Run the command with shell redirections such as `>&-` (stdout closed) or `>/dev/full`;
    stdin is STDIN (or /dev/null) unless the redirections close it."""
    if "<&-" not in redirect:
        redirect += f' <"{stdin or os.devnull}"'
    return subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "_", *command_argv(cmd, args)],
                          cwd=sb.work, env=sb.env(), capture_output=True, timeout=120)


def _commands(stores, samples, sb) -> dict[str, tuple[str, list, Path | None, bool]]:
    """name -> (command, args, what it reads on stdin, whether it writes stdout)."""
    s = samples["docker-oci"]
    store = stores["docker-oci"]
    index = sb.put("index.json", run("index", s["app1"]).stdout)
    return {
        "index-file": ("index", [s["app1"]], None, True),
        "index-stdin": ("index", [], s["app1"], True),
        "partition": ("partition", [index, "--base", s["inspect-base"]], None, True),
        "partition-stdin": ("partition", ["--base", s["inspect-base"]], index, True),
        "verify": ("verify", [store], None, True),
        "join": ("join", [store], None, True),
        "join-o": ("join", [store, "-o", sb.out / "x.tar"], None, False),
        "join-stdin-part": ("join", [store, "-a", "-", "-o", sb.out / "y.tar"], store / part_files(store)["app"],
                            False),
        "pack-dir": ("pack", pack_args(s) + ["-o", sb.out / "store"], None, False),
        "pack-stream": ("pack", pack_args(s) + ["-o", "-"], None, True),
        "help": ("index", ["--help"], None, True),
        "version": ("pack", ["--version"], None, True),
    }


@pytest.mark.parametrize("stream", ["stdin-closed", "stdout-closed", "stderr-closed", "stdout-full"])
def test_closed_or_full_standard_streams(stream, stores, samples, sb):
    """stdin or stdout closed where the command needs it, or stdout full: exit 3 and one line; a
    stream the command does not use may be closed; a closed stderr changes no exit status."""
    sb.out.mkdir()
    redirect = {"stdin-closed": "<&-", "stdout-closed": ">&-", "stderr-closed": "2>&-",
                "stdout-full": ">/dev/full"}[stream]
    for name, (cmd, args, stdin, writes) in _commands(stores, samples, sb).items():
        res = _with_streams(redirect, cmd, args, sb, stdin)
        err = res.stderr.decode(errors="replace")
        assert "Traceback" not in err and "AttributeError" not in err, (name, err)
        needed = (stream == "stdin-closed" and stdin is not None) or (stream.startswith("stdout") and writes)
        if needed:
            assert res.returncode == 3, (name, res.returncode, err)
            errors = [line for line in err.splitlines() if ": error: " in line]
            assert len(errors) == 1 and errors[0].startswith(f"isep-{cmd}: error: "), (name, err)
            assert ("closed" if "closed" in stream else "No space left") in errors[0], (name, err)
        else:
            assert res.returncode == 0 and ": error: " not in err, (name, res.returncode, err)
        for p in (sb.out / "store", sb.out / "x.tar", sb.out / "y.tar"):
            subprocess.run(["rm", "-rf", str(p)], check=True)


def test_closed_stdout_never_lands_in_an_output_file(stores, sb):
    """With fd 1 closed, the first file isep opens would get it; what is printed must not end in it."""
    sb.out.mkdir()
    res = _with_streams(">&-", "join", [stores["docker-oci"], "-o", sb.out / "x.tar"], sb, None)
    assert res.returncode == 0
    assert (sb.out / "x.tar").read_bytes() == run("join", stores["docker-oci"]).stdout


# --- usage errors, forged numbers, configs that are directories -----------------------------------

@pytest.mark.parametrize("argv", [["pack", "--bogus"], ["pack", "x.tar", "--base", "b.json"],
                                  ["pack", "-o", "d", "--base", "b", "--compress", "bogus"],
                                  ["pack", "-o", "d", "--base", "b", "--wait", "-1"],
                                  ["join"], ["verify", "--bogus"], ["index", "a", "b"], ["partition"]])
@pytest.mark.parametrize("umbrella", [False, True])
def test_usage_errors_are_one_line(argv, umbrella, sb):
    cmd, *rest = argv
    python, script = command_argv(cmd, [])
    full = [python, str(ROOT / "bin" / "isep"), cmd, *rest] if umbrella else [python, script, *rest]
    res = subprocess.run(full, cwd=sb.work, env=sb.env(), capture_output=True, stdin=subprocess.DEVNULL,
                         timeout=120)
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"isep-{cmd}: error: "), lines


@pytest.mark.parametrize("number", ["²", "١", "+1", " 1", "1_0", "0x1", "0000001234567890123"])
def test_bundle_stream_chunk_numbers_are_ascii_digits(number, stores, sb):
    head = craft.member("isep-stream.json", b'{"schema": "isep-stream/1"}')
    stream = sb.put("stream", craft.build([head, craft.member("parts/a/000000", b"x"),
                                           craft.member(f"parts/a/{number}", b"y")]))
    res = run("join", "-", stdin=stream, expect=4, sandbox=sb)
    assert "chunk" in res.error
    run("verify", "-", stdin=stream, expect=4, sandbox=sb)


def test_a_config_that_is_a_directory_is_named_so(samples, sb):
    data = samples["docker-oci"]["app1"].read_bytes()
    config = craft.metadata_json(data, "manifest.json")[0]["Config"]
    members, trailer = craft.split(data)
    archive = sb.put("in.tar", craft.build([craft.member(config, typeflag=b"5") if m.name == config else m
                                             for m in members], trailer))
    for cmd in (["index", archive], ["pack", *pack_args(samples["docker-oci"])[1:], archive, "-o", sb.out]):
        res = run(*cmd, expect=4, sandbox=sb)
        assert "config member" in res.error and "is a directory" in res.error


@pytest.mark.parametrize("value", [[[1]], 5, {"a": 1}])
def test_an_isula_manifest_hash_that_is_not_a_string(value, stores, sb):
    """isula-build's manifest with a non-string appHash: bad input (4), a failed check in verify."""
    sb.out.mkdir()
    files = part_files(stores["docker-oci"])
    for role in ("base", "app"):
        (sb.out / files[role]).write_bytes((stores["docker-oci"] / files[role]).read_bytes())
    entry = {"app": files["app"], "base": files["base"], "appHash": value}
    (sb.out / "manifest").write_text(json.dumps({"x:1": entry}))
    res = run("join", sb.out, expect=4, sandbox=sb)
    assert "appHash" in res.error
    run("verify", sb.out, expect=5, report=True, sandbox=sb)


def _damage(plan: dict, path: tuple, value) -> dict:
    doc = json.loads(json.dumps(plan))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


PLAN_DAMAGE = [(("source",), None), (("base",), {}), (("lib",), "x"), (("parts",), []), (("parts", 0), {}),
               (("parts", 0, "role"), None), (("parts", 0, "members"), -1), (("parts", 0, "members", 0), []),
               (("parts", 0, "layers"), []), (("parts", 0, "layers", 0), None), (("parts", 0, "file"), "../x"),
               (("images",), []), (("images", 0), {}), (("images", 0, "app_part"), None),
               (("images", 0, "app_part"), "elsewhere"), (("images", 0, "config"), {}),
               (("images", 0, "layer_paths", 0), []), (("members", 0), {}), (("trailer_size",), "1024"),
               (("images", 0, "legacy_layers"), [])]


@pytest.mark.parametrize("path,value", PLAN_DAMAGE, ids=["/".join(map(str, p)) + f"={v!r}" for p, v in PLAN_DAMAGE])
def test_a_damaged_plan_is_bad_input(path, value, samples, sb):
    """A plan is user input: any damage is exit 4 before anything is written, never exit 1."""
    s = samples["docker-oci"]
    index = run("index", s["app1"]).stdout
    plan = json.loads(run("partition", "--base", s["inspect-base"], "--lib", s["inspect-lib"], stdin=index).stdout)
    damaged = sb.put("plan.json", json.dumps(_damage(plan, path, value)).encode())
    run("pack", s["app1"], "--plan", damaged, "-o", sb.out, expect=4, sandbox=sb)
