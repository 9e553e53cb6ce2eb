"""The fault-injection harness: `run` (and `start` for long-running commands) executes bin/isep-<cmd>
as a real process and asserts the invariants every case shares:

* the documented exit status;
* no "Traceback" on stdout or stderr;
* on failure exactly one line `isep-<cmd>: error: ...` on stderr (other lines only warnings), or
  for isep-verify's report (exit 5) its summary line, or nothing at all for a closed stdout (141);
* with a Sandbox: nothing written or changed outside the output location (the sandbox holds the
  inputs, a sibling directory with a canary file and TMPDIR, which must end empty); in an output
  directory no pre-existing file changed or removed, and after a failure no new file but the lock:
  no isep-bundle.json, no `.isep-tmp-*` (after SIGKILL, only dot-prefixed temporary names).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from isep.errors import IsepError
from isep.samples import FORMATS  # noqa: F401 - the producers the sample sets imitate, for tests
from isep.tarstream import Source, TarReader

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin"
DATA = ROOT / "tests" / "data"
REAL = DATA / "real"
ISULA = DATA / "isula"
REAL_FORMATS = {  # fixture folder -> isep format name
    "docker-legacy": "docker-legacy", "docker-oci": "docker-oci", "docker-cstore": "docker-cstore",
    "podman-docker-archive": "podman", "skopeo-docker-archive": "podman",
    "umoci-docker-archive": "podman", "podman-oci-archive": "oci-archive",
    "skopeo-oci-archive": "oci-archive",
}
WITH_INSPECT = ("docker-legacy", "docker-oci", "docker-cstore", "podman-docker-archive")
SAMPLE_LAYER_KIB = 32  # layer size of the session's sample sets (tests/conftest.py)

TEMP_PREFIX = ".isep-tmp-"
LOCK = "isep-bundle.lock"
MUTABLE_ON_SUCCESS = {"isep-bundle.json", "manifest", LOCK}
SUMMARY = re.compile(r"^isep-verify: \d+ of \d+ checks failed$")


# --- results -----------------------------------------------------------------------------------

@dataclass
class Result:
    cmd: str
    argv: list
    rc: int
    stdout: bytes
    stderr: str
    maxrss_kb: Optional[int] = None  # peak RSS of the command, with run(..., rss=True)
    seconds: float = 0.0

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.lines if ": error: " in line]

    @property
    def error(self) -> str:
        errors = self.error_lines
        return errors[0] if errors else ""

    @property
    def json(self):
        return json.loads(self.stdout)

    def failed_checks(self) -> list[dict]:
        return [c for c in self.json["checks"] if c["status"] == "fail"]

    def __str__(self) -> str:
        return f"$ {' '.join(map(str, self.argv))}\nrc={self.rc}\n{self.stderr}"


def command_argv(cmd: str, args) -> list[str]:
    return [sys.executable, str(BIN / f"isep-{cmd}"), *map(str, args)]


def isep(cmd: str, *args, stdin: Optional[bytes] = None, stdin_file=None, cwd=None, check=None,
         env=None) -> Result:
    """Run bin/isep-<cmd> as a separate process with real pipes; no traceback, and exit CHECK if given."""
    argv = command_argv(cmd, args)
    started = time.monotonic()
    proc = subprocess.run(argv, input=stdin, stdin=stdin_file if stdin is None else None,
                          capture_output=True, cwd=cwd, env=env, timeout=600)
    result = Result(cmd, argv[1:], proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"),
                    seconds=time.monotonic() - started)
    assert "Traceback" not in result.stderr, result.stderr
    if check is not None:
        assert result.rc == check, f"isep-{cmd} {args}: rc {result.rc}\n{result.stderr}"
    return result


def pipeline(shell: str, cwd=None) -> subprocess.CompletedProcess:
    """A bash pipeline (pipefail) with bin/ first in PATH."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=cwd, env=env,
                          capture_output=True, timeout=600)


def inspect_layers(folder: str, image: str) -> list[str]:
    doc = json.loads((REAL / folder / f"inspect-{image}.json").read_text())
    return doc[0]["RootFS"]["Layers"]


# --- sandbox -------------------------------------------------------------------------------------

