"""Shared code of the real-engine test tier (loaded by conftest.py and test_engines.py).

Real-engine test tier for isep (marker ``engines``).

Every test in this directory carries ``pytest.mark.engines``.  The tier needs
the engines of ``engines.sh`` (dockerd 20.10 / 26 / 28-containerd-store,
podman, ctr).  Policy when they are not running:

* ``CI`` set (non-empty, not 0/false/no) or ``ISEP_ENGINES=1``: the session
  fixture runs ``engines.sh start``; if that fails the tests FAIL (error).
* otherwise: the tests are skipped with the reason printed.

``ISEP_ENGINES_OUT=DIR`` reuses archives built earlier by ``engines.sh build
DIR`` (rebuilt if DIR lacks ``.complete``); default: a fresh temp dir.
``ISEP_ENGINES_WORK`` is passed through to engines.sh (default
/tmp/isep-engines).

At the end of a session that ran engine tests, the result matrix (producer x
loader -> OK/FAIL) is written to ``ISEP_ENGINES_MATRIX`` (default
build/engines/MATRIX.md, untracked); copying it over the committed
tests/engines/MATRIX.md is a deliberate step, never a side effect of a run.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ENGINES_SH = HERE / "engines.sh"
WORK = Path(os.environ.get("ISEP_ENGINES_WORK", "/tmp/isep-engines"))
MATRIX_MD = Path(os.environ.get("ISEP_ENGINES_MATRIX", REPO / "build" / "engines" / "MATRIX.md"))

# (section, row, column) -> (status, reason)
RESULTS: dict[tuple[str, str, str], tuple[str, str]] = {}
DURATIONS: dict[str, float] = {}     # test function -> summed setup+call+teardown seconds
OUTDIR: list[Path] = []              # the build OUTDIR of this session (for VERSIONS.txt)
_T0 = time.time()


def _truthy(v: str | None) -> bool:
    return bool(v) and v.strip().lower() not in ("0", "false", "no", "off")


def strict_mode() -> bool:
    return _truthy(os.environ.get("CI")) or os.environ.get("ISEP_ENGINES") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "engines: real-engine tier (dockerd 20.10/26/28, podman, ctr, sshd); "
        "setup: bash tests/engines/engines.sh install start",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            p = Path(str(item.fspath)).resolve()
        except OSError:
            continue
        if HERE == p.parent or HERE in p.parents:
            item.add_marker(pytest.mark.engines)


# --------------------------------------------------------------- commands
def run(argv, *, env=None, input=None, timeout=600, cwd=None, check=False):
    """Run argv; return CompletedProcess with bytes stdout/stderr."""
    e = dict(os.environ)
    if env:
        e.update(env)
    r = subprocess.run(argv, env=e, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"command failed (rc={r.returncode}): {shlex.join(map(str, argv))}\n"
                             f"{tail(r.stderr)}")
    return r


def tail(b: bytes | str, n: int = 12) -> str:
    s = b.decode("utf-8", "replace") if isinstance(b, bytes) else b
    lines = s.strip().splitlines()
    return "\n".join(lines[-n:])


def isep_cmd(name: str) -> list[str]:
    """$ISEP_BIN_DIR/isep-NAME if ISEP_BIN_DIR is set (an installed isep),
    else bin/isep-NAME from the checkout, else python -m isep.cli.NAME."""
    if os.environ.get("ISEP_BIN_DIR"):
        return [str(Path(os.environ["ISEP_BIN_DIR"]) / f"isep-{name}")]
    b = REPO / "bin" / f"isep-{name}"
    if b.exists():
        return [str(b)]
    return [sys.executable, "-m", f"isep.cli.{name}"]


def isep_env() -> dict[str, str]:
    pp = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(REPO) + (os.pathsep + pp if pp else "")}


class Engines:
    def __init__(self, state: dict, outdir: Path, tmp: Path):
        self.state = state
        self.out = outdir
        self.tmp = tmp
        self.docker_bin = state["docker"]
        self.podman_argv = state["podman"]
        self.ctr_argv = state["ctr"]
        self.snapshotter = state.get("ctr_snapshotter", "native")

    def docker_env(self, engine: str) -> dict[str, str]:
        return {"DOCKER_HOST": self.state["engines"][engine]["host"],
                "DOCKER_CONFIG": self.state["docker_config"]}

    def docker_argv(self, engine: str, *args) -> list[str]:
        return ["env", f"DOCKER_HOST={self.state['engines'][engine]['host']}",
                f"DOCKER_CONFIG={self.state['docker_config']}", self.docker_bin, *args]

    def docker(self, engine: str, *args, **kw):
        return run([self.docker_bin, *args], env=self.docker_env(engine), **kw)

    def podman(self, *args, **kw):
        return run([*self.podman_argv, *args], **kw)

    def ctr(self, *args, **kw):
        return run([*self.ctr_argv, *args], **kw)

    def loader_argv(self, loader: str) -> list[str]:
        """argv of a command that loads an image archive from stdin."""
        if loader in ("legacy", "oci", "cstore"):
            return self.docker_argv(loader, "load")
        if loader == "podman":
            return [*self.podman_argv, "load"]
        if loader == "ctr":
            return [*self.ctr_argv, "images", "import", "--snapshotter", self.snapshotter, "-"]
        raise ValueError(loader)


def _engines_log_tails() -> str:
    out = []
    for e in ("legacy", "oci", "cstore"):
        f = WORK / "engines" / e / "dockerd.log"
        if f.exists():
            out.append(f"--- {f} (tail)\n" + tail(f.read_bytes(), 8))
    return "\n".join(out)


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    env = {"ISEP_ENGINES_WORK": str(WORK)}
    if not ENGINES_SH.exists():
        pytest.fail(f"{ENGINES_SH} missing")
    st = run(["bash", str(ENGINES_SH), "status"], env=env, timeout=120)
    if st.returncode != 0 and not strict_mode():
        pytest.skip("real engines are not running (" + tail(st.stdout, 3).replace("\n", "; ")
                    + "). Run `bash tests/engines/engines.sh install start` first, "
                    "or set ISEP_ENGINES=1 (or CI) to start them and fail if they cannot run.")
    r = run(["bash", str(ENGINES_SH), "start"], env=env, timeout=300)
    if r.returncode != 0:
        if st.returncode != 0:
            run(["bash", str(ENGINES_SH), "stop"], env=env, timeout=300)
        pytest.fail("engines.sh start failed (rc=%d):\n%s\n%s\nInstall with: bash tests/engines/engines.sh install"
                    % (r.returncode, tail(r.stderr, 30), _engines_log_tails()), pytrace=False)
    out_env = os.environ.get("ISEP_ENGINES_OUT")
    if out_env:
        out = Path(out_env).resolve()
    else:
        out = tmp_path_factory.mktemp("engines-out")
    if not (out / ".complete").exists():
        t0 = time.time()
        b = run(["bash", str(ENGINES_SH), "build", str(out)], env=env, timeout=900)
        if b.returncode != 0:
            pytest.fail(f"engines.sh build {out} failed (rc={b.returncode}):\n{tail(b.stderr, 40)}",
                        pytrace=False)
        RESULTS[("timing", "engines.sh build", "seconds")] = ("%.1f" % (time.time() - t0), "")
    OUTDIR.append(out)
    state = json.loads((WORK / "engines.json").read_text())
    yield Engines(state, out, tmp_path_factory.mktemp("engines-work"))
    if st.returncode != 0:   # this session started the engines: stop them again
        run(["bash", str(ENGINES_SH), "stop"], env=env, timeout=300)


# --------------------------------------------------------------- results
@contextlib.contextmanager
def cell(section: str, row: str, column: str):
    """Record the outcome of the enclosed block as a MATRIX.md cell."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - classify, then re-raise
        if isinstance(e, pytest.xfail.Exception):
            RESULTS[(section, row, column)] = ("ENGINE-LIMIT", _one_line(str(e)))
        elif isinstance(e, pytest.skip.Exception):
            RESULTS[(section, row, column)] = ("SKIP", _one_line(str(e)))
        else:
            RESULTS[(section, row, column)] = ("FAIL", _one_line(str(e)))
        raise
    else:
        RESULTS.setdefault((section, row, column), ("OK", ""))


