#!/usr/bin/env python3
"""isep benchmark harness (a script, not a test). See bench/README.md.

    python bench/bench.py [--size 1G] [--sizes 1G,4G] [--format docker-oci]
                          [--commands index,pack,verify,verify-fast,join] [--out results.json]

For each size: generates a synthetic `docker save` archive (half random, half text-like
data, realistic member layout) with isep.samples, measures this machine's primitives on
the same data, runs the isep commands from bin/ through real pipes (MB/s, peak RSS, peak
temporary bytes), and runs the "isula-style route" baseline (untar, tar|gzip -6 per part,
sha256sum). Commands whose launcher is not in bin/ yet are skipped with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from isep import samples  # noqa: E402

CHUNK = 1 << 20
MB = 1e6

# name -> how to run it. {placeholders} are filled per run. "stdin": the archive is piped
# in with `cat`; "input": which bytes count as the command's input for MB/s.
COMMANDS = {
    "index": {"argv": ["{bin}/isep-index"], "stdin": True, "input": "archive",
              "primitive": "sha256"},
    # pack's primitive is issue #12's: what pack must do at least, every byte hashed and compressed;
    # "also": the ratios to zstd alone, to the primitive writing durably, and to the primitive run the
    # way pack runs (a process fed by cat through a pipe, timed from its start to its exit)
    "pack": {"argv": ["{bin}/isep-pack", "--base", "{base_json}", "--lib", "{lib_json}", "-o", "{parts}"],
             "stdin": True, "input": "archive", "primitive": "sha256_zstd3_mt",
             "also": ["zstd3_mt", "sha256_zstd3_mt_durable", "sha256_zstd3_mt_process"]},
    "verify": {"argv": ["{bin}/isep-verify", "{parts}"], "stdin": False, "input": "parts",
               "primitive": "sha256", "needs": "pack"},
    "verify-fast": {"argv": ["{bin}/isep-verify", "--fast", "{parts}"], "stdin": False, "input": "parts",
                    "primitive": "xxh3_128", "ratio_on": "input", "needs": "pack"},
    "join": {"argv": ["{bin}/isep-join", "{parts}", "{image}"], "stdin": False, "input": "parts",
             "primitive": "zstd_d", "needs": "pack"},
}
# isula-build's layout with gzip, from a pipe: the default level and the others, side by side (they
# write into the same parts dir: run them after verify and join)
_ISULA = ["{bin}/isep-pack", "--base", "{base_json}", "--lib", "{lib_json}", "-o", "{parts}",
          "--format", "isula", "--compress", "gzip"]
for _name, _level in (("pack-isula", []), ("pack-isula-l1", ["--level", "1"]), ("pack-isula-l3", ["--level", "3"]),
                      ("pack-isula-zlib6", ["--level", "6"])):
    COMMANDS[_name] = {"argv": _ISULA + _level, "stdin": True, "input": "archive", "primitive": "zstd3_mt"}
DEFAULT_COMMANDS = "index,pack,verify,verify-fast,join"


# ------------------------------------------------------------------------------ utils

def parse_size(s: str) -> int:
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(float(s))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def aligned_buffer(size: int = CHUNK):
    """A page-aligned, reusable buffer (a plain bytearray halves pipe throughput)."""
    return mmap.mmap(-1, size)


def iter_file(path: Path, limit: int | None = None):
    buf = aligned_buffer()
    mv = memoryview(buf)
    left = limit if limit is not None else 1 << 62
    with open(path, "rb", buffering=0) as f:
        while left > 0:
            n = f.readinto(mv if left >= CHUNK else mv[:left])
            if not n:
                break
            left -= n
            yield mv[:n]


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------ generation

def generate(workdir: Path, size: int, fmt: str, layers: int, seed: int, random_fraction: float,
             name: str = "archive") -> dict:
    fam = samples.big_image_family(size, random_fraction=random_fraction, layers=layers, seed=seed)
    t0 = time.perf_counter()
    samples.diff_ids(fam["app"])  # first pass: diffIDs (and gzip digests for gzip formats)
    if fmt in ("docker-cstore", "oci-archive"):
        for l in fam["app"].layers:
            l.gzip_info()
    t1 = time.perf_counter()
    archive = workdir / f"{name}.tar"
    with open(archive, "wb", buffering=CHUNK) as f:
        samples.write_archive(f, fmt, [fam["app"]])
    t2 = time.perf_counter()
    base_json = workdir / f"{name}-base.json"
    lib_json = workdir / f"{name}-lib.json"
    base_json.write_text(samples.inspect_json(fam["base"], fmt))
    lib_json.write_text(samples.inspect_json(fam["lib"], fmt))
    (workdir / f"{name}-app.json").write_text(samples.inspect_json(fam["app"], fmt))
    return {
        "archive": str(archive), "archive_bytes": archive.stat().st_size,
        "base_json": str(base_json), "lib_json": str(lib_json),
        "image": fam["app"].name, "family": fam,
        "layers": [{"role": r, "diff_id": l.diff_id, "tar_bytes": l.tar_size()}
                   for r, l in _roles(fam)],
        "gen_first_pass_s": round(t1 - t0, 2), "gen_write_s": round(t2 - t1, 2),
    }


def _roles(fam):
    nb, nl = len(fam["base"].layers), len(fam["lib"].layers)
    for i, l in enumerate(fam["app"].layers):
        yield ("base" if i < nb else "lib" if i < nl else "app"), l


# ------------------------------------------------------------------------------ primitives

PIPE_READER = r"""
import fcntl, mmap, sys, time
try:
    fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ
except OSError:
    pass
buf = mmap.mmap(-1, 1 << 20); mv = memoryview(buf); n = 0
f = open(0, "rb", buffering=0)
t0 = None
while True:
    k = f.readinto(mv)
    if t0 is None:
        t0 = time.perf_counter()
    if not k:
        break
    n += k
print(n, time.perf_counter() - t0)
"""


# The sha256 + zstd -3 primitive as a program of its own: the bench runs it the way it runs pack.
PIPE_PRIMITIVE = r"""
import hashlib, mmap, sys, zstandard
buf = memoryview(mmap.mmap(-1, 1 << 20))
sha = hashlib.sha256()
src = open(0, "rb", buffering=0)
with open(sys.argv[1], "wb") as dest:
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(dest, closefd=False) as w:
        while n := src.readinto(buf):
            sha.update(buf[:n])
            w.write(buf[:n])
"""


def primitive_runners(archive: Path, gzip_sample: int, workdir: Path) -> dict:
    """name -> (label, run): each run returns (bytes, seconds, extra fields)."""
    import xxhash
    import zstandard

    size = archive.stat().st_size
    zpath, dpath = workdir / "primitive.zst", workdir / "primitive-d.zst"

    def pipe_read():
        t = time.perf_counter()
        cat = subprocess.Popen(["cat", str(archive)], stdout=subprocess.PIPE)
        out = subprocess.run([sys.executable, "-c", PIPE_READER], stdin=cat.stdout, capture_output=True,
                             text=True)
        cat.stdout.close()
        cat.wait()
        wall = time.perf_counter() - t
        nread, secs = out.stdout.split()
        assert int(nread) == size, out
        return size, float(secs), {"wall_incl_startup_s": round(wall, 3)}

    def hasher(factory):
        def run():
            t = time.perf_counter()
            h = factory()
            for mv in iter_file(archive):
                h.update(mv)
            return size, time.perf_counter() - t, {}
        return run

    def zstd_1t():
        t = time.perf_counter()
        co = zstandard.ZstdCompressor(level=3).compressobj()
        zout = 0
        for mv in iter_file(archive):
            zout += len(co.compress(mv))
        zout += len(co.flush())
        return size, time.perf_counter() - t, {"ratio": round(size / zout, 2)}

    class HashedFile:
        """The output file, its bytes hashed as they are written (what pack does for the manifest)."""

        def __init__(self, f):
            self.f, self.sha = f, hashlib.sha256()

        def write(self, data):
            self.sha.update(data)
            return self.f.write(data)

    def zstd_mt(hashed: bool = False, durable: bool = False):
        """zstd -3 on all cores; hashed: each chunk hashed with sha256 first, in the same pass;
        durable: the output hashed too and synced to disk at the end, as pack must. The output is
        removed at once, its pages never written back: a paired command run that follows would
        otherwise start while the disk takes them (a 1 GiB pack: 2.8-3.5 s against 2.3)."""
        def run():
            t = time.perf_counter()
            sha = hashlib.sha256()
            with open(zpath, "wb") as f:
                out = HashedFile(f) if durable else f
                with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(out, closefd=False) as w:
                    for mv in iter_file(archive):
                        if hashed:
                            sha.update(mv)
                        w.write(mv)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            secs = time.perf_counter() - t
            ratio = round(size / zpath.stat().st_size, 2)
            zpath.unlink()
            return size, secs, {"ratio": ratio}
        return run

    def zstd_mt_process():
        """The issue's primitive timed as pack is (run_command): `cat archive | /usr/bin/time -v python
        prim.py OUT`, from before cat starts to after both exit. It pays what every command pays and
        the in-process loop does not: an interpreter's start and exit, cat, and the pipe."""
        script = workdir / "primitive-process.py"
        script.write_text(PIPE_PRIMITIVE)
        rss = workdir / "rss-primitive.txt"
        t = time.perf_counter()
        cat = subprocess.Popen(["cat", str(archive)], stdout=subprocess.PIPE)
        proc = subprocess.run(rss_wrapper(rss) + [sys.executable, str(script), str(zpath)], stdin=cat.stdout)
        cat.stdout.close()
        cat.wait()
        secs = time.perf_counter() - t
        assert proc.returncode == 0 and cat.returncode == 0, proc
        ratio = round(size / zpath.stat().st_size, 2)
        zpath.unlink()
        rss.unlink(missing_ok=True)
        return size, secs, {"ratio": ratio}

    def zstd_d():
        if not dpath.exists():  # its input, made once, untimed
            with open(archive, "rb") as src, open(dpath, "wb") as dst:
                zstandard.ZstdCompressor(level=3, threads=-1).copy_stream(src, dst)
            os.sync()
        t = time.perf_counter()
        buf = aligned_buffer()
        n = 0
        with open(dpath, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
            while True:
                k = r.readinto(buf)
                if not k:
                    break
                n += k
        return n, time.perf_counter() - t, {}

    gz_bytes = min(size, gzip_sample)

    def gzip6():
        t = time.perf_counter()
        co = zlib.compressobj(6, zlib.DEFLATED, 31)
        gout = 0
        for mv in iter_file(archive, gz_bytes):
            gout += len(co.compress(mv))
        gout += len(co.flush())
        return gz_bytes, time.perf_counter() - t, {"ratio": round(gz_bytes / gout, 2)}

    plan = [
        ("pipe_read", "pipe: cat | python readinto(1 MiB, aligned)", pipe_read),
        ("sha256", "hashlib.sha256 (page cache)", hasher(hashlib.sha256)),
        ("xxh3_128", "xxhash.xxh3_128 (page cache)", hasher(xxhash.xxh3_128)),
        ("zstd3_1t", "zstd -3, 1 thread", zstd_1t),
        ("zstd3_mt", "zstd -3, threads=-1", zstd_mt()),
        ("sha256_zstd3_mt", "sha256 + zstd -3 threads=-1, one pass", zstd_mt(hashed=True)),
        ("sha256_zstd3_mt_durable", "the same + sha256 of the output, fsynced", zstd_mt(hashed=True, durable=True)),
        ("sha256_zstd3_mt_process", "sha256 + zstd -3 as a process: cat | python", zstd_mt_process),
        ("zstd_d", "zstd decompress (stream_reader.readinto)", zstd_d),
        ("gzip6", f"gzip -6 (zlib, first {human(gz_bytes)})", gzip6),
    ]
    return {key: (label, fn) for key, label, fn in plan}


def synced(fn):
    os.sync()  # as before each command run: no earlier writes flushing meanwhile
    return fn()


def primitive_speed(run) -> float:
    nbytes, secs, _ = synced(run)
    return nbytes / secs / MB


def measure_primitives(runners: dict, archive: Path, log, repeat: int = 1) -> dict:
    """Each primitive ``repeat`` times on the archive; the median run is reported."""
    for _ in iter_file(archive):  # warm the page cache
        pass
    res: dict[str, dict] = {}
    for key, (label, fn) in runners.items():
        runs = sorted((synced(fn) for _ in range(max(1, repeat))), key=lambda r: r[0] / r[1])
        nbytes, secs, extra = runs[len(runs) // 2]
        res[key] = {"what": label, "bytes": nbytes, "seconds": round(secs, 3),
                    "MBps": round(nbytes / secs / MB, 1) if secs > 0 else None, **extra}
        if repeat > 1:
            res[key]["all_MBps"] = [round(r[0] / r[1] / MB, 1) for r in runs]
        log(f"  {label:<44} {res[key]['MBps']:>8} MB/s")
    return res


# ------------------------------------------------------------------------------ running commands

def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


class TempSampler(threading.Thread):
    """Peak bytes of temporary files, sampled every 50 ms: all files under TMPDIR, files
    in the output dir named *.isep-tmp* / .isep-tmp* / *.tmp, and deleted-but-open or
    O_TMPFILE files held by the command's processes in either place. A file that is in the
    end renamed into the output (a part written under a temporary name) is output, not
    temporary disk, and is left out of the peak."""

    def __init__(self, tmpdir: Path, outdir: Path | None, root_pid: int | None = None, period=0.05):
        super().__init__(daemon=True)
        self.tmpdir, self.outdir, self.root_pid, self.period = tmpdir, outdir, root_pid, period
        self.peak = 0
        self._halt = threading.Event()

    def sample(self) -> dict:
        seen: dict[tuple, int] = {}
        for root, _d, files in os.walk(self.tmpdir):
            for n in files:
                try:
                    st = os.lstat(os.path.join(root, n))
                    seen[(st.st_dev, st.st_ino)] = st.st_size
                except OSError:
                    pass
        if self.outdir is not None and self.outdir.exists():
            for root, _d, files in os.walk(self.outdir):
                for n in files:
                    if ".isep-tmp" in n or n.endswith(".tmp"):
                        try:
                            st = os.lstat(os.path.join(root, n))
                            seen[(st.st_dev, st.st_ino)] = st.st_size
                        except OSError:
                            pass
        if self.root_pid:
            places = [str(self.tmpdir)] + ([str(self.outdir)] if self.outdir else [])
            for pid in _descendants(self.root_pid):
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if not any(target.startswith(p) for p in places):
                        continue
                    if "(deleted)" in target or "/#" in target or ".isep-tmp" in target:
                        try:
                            st = os.stat(f"/proc/{pid}/fd/{fd}")
                            seen[(st.st_dev, st.st_ino)] = st.st_size
                        except OSError:
                            pass
        return seen

    def run(self):
        self.snapshots = []
        while not self._halt.is_set():
            self.snapshots.append(self.sample())
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()
        self.snapshots.append(self.sample())
        output = set()
        if self.outdir is not None and self.outdir.exists():
            for entry in os.scandir(self.outdir):
                if entry.is_file(follow_symlinks=False) and ".isep-tmp" not in entry.name:
                    st = entry.stat(follow_symlinks=False)
                    output.add((st.st_dev, st.st_ino))
        self.peak = max((sum(v for k, v in snap.items() if k not in output) for snap in self.snapshots),
                        default=0)


def rss_wrapper(rss_file: Path) -> list[str]:
    if os.access("/usr/bin/time", os.X_OK):
        return ["/usr/bin/time", "-v", "-o", str(rss_file)]
    code = ("import resource,subprocess,sys;r=subprocess.call(sys.argv[2:]);"
            "open(sys.argv[1],'w').write('Maximum resident set size (kbytes): %d\\n'"
            "%resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r)")
    return [sys.executable, "-c", code, str(rss_file)]


def read_rss_kib(rss_file: Path) -> int | None:
    try:
        for line in rss_file.read_text().splitlines():
            if "Maximum resident set size" in line:
                return int(line.rsplit(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def launcher_missing(exe: str) -> str | None:
    """Why the launcher can't run yet, or None. bin/isep-<cmd> links to bin/_launch, which
    runs the module isep.cli.<cmd>: check that module exists too."""
    rel = os.path.relpath(exe, REPO)
    if not os.access(exe, os.X_OK):
        return f"{rel} not found (yet)"
    if os.path.basename(os.path.realpath(exe)) == "_launch":
        mod = os.path.basename(exe).replace("isep-", "", 1).replace("-", "_")
        cli = Path(os.path.realpath(exe)).parent.parent / "isep" / "cli"
        if not ((cli / f"{mod}.py").exists() or (cli / mod / "__init__.py").exists()):
            return f"{rel}: isep/cli/{mod}.py not written yet"
    return None


def launcher(exe: str) -> list[str]:
    """A Python launcher runs under this interpreter (the venv the bench runs in), not through
    whatever `env python3` finds first: a pyenv shim alone adds about 90 ms to every command."""
    try:
        with open(exe, "rb") as f:
            first = f.readline(200)
    except OSError:
        return [exe]
    return [sys.executable, exe] if first.startswith(b"#!") and b"python" in first else [exe]


def measure_startup(ctx: dict, names: list[str], log, times: int = 5) -> dict:
    """Median wall time of `isep-<cmd> --version`: what every run of the command pays before
    reading its first byte."""
    out = {}
    for name in names:
        spec = COMMANDS.get(name)
        exe = spec["argv"][0].format(**ctx) if spec else None
        if exe is None or launcher_missing(exe) or exe in out:
            continue
        walls = []
        for _ in range(times):
            t = time.perf_counter()
            subprocess.run(launcher(exe) + ["--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t)
        out[exe] = round(sorted(walls)[len(walls) // 2], 3)
    log("  startup (--version, median of %d): " % times
        + ", ".join(f"{os.path.basename(k)} {v} s" for k, v in out.items()))
    return {os.path.basename(k): v for k, v in out.items()}


def run_repeated(name: str, spec: dict, ctx: dict, workdir: Path, log, runs: int, primitive=None) -> dict:
    """The command `runs` times; MB/s from the median wall time, RSS and temp bytes the worst.
    primitive: run beside each run, alternately just before and just after it, and the command's
    speed over the primitive's in that pair kept: the machine's speed drifts by 10-20 % within
    minutes, a pair sees the same moment, and neither always runs on the heels of the other."""
    results = []
    paired = []
    for i in range(runs):
        if name.startswith("pack"):  # a pack into an existing store reuses its parts: start empty each time
            shutil.rmtree(ctx["parts"], ignore_errors=True)
        prim_speed = primitive_speed(primitive) if primitive is not None and i % 2 == 0 else None
        os.sync()  # no run pays for the writeback of what an earlier one wrote (parts, primitives)
        r = run_command(name, spec, ctx, workdir, log)
        results.append(r)
        if primitive is not None and i % 2 == 1:
            prim_speed = primitive_speed(primitive)
        if r.get("rc") != 0:
            return r
        if prim_speed:  # on the same basis as ratio_to_primitive (run_size)
            on_input = spec["input"] == "archive" or spec.get("ratio_on") == "input"
            paired.append(round(r["MBps" if on_input else "archive_MBps"] / prim_speed, 3))
    results.sort(key=lambda r: r["wall_s"])
    median = dict(results[len(results) // 2])
    median["walls_s"] = [r["wall_s"] for r in results]
    rss = [r["peak_rss_MiB"] for r in results if r.get("peak_rss_MiB")]
    median["peak_rss_MiB"] = max(rss) if rss else None
    median["temp_peak_bytes"] = max(r["temp_peak_bytes"] for r in results)
    if paired:
        median["paired_ratios"] = sorted(paired)
        median["paired_ratio"] = sorted(paired)[len(paired) // 2]
    return median


def run_command(name: str, spec: dict, ctx: dict, workdir: Path, log) -> dict:
    argv = [a.format(**ctx) for a in spec["argv"]]
    exe = argv[0]
    result = {"command": name, "argv": " ".join(shlex.quote(a) for a in argv)}
    missing = launcher_missing(exe)
    if missing:
        result["skipped"] = missing
        log(f"  {name:<12} SKIPPED: {result['skipped']}")
        return result
    tmpdir = workdir / f"tmp-{name}"
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir()
    rss_file = workdir / f"rss-{name}.txt"
    rss_file.unlink(missing_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    outdir = Path(ctx["parts"])
    stderr_path = workdir / f"stderr-{name}.txt"
    with open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        cat = None
        if spec["stdin"]:
            cat = subprocess.Popen(["cat", ctx["archive"]], stdout=subprocess.PIPE)
        proc = subprocess.Popen(rss_wrapper(rss_file) + launcher(exe) + argv[1:], stdin=cat.stdout if cat else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(workdir))
        if cat:
            cat.stdout.close()
        sampler = TempSampler(tmpdir, outdir, proc.pid)
        sampler.start()
        rc = proc.wait()
        if cat:
            cat.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
    in_bytes = ctx["archive_bytes"] if spec["input"] == "archive" else dir_bytes(outdir)
    rss = read_rss_kib(rss_file)
    result.update({
        "rc": rc, "wall_s": round(wall, 3), "input_bytes": in_bytes,
        "MBps": round(in_bytes / wall / MB, 1),
        "archive_MBps": round(ctx["archive_bytes"] / wall / MB, 1),
        "peak_rss_MiB": round(rss / 1024, 1) if rss else None,
        "temp_peak_bytes": sampler.peak,
        "primitive": spec.get("primitive"),
    })
    if rc != 0:
        tail = stderr_path.read_bytes()[-2000:].decode(errors="replace")
        if "No module named isep.cli" in tail or "No module named 'isep.cli" in tail:
            shutil.rmtree(tmpdir, ignore_errors=True)
            skipped = {"command": name, "argv": result["argv"],
                       "skipped": f"{os.path.basename(exe)}: command module not implemented yet"}
            log(f"  {name:<12} SKIPPED: {skipped['skipped']}")
            return skipped
        result["error"] = tail
        log(f"  {name:<12} FAILED rc={rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
    else:
        log(f"  {name:<12} {result['MBps']:>8} MB/s  rss {result['peak_rss_MiB']} MiB  "
            f"temp {human(sampler.peak)}  ({wall:.1f} s)")
    if name.startswith("pack") and rc == 0:
        result["parts_bytes"] = dir_bytes(outdir)
    shutil.rmtree(tmpdir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------ isula-style route

def isula_route(gen: dict, fmt: str, workdir: Path, log) -> dict:
    """untar the archive to a temp dir, then per part `tar -c FILES | gzip -6 > part.tar.gz`
    and `sha256sum part.tar.gz` (what isula-build's separated save does, rebuilt with
    standard tools)."""
    fam = gen["family"]
    app = fam["app"]
    paths = samples.layer_paths(fmt, app)
    nb, nl = len(fam["base"].layers), len(fam["lib"].layers)
    parts = {"base": sorted(set(paths[:nb])), "lib": sorted(set(paths[nb:nl]) - set(paths[:nb]))}
    root = workdir / "isula-untar"
    out = workdir / "isula-out"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    root.mkdir()
    out.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", gen["archive"], "-C", str(root)], check=True)
    t_untar = time.perf_counter() - t0
    allfiles = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    used = set(parts["base"]) | set(parts["lib"])
    parts["app"] = [f for f in allfiles if f not in used]
    sums = {}
    for part, files in parts.items():
        dest = out / f"{part}.tar.gz"
        with open(dest, "wb") as f:
            tar = subprocess.Popen(["tar", "-c", "-C", str(root), "--"] + files, stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip", "-6"], stdin=tar.stdout, stdout=f)
            tar.stdout.close()
            gz.wait()
            tar.wait()
        sums[part] = subprocess.run(["sha256sum", str(dest)], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
    wall = time.perf_counter() - t0
    res = {"archive_bytes": gen["archive_bytes"], "wall_s": round(wall, 2), "untar_s": round(t_untar, 2),
           "MBps": round(gen["archive_bytes"] / wall / MB, 1), "out_bytes": dir_bytes(out),
           "temp_bytes": dir_bytes(root)}
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    log(f"  isula-route  {res['MBps']:>8} MB/s  on {human(gen['archive_bytes'])} ({wall:.1f} s, "
        f"temp {human(res['temp_bytes'])})")
    return res


# ------------------------------------------------------------------------------ main

def run_size(size: int, args, log) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"isep-bench-{size >> 20}M-", dir=args.workdir))
    log(f"\n== size {human(size)}  format {args.format}  workdir {workdir}")
    gen = generate(workdir, size, args.format, args.layers, args.seed, args.random_fraction)
    log(f"  archive {gen['archive']}: {gen['archive_bytes']} bytes ({human(gen['archive_bytes'])}); "
        f"generated in {gen['gen_first_pass_s']} + {gen['gen_write_s']} s")
    log(f"  base/lib inspect JSON: {gen['base_json']}, {gen['lib_json']}")
    for l in gen["layers"]:
        log(f"    {l['role']:<5} {l['diff_id'][:19]}…  {human(l['tar_bytes'])}")
    run = {"size": size, "format": args.format, "workdir": str(workdir),
           "archive_bytes": gen["archive_bytes"], "layers": gen["layers"],
           "generation_s": [gen["gen_first_pass_s"], gen["gen_write_s"]]}
    runners = primitive_runners(Path(gen["archive"]), parse_size(args.gzip_sample), workdir)
    if not args.skip_primitives:
        log("  primitives (same data):")
        run["primitives"] = measure_primitives(runners, Path(gen["archive"]), log, args.repeat)
    else:
        run["primitives"] = {}
    ctx = {"bin": str(Path(args.bin).resolve()), "archive": gen["archive"],
           "archive_bytes": gen["archive_bytes"], "base_json": gen["base_json"],
           "lib_json": gen["lib_json"], "parts": str(workdir / "parts"), "image": gen["image"]}
    selected = [c.strip() for c in args.commands.split(",") if c.strip()]
    run["startup_s"] = measure_startup(ctx, selected, log)
    cmds = []
    done_ok: set[str] = set()
    log("  isep commands:")
    for name in selected:
        spec = COMMANDS.get(name)
        if spec is None:
            log(f"  {name:<12} unknown command (known: {', '.join(COMMANDS)})")
            continue
        need = spec.get("needs")
        if need and need not in done_ok:
            r = {"command": name, "skipped": f"needs a successful {need} run first"}
            log(f"  {name:<12} SKIPPED: {r['skipped']}")
            cmds.append(r)
            continue
        pair_name = args.pair_with if args.pair_with in [spec.get("primitive")] + spec.get("also", []) \
            else spec.get("primitive") or ""
        pair = runners.get(pair_name) if args.paired and not args.skip_primitives else None
        r = run_repeated(name, spec, ctx, workdir, log, args.runs, pair[1] if pair else None)
        prim = run["primitives"].get(spec.get("primitive") or "")
        if pair:
            r["paired_with"] = pair_name
        if prim and r.get("rc") == 0 and prim.get("MBps"):
            on_input = spec["input"] == "archive" or spec.get("ratio_on") == "input"
            basis = r["MBps"] if on_input else r["archive_MBps"]
            r["ratio_to_primitive"] = round(basis / prim["MBps"], 3)
            for other in spec.get("also", []):
                if run["primitives"].get(other, {}).get("MBps"):
                    r[f"ratio_to_{other}"] = round(basis / run["primitives"][other]["MBps"], 3)
        cmds.append(r)
        if r.get("rc") == 0:
            done_ok.add(name)
    run["commands"] = cmds
    if not args.skip_isula:
        isz = gen["archive_bytes"] if args.isula_size == "full" else min(size, parse_size(args.isula_size))
        if isz < size:
            log(f"  isula-style route on a separate {human(isz)} archive (same format and data mix; "
                f"--isula-size full to use the main one):")
            igen = generate(workdir, isz, args.format, args.layers, args.seed, args.random_fraction, "isula")
        else:
            log("  isula-style route on the main archive:")
            igen = gen
        run["isula_route"] = isula_route(igen, args.format, workdir, log)
        if igen is not gen:
            for k in ("archive", "base_json", "lib_json"):
                Path(igen[k]).unlink(missing_ok=True)
    (workdir / "primitive-d.zst").unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        run["workdir_removed"] = True
    return run


def print_table(runs: list[dict], log) -> None:
    log("")
    hdr = (f"{'size':>9} {'command':<12} {'MB/s':>8} {'arch MB/s':>9} {'primitive':<10} {'prim MB/s':>9} "
           f"{'ratio':>6} {'RSS MiB':>8} {'temp':>10}  note")
    log(hdr)
    log("-" * len(hdr))
    for run in runs:
        sz = human(run["size"])
        prims = run["primitives"]
        for r in run["commands"]:
            if "skipped" in r:
                log(f"{sz:>9} {r['command']:<12} {'-':>8} {'-':>9} {'':<10} {'':>9} {'':>6} {'':>8} {'':>10}  "
                    f"skipped: {r['skipped']}")
                continue
            if r.get("rc"):
                log(f"{sz:>9} {r['command']:<12} {'FAILED':>8} {'':>9} {'':<10} {'':>9} {'':>6} {'':>8} {'':>10}  "
                    f"rc={r['rc']}: {(r.get('error') or '').strip().splitlines()[-1:]}")
                continue
            p = prims.get(r.get("primitive") or "", {})
            log(f"{sz:>9} {r['command']:<12} {r['MBps']:>8} {r['archive_MBps']:>9} {r.get('primitive') or '':<10} "
                f"{p.get('MBps', ''):>9} {r.get('ratio_to_primitive', ''):>6} "
                f"{r['peak_rss_MiB'] if r['peak_rss_MiB'] is not None else '?':>8} "
                f"{human(r['temp_peak_bytes']):>10}  walls {r.get('walls_s', [r['wall_s']])}"
                + "".join(f", {k} {v}" for k, v in r.items() if k.startswith("ratio_to_") and k != "ratio_to_primitive")
                + (f", paired_ratio {r['paired_ratio']} of {r['paired_ratios']} (with {r.get('paired_with')})"
                   if r.get("paired_ratio") else "")
                + (f", parts {r['parts_bytes']} B" if r.get("parts_bytes") else ""))
        if "isula_route" in run:
            i = run["isula_route"]
            best = max((r["MBps"] for r in run["commands"] if r.get("command") == "pack" and r.get("rc") == 0),
                       default=None)
            note = f"pack is {best / i['MBps']:.1f}x faster" if best else ""
            log(f"{sz:>9} {'isula-route':<12} {i['MBps']:>8} {i['MBps']:>9} {'':<10} {'':>9} {'':>6} {'':>8} "
                f"{human(i['temp_bytes']):>10}  on {human(i['archive_bytes'])}; {note}")
        if prims:
            log(f"{sz:>9} primitives: " + ", ".join(f"{k} {v['MBps']}" for k, v in prims.items()))
        if run.get("startup_s"):
            log(f"{sz:>9} startup: " + ", ".join(f"{k} {v} s" for k, v in run["startup_s"].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="archive size (e.g. 256M, 1G); default 1G")
    ap.add_argument("--sizes", help="comma separated sizes, e.g. 1G,4G (overrides --size)")
    ap.add_argument("--format", default="docker-oci", choices=samples.FORMATS)
    ap.add_argument("--commands", default=DEFAULT_COMMANDS,
                    help=f"comma separated, from {', '.join(COMMANDS)} (default: all)")
    ap.add_argument("--out", help="write results as JSON to this file")
    ap.add_argument("--bin", default=str(REPO / "bin"), help="directory of the isep launchers")
    ap.add_argument("--workdir", default=os.environ.get("ISEP_BENCH_DIR"),
                    help="parent of the temp work dir (default: $ISEP_BENCH_DIR or the system temp dir)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-fraction", type=float, default=0.5)
    ap.add_argument("--gzip-sample", default="256M", help="gzip -6 primitive runs on this many bytes")
    ap.add_argument("--isula-size", default="256M",
                    help="archive size for the isula-style route ('full' = the main archive)")
    ap.add_argument("--repeat", type=int, default=1, help="run each primitive N times, report the median")
    ap.add_argument("--runs", type=int, default=3,
                    help="run each command N times; MB/s from the median run, RSS and temp the worst (default 3)")
    ap.add_argument("--skip-primitives", action="store_true")
    ap.add_argument("--paired", action="store_true",
                    help="run each command's primitive beside each of its runs (alternately before and after); "
                         "report the median of the per-pair ratios (paired_ratio) beside the ratio of medians")
    ap.add_argument("--pair-with", metavar="PRIMITIVE",
                    help="with --paired: pair each command with this primitive where it is the command's own "
                         "or one of its \"also\" (e.g. sha256_zstd3_mt_process for pack)")
    ap.add_argument("--skip-isula", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (archive, parts)")
    args = ap.parse_args(argv)

    def log(msg=""):
        print(msg, flush=True)

    sizes = [parse_size(s) for s in (args.sizes.split(",") if args.sizes else [args.size])]
    machine = {"python": sys.version.split()[0], "interpreter": sys.executable,
               "platform": platform.platform(), "cpus": os.cpu_count(),
               "time_tool": "/usr/bin/time -v" if os.access("/usr/bin/time", os.X_OK) else "getrusage wrapper"}
    try:
        import xxhash
        import zstandard
        machine.update(zstandard=zstandard.__version__, libzstd=".".join(map(str, zstandard.ZSTD_VERSION)),
                       xxhash=xxhash.VERSION)
    except Exception:  # pragma: no cover
        pass
    log(f"isep bench: {machine}")
    # What `pip install` does: without it, a checkout run with PYTHONDONTWRITEBYTECODE=1 (set on this
    # machine) recompiles every edited module at each command start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "isep")], check=False)
    runs = [run_size(s, args, log) for s in sizes]
    print_table(runs, log)
    result = {"machine": machine, "args": vars(args), "runs": runs}
    if len(runs) == 2:
        ratio = {}
        a, b = runs
        for ra in a["commands"]:
            rb = next((x for x in b["commands"] if x["command"] == ra["command"]), None)
            if rb and ra.get("peak_rss_MiB") and rb.get("peak_rss_MiB"):
                ratio[ra["command"]] = round(rb["peak_rss_MiB"] / ra["peak_rss_MiB"], 2)
        result["rss_ratio"] = {"sizes": [a["size"], b["size"]], "size_ratio": round(b["size"] / a["size"], 2),
                               "by_command": ratio}
        log(f"\nRSS ratio {human(b['size'])} / {human(a['size'])} (size x{b['size'] / a['size']:.1f}): "
            + (", ".join(f"{k} {v}" for k, v in ratio.items()) or "n/a (no command ran at both sizes)"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