def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind, mode and content hash (files) or target (links)."""
    out: dict[str, tuple] = {}
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, _digest(path))
            else:
                out[rel] = ("other", st.st_mode)
    return out


class Sandbox:
    """A directory tree the commands run in: work/ (inputs, the cwd), sibling/ (a canary that must
    never change), tmp/ (TMPDIR, must end empty) and out/ (the default output location)."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "work"
        self.sibling = root / "sibling"
        self.tmp = root / "tmp"
        self.out = root / "out"
        for d in (self.work, self.sibling, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        (self.sibling / "canary").write_bytes(b"must never change\n")
        (self.sibling / "x").write_bytes(b"a file a hostile name might aim at\n")

    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
        env.update(TMPDIR=str(self.tmp), PYTHONDONTWRITEBYTECODE="1", LC_ALL="C.UTF-8")
        env.update(extra or {})
        return env

    def put(self, name: str, data: bytes) -> Path:
        path = self.work / name
        path.write_bytes(data)
        return path

    def snapshot(self) -> dict[str, tuple]:
        return snapshot(self.root)


def _under(rel: str, prefix: str) -> bool:
    return rel == prefix or rel.startswith(prefix + "/")


def check_sandbox(sb: Sandbox, before: dict, after: dict, out: Path | None, rc: int, killed: bool) -> None:
    out_rel = str(out.relative_to(sb.root)) if out is not None and _inside(out, sb.root) else None
    tmp_rel = str(sb.tmp.relative_to(sb.root))
    # 1. outside the output location nothing changes, and TMPDIR ends empty
    for rel in sorted(set(before) | set(after)):
        if out_rel is not None and _under(rel, out_rel):
            continue
        if _under(rel, tmp_rel) and rel != tmp_rel:
            if not killed:
                assert rel not in after, f"left behind in TMPDIR: {rel}"
            continue
        if killed and rel not in before and Path(rel).name.startswith(TEMP_PREFIX):
            continue  # a temporary file next to a `join -o FILE` output, left by SIGKILL
        assert before.get(rel) == after.get(rel), f"changed outside the output: {rel}: {before.get(rel)} -> {after.get(rel)}"
    if out_rel is None:
        return
    inside_before = {r: v for r, v in before.items() if _under(r, out_rel)}
    inside_after = {r: v for r, v in after.items() if _under(r, out_rel)}
    is_dir = inside_after.get(out_rel, inside_before.get(out_rel, ("dir",)))[0] == "dir"
    if not is_dir:  # an output file (join -o): unchanged unless the command succeeded
        if rc != 0:
            assert inside_after.get(out_rel) == inside_before.get(out_rel), f"output file {out_rel} changed by a failed run"
        return
    # 2. pre-existing files in the output directory: never removed; changed only when allowed
    for rel, value in inside_before.items():
        name = Path(rel).name
        assert rel in inside_after, f"pre-existing {rel} was removed"
        if rc == 0 and name in MUTABLE_ON_SUCCESS:
            continue
        if value[0] == "dir" and rel == out_rel:
            continue
        assert inside_after[rel] == value, f"pre-existing {rel} changed"
    # 3. after a failure: no new file but the lock (after SIGKILL: dot-prefixed temporary names)
    if rc != 0:
        for rel in set(inside_after) - set(inside_before):
            name = Path(rel).name
            if rel == out_rel or name == LOCK:
                continue
            if killed and name.startswith(TEMP_PREFIX):
                continue
            raise AssertionError(f"a failed run left {rel} in the output directory")
    else:
        new_temps = [r for r in inside_after if Path(r).name.startswith(TEMP_PREFIX) and r not in inside_before]
        assert not new_temps, f"temporary files left after success: {new_temps}"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


# --- running commands -------------------------------------------------------------------------------

class Proc:
    """A started isep command; finish() waits and checks the invariants."""

    def __init__(self, cmd: str, args, *, stdin=None, sandbox: Sandbox | None = None, out: Path | None = None,
                 env: dict | None = None, cwd=None, stdout=None, timeout: float = 120, rss: bool = False):
        self.cmd = cmd
        self.argv = command_argv(cmd, args)
        self.rss_file = None
        popen_argv = self.argv
        if rss:  # measured by a small parent: a child forked from pytest inherits pytest's peak RSS
            self.rss_file = (sandbox.root if sandbox else Path(os.environ.get("TMPDIR", "/tmp"))) / f".rss-{os.getpid()}-{id(self)}"
            popen_argv = [sys.executable, "-c", _RSS_WRAPPER, str(self.rss_file), *self.argv]
        self.sandbox = sandbox
        self.out = out if out is not None else (sandbox.out if sandbox else None)
        self.before = sandbox.snapshot() if sandbox else None
        self.timeout = timeout
        data = None
        if isinstance(stdin, (bytes, bytearray)):
            data, stdin_arg = bytes(stdin), subprocess.PIPE
        elif isinstance(stdin, Path):
            stdin_arg = open(stdin, "rb")
        elif stdin is None:
            stdin_arg = subprocess.DEVNULL
        else:
            stdin_arg = stdin
        if env is None and sandbox is not None:
            env = sandbox.env()
        self.started = time.monotonic()
        self.p = subprocess.Popen(popen_argv, stdin=stdin_arg, stdout=stdout or subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env,
                                  cwd=cwd or (sandbox.work if sandbox else None))
        if isinstance(stdin, Path):
            stdin_arg.close()
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._threads = []
        if self.p.stdout is not None:
            self._threads.append(threading.Thread(target=lambda: self._out.append(self.p.stdout.read()), daemon=True))
        self._threads.append(threading.Thread(target=lambda: self._err.append(self.p.stderr.read()), daemon=True))
        if data is not None:
            self._threads.append(threading.Thread(target=self._feed, args=(data,), daemon=True))
        for t in self._threads:
            t.start()

    def _feed(self, data: bytes) -> None:
        try:
            self.p.stdin.write(data)
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                self.p.stdin.close()
            except OSError:
                pass

    @property
    def pid(self) -> int:
        return self.p.pid

    def signal(self, signum: int) -> None:
        self.p.send_signal(signum)

    def wait_raw(self) -> tuple[int, int]:
        timer = threading.Timer(self.timeout, lambda: _kill(self.p.pid))
        timer.start()
        try:
            _, status, usage = os.wait4(self.p.pid, 0)
        finally:
            timer.cancel()
        self.p.returncode = os.waitstatus_to_exitcode(status)
        for t in self._threads:
            t.join(30)
        return self.p.returncode, usage.ru_maxrss

    def finish(self, expect=0, *, report: bool = False, killed: bool = False) -> Result:
        rc, _ = self.wait_raw()
        maxrss = None
        if self.rss_file is not None:
            maxrss = int(self.rss_file.read_text())
            self.rss_file.unlink()
        res = Result(self.cmd, self.argv[1:], rc, b"".join(self._out), b"".join(self._err).decode("utf-8", "replace"),
                     maxrss, time.monotonic() - self.started)
        check_result(res, expect, report=report, killed=killed)
        if self.sandbox is not None:
            check_sandbox(self.sandbox, self.before, self.sandbox.snapshot(), self.out, rc, killed)
        return res


_RSS_WRAPPER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "sys.exit(code if code >= 0 else 128 - code)\n")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_result(res: Result, expect, *, report: bool = False, killed: bool = False) -> None:
    expected = expect if isinstance(expect, (tuple, list, set)) else (expect,)
    assert res.rc in expected, f"expected exit {expect}, got {res.rc}\n{res}"
    assert b"Traceback" not in res.stdout, f"traceback on stdout\n{res}"
    assert "Traceback" not in res.stderr, f"traceback on stderr\n{res}"
    prefix = f"isep-{res.cmd}: "
    lines = res.lines
    if killed or res.rc < 0:
        return
    if res.rc == 141:
        assert res.stderr == "", f"a closed stdout must be quiet\n{res}"
        return
    if res.rc == 0:
        assert not res.error, f"error line on success\n{res}"
        return
    if report and res.rc == 5:  # isep-verify's report: warnings, then its summary line
        assert lines and SUMMARY.match(lines[-1]), f"no report summary\n{res}"
        assert all(line.startswith(prefix) for line in lines), f"stray stderr lines\n{res}"
        assert not res.error, f"a report is not an error\n{res}"
        assert res.json["ok"] is False
        return
    errors = [line for line in lines if line.startswith(prefix + "error: ")]
    assert len(errors) == 1, f"want exactly one '{prefix}error:' line\n{res}"
    others = [line for line in lines if line not in errors]
    assert all(line.startswith(prefix + "warning: ") for line in others), f"stray stderr lines\n{res}"