def _one_line(s: str, n: int = 200) -> str:
    s = s.strip().split("\n", 1)[0] if s.strip() else ""
    # stable text for a committed file: no per-run temp names
    s = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "$TMP/", s)
    s = s.replace(str(WORK), "$ISEP_ENGINES_WORK")
    s = re.sub(r"docker-import-\d+", "docker-import-N", s)
    s = " ".join(s.split())
    s = s.replace("|", "\\|")
    return s if len(s) <= n else s[: n - 1] + "…"


SECTION_TITLES = {
    "roundtrip": "1. pack → verify → join → byte-exact `cmp` with the original save",
    "load": "2. `isep-join … | LOADER load` (producer archive × loader): tags + RootFS.Layers",
    "release": "3. release update: app1:1 then app1:2 into one store (only a new app part), join app1:2, load",
    "ssh": "4. ssh hop: `isep-pack … -o - --parts app | ssh … 'isep-join STORE - | load'`",
    "isula": "5. isula-build separated bundles: `isep-join DIR IMAGE | LOADER load`",
    "variants": "extra: `isep-pack` options (verify, byte-exact join, load)",
    "thin": "6. thin join: `isep-join … --have <(docker inspect base lib) | LOADER load` with base and lib in the engine",
    "refusals": "extra: refusals (foreign lib → exit 6; corrupt part → verify exit 5, join fails, loader gets no image)",
}