def start(cmd: str, *args, **kw) -> Proc:
    return Proc(cmd, args, **kw)


def run(cmd: str, *args, expect=0, report: bool = False, killed: bool = False, **kw) -> Result:
    """Run bin/isep-<cmd> with real pipes; check the exit status and the invariants (see above).
    stdin: bytes, a Path, a file object or None; sandbox: check the tree around it; out: the
    output location inside the sandbox (default sandbox.out)."""
    return Proc(cmd, args, **kw).finish(expect, report=report, killed=killed)


# --- stores and archives -----------------------------------------------------------------------------

def pack_args(s: dict, archive: str = "app1") -> list[str]:
    return [str(s[archive]), "--base", str(s["inspect-base"]), "--lib", str(s["inspect-lib"])]


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def bundle_doc(store: Path) -> dict:
    return json.loads((store / "isep-bundle.json").read_text())


def part_files(store: Path) -> dict[str, str]:
    """role -> part file name of a single-image bundle."""
    return {p["role"]: p["file"] for p in bundle_doc(store)["parts"]}


def is_complete_archive(data: bytes) -> bool:
    """True when data is a whole tar (end-of-archive marker) holding an image's metadata: what a
    loader would accept. A failed join must never produce one."""
    names = set()
    try:
        for member in TarReader(Source(io.BytesIO(data), prefetch=False)):
            names.add(member.name)
    except IsepError:
        return False
    return bool(names & {"manifest.json", "index.json"})


def hold_store_lock(store: Path) -> subprocess.Popen:
    """Another process holding the store's lock (flock), until killed."""
    store.mkdir(exist_ok=True)
    holder = subprocess.Popen(["python3", "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"), str(store / "isep-bundle.lock")], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    return holder