def pytest_runtest_logreport(report):
    name = report.nodeid.split("::")[-1].split("[")[0]
    DURATIONS[name] = DURATIONS.get(name, 0.0) + float(getattr(report, "duration", 0.0) or 0.0)


def pytest_sessionfinish(session, exitstatus):
    if not any(k[0] != "timing" for k in RESULTS):
        return
    lines = ["# isep real-engine result matrix", "",
             f"Generated by `pytest -m engines tests/engines` at "
             f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%SZ')} "
             f"(session {time.time() - _T0:.0f} s, pytest exit status {int(exitstatus)}).", "",
             "OK = passed; FAIL = isep or test failure (reason = first line of the assertion);",
             "ENGINE-LIMIT = the loader also rejects the ORIGINAL save (not an isep problem);",
             "SKIP = not run; blank = not applicable / not run in this session.", ""]
    for key, title in SECTION_TITLES.items():
        cells = {(r, c): v for (sec, r, c), v in RESULTS.items() if sec == key}
        if not cells:
            continue
        rows = sorted({r for r, _ in cells}, key=_row_key)
        cols = sorted({c for _, c in cells}, key=_col_key)
        lines += [f"## {title}", "", "| producer / archive | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for r in rows:
            vals = []
            for c in cols:
                st, why = cells.get((r, c), ("", ""))
                vals.append(st + (f": {why}" if why and st != "OK" else ""))
            lines.append(f"| {r} | " + " | ".join(vals) + " |")
        lines.append("")
        n = {}
        for st, _ in cells.values():
            n[st] = n.get(st, 0) + 1
        lines += ["Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())), ""]
    t = {r: v for (sec, r, c), v in RESULTS.items() if sec == "timing"}
    lines += ["## Timings", ""] + [f"- {r}: {v[0]} s" for r, v in sorted(t.items())]
    lines += [f"- {k} (all parameters): {v:.1f} s" for k, v in sorted(DURATIONS.items())] + [""]
    if OUTDIR and (OUTDIR[-1] / "VERSIONS.txt").exists():
        vt = (OUTDIR[-1] / "VERSIONS.txt").read_text().replace(str(WORK), "$ISEP_ENGINES_WORK")
        lines += ["## Versions (engines.sh build)", "", "```", vt.strip(), "```", ""]
    try:
        MATRIX_MD.parent.mkdir(parents=True, exist_ok=True)
        MATRIX_MD.write_text("\n".join(lines))
    except OSError as exc:
        print(f"engine tier: cannot write {MATRIX_MD}: {exc}", file=sys.stderr)
    else:
        print(f"engine tier: result matrix in {MATRIX_MD} (commit it as tests/engines/MATRIX.md deliberately)",
              file=sys.stderr)


_PROD_ORDER = ["docker-legacy", "docker-oci", "docker-cstore", "podman-docker-archive",
               "podman-oci-archive", "umoci", "sep-with-lib", "sep-no-lib", "sep-renamed"]
_COL_ORDER = ["pack+verify+join+cmp", "index", "legacy", "oci", "cstore", "podman", "ctr", "result"]


def _row_key(r: str):
    p = r.split(" ")[0]
    return (_PROD_ORDER.index(p) if p in _PROD_ORDER else 99, r)


def _col_key(c: str):
    return (_COL_ORDER.index(c) if c in _COL_ORDER else 99, c)


# --------------------------------------------------------------- ssh hop
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ssh_server():
    """A test-only sshd on 127.0.0.1 (keys in WORK), for the ssh hop tests: yields {ssh, dir, port}."""
    sshd_bin = "/usr/sbin/sshd"
    for exe in (sshd_bin, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not exe or not os.path.exists(exe):
            pytest.fail(f"openssh missing ({exe}); run: bash tests/engines/engines.sh install")
    d = WORK / f"sshd-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for k in ("hostkey", "clientkey"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"isep-test-{k}", "-f", str(d / k)],
            check=True)
    shutil.copy(d / "clientkey.pub", d / "authorized_keys")
    port = _free_port()
    cfg = d / "sshd_config"
    cfg.write_text(f"""# test-only sshd of the isep engines tier
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/hostkey
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
""")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
    t = run([sshd_bin, "-t", "-f", str(cfg)])
    if t.returncode != 0:
        pytest.fail(f"sshd -t: {tail(t.stderr)}")
    log = open(d / "sshd.log", "wb")
    p = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if p.poll() is not None:
                pytest.fail(f"sshd exited rc={p.returncode}: {tail((d / 'sshd.log').read_bytes())}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("sshd did not listen")
        ssh = ["ssh", "-p", str(port), "-i", str(d / "clientkey"), "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
               "root@127.0.0.1"]
        r = run(ssh + ["true"], timeout=60)
        if r.returncode != 0:
            pytest.fail(f"ssh to the test sshd failed: {tail(r.stderr)}; {tail((d / 'sshd.log').read_bytes())}")
        yield {"ssh": ssh, "dir": d, "port": port}
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def running_docker26(work_dir: Path) -> Engines:
    """Docker 26 (engine "oci") of a running engine tier, for tests that load into that engine only;
    skips (fails under ISEP_ENGINES=1 or CI) when it is not running."""
    st = run(["bash", str(ENGINES_SH), "status"], env={"ISEP_ENGINES_WORK": str(WORK)}, timeout=120)
    if "oci: running" not in st.stdout.decode(errors="replace") or not (WORK / "engines.json").exists():
        message = f"dockerd 26 (oci) is not running: {tail(st.stdout, 3)}"
        if strict_mode():
            pytest.fail(message + "; start it with bash tests/engines/engines.sh start", pytrace=False)
        pytest.skip(message)
    return Engines(json.loads((WORK / "engines.json").read_text()), WORK, work_dir)
