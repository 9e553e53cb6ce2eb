#!/usr/bin/env python3
"""Bytes on the link per release, through the real commands: each release pair of
bench/release_pairs.py (pairs.json under ~/.cache/isep-release-pairs/layers) made into two Docker-25
style saves, release 1 packed into a store, release 2 packed with and without --delta-from it as a
bundle stream, joined against a copy of the store and compared with release 2's save.

    python bench/delta_wire.py [--layers DIR] [--pairs a,b,c,d,e] [--workdir DIR] [--runs N] [--out FILE]

Pairs without a base layer get a one-file base layer beneath them (a base is what isep splits on).
Each pack and join runs N times (default 3): the median wall time (whole command, start-up included)
and the largest peak RSS of the N (the child's own, from wait4) are kept, MB/s is release 2's save
over that wall time. Prints a Markdown table and writes WORKDIR/delta-wire.json (and FILE).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import release_pairs  # noqa: E402

BIN = ROOT / "bin"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            data = fh.read(1 << 20)
            if not data:
                return "sha256:" + h.hexdigest()
            h.update(data)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_save(out: Path, tag: str, layer_files: list[str], digests: dict[str, str]) -> dict:
    """A Docker-25-style save (OCI layout + manifest.json) of one image made of these layer tars."""
    diff_ids = [digests[f] for f in layer_files]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"layer {i}"} for i in range(len(diff_ids))]}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                                       "size": os.path.getsize(f)} for f, d in zip(layer_files, diff_ids)]}).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    repo, _, tag_name = tag.rpartition(":")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for f, d in zip(layer_files, diff_ids):
            info = tarfile.TarInfo("blobs/sha256/" + d[7:])
            info.size, info.mode, info.mtime = os.path.getsize(f), 0o644, 0
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
        _add(tar, "blobs/sha256/" + config_digest[7:], config)
        _add(tar, "blobs/sha256/" + manifest_digest[7:], manifest)
        _add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": len(manifest), "annotations": {"io.containerd.image.name": f"docker.io/{tag}",
                                                    "org.opencontainers.image.ref.name": tag_name}}]}).encode())
        _add(tar, "manifest.json", json.dumps([{"Config": "blobs/sha256/" + config_digest[7:],
                                                "RepoTags": [tag], "Layers": ["blobs/sha256/" + d[7:]
                                                                              for d in diff_ids]}]).encode())
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "repositories", json.dumps({repo: {tag_name: diff_ids[-1][7:]}}).encode())
    return {"diff_ids": diff_ids}


def base_config(path: Path, diff_ids: list[str]) -> Path:
    path.write_text(json.dumps({"architecture": "amd64", "os": "linux",
                                "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
    return path


def isep(cmd: str, *args, stdin=None, stdout=None) -> float:
    return isep_measured(cmd, *args, stdin=stdin, stdout=stdout)[0]


def isep_measured(cmd: str, *args, stdin=None, stdout=None) -> tuple[float, int]:
    """One isep command run: its wall time and its own peak RSS in bytes."""
    started = time.monotonic()
    argv = [sys.executable, str(BIN / f"isep-{cmd}"), *map(str, args)]
    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return wall, usage.ru_maxrss * 1024


def median_run(runs: int, run) -> tuple[float, int]:
    """The median wall time of `runs` calls of run() and the largest peak RSS among them. Each run
    starts after sync: the saves and store written just before (600 MB for pair a) would otherwise
    be written back during the first runs (pair a's delta pack: 1.41 s against 1.00 s synced)."""
    results = []
    for _ in range(runs):
        os.sync()
        results.append(run())
    walls = sorted(wall for wall, _ in results)
    return walls[len(walls) // 2], max(rss for _, rss in results)


def write_pair_saves(pair: dict, d: Path, digests: dict[str, str], tiny: str) -> tuple[dict, dict]:
    """d/r1.tar and d/r2.tar (d made afresh): the pair's two releases as saves, with the one-file base
    layer TINY beneath a pair that has no base. Returns each release's layer files and names."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    files = {r: [layer["file"] for layer in pair[r]["layers"]] for r in ("r1", "r2")}
    names = {r: [layer["name"] for layer in pair[r]["layers"]] for r in ("r1", "r2")}
    if "base" not in names["r1"]:
        files = {r: [tiny] + f for r, f in files.items()}
        names = {r: ["base"] + n for r, n in names.items()}
    repo = pair["r1"]["repository"]
    for r in ("r1", "r2"):
        write_save(d / f"{r}.tar", f"{repo}:{r[1]}", files[r], digests)
    return files, names


def bench_pair(key: str, pair: dict, work: Path, digests: dict[str, str], tiny: str, runs: int = 3) -> dict:
    d = work / key
    files, names = write_pair_saves(pair, d, digests, tiny)
    bases, extra = {}, {}
    for r in ("r1", "r2"):
        below = [digests[f] for f, n in zip(files[r], names[r]) if n in ("base", "lib")]
        bases[r] = base_config(d / f"base-{r}.json", below[:1])
        extra[r] = ["--lib", base_config(d / f"lib-{r}.json", below)] if len(below) > 1 else []
    isep("pack", d / "r1.tar", "--base", bases["r1"], *extra["r1"], "-o", d / "store")
    base_changed = names["r1"][0] == "base" and files["r1"][0] != files["r2"][0]
    parts = ["--parts", "base,lib,app"] if base_changed else ["--parts", "app"]
    out: dict = {"title": pair["title"], "r2_bytes": os.path.getsize(d / "r2.tar"), "parts": parts[1]}
    for label, delta in (("plain", []), ("delta", ["--delta-from", d / "store"])):
        def pack(label: str = label, delta: list = delta) -> tuple[float, int]:
            with open(d / f"{label}.stream", "wb") as fh:
                return isep_measured("pack", d / "r2.tar", "--base", bases["r2"], *extra["r2"], "-o", "-",
                                     *parts, *delta, stdout=fh)

        def join(label: str = label, device: Path = d / f"device-{label}") -> tuple[float, int]:
            with open(d / f"{label}.stream", "rb") as src, open(d / f"{label}.out", "wb") as dst:
                return isep_measured("join", device, "-", stdin=src, stdout=dst)

        out[f"{label}_pack_s"], out[f"{label}_pack_rss"] = median_run(runs, pack)
        out[f"{label}_bytes"] = os.path.getsize(d / f"{label}.stream")
        device = d / f"device-{label}"
        shutil.copytree(d / "store", device)
        out[f"{label}_join_s"], out[f"{label}_join_rss"] = median_run(runs, join)
        for step in ("pack", "join"):
            out[f"{label}_{step}_MBps"] = round(out["r2_bytes"] / out[f"{label}_{step}_s"] / 1e6, 1)
        out[f"{label}_byte_exact"] = subprocess.run(["cmp", "-s", d / f"{label}.out", d / "r2.tar"]).returncode == 0
        os.unlink(d / f"{label}.out")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=Path, default=release_pairs.DEFAULT_ROOT / "layers")
    parser.add_argument("--pairs", default="a,b,c,d,e")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    pairs = json.loads((args.layers / "pairs.json").read_text())["pairs"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="isep-delta-wire-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny-base.tar"
    with tarfile.open(tiny, "w") as tar:
        _add(tar, "etc/os-release", b"ID=bench\n")
    files = {str(tiny)} | {layer["file"] for p in pairs.values() for r in ("r1", "r2") for layer in p[r]["layers"]}
    digests = {f: sha256_file(f) for f in files}
    # What `pip install` does: without it, a checkout run with PYTHONDONTWRITEBYTECODE=1 (set on this
    # machine) recompiles every edited module at each command start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "isep")], check=False)
    results = {k: bench_pair(k, pairs[k], work, digests, str(tiny), args.runs)
               for k in args.pairs.split(",") if k in pairs}
    doc = json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": os.getloadavg(),
                      "runs": args.runs, "pairs": results}, indent=1) + "\n"
    (work / "delta-wire.json").write_text(doc)
    if args.out:
        args.out.write_text(doc)
    print("| pair | release 2 save | shipped | plain stream | delta stream | ratio | pack s (plain/delta) "
          "| pack MB/s, RSS MiB (delta) | join s (plain/delta) | join MB/s, RSS MiB (delta) | byte-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} {r['title']} | {r['r2_bytes'] / 1e6:.1f} MB | {r['parts']} | {r['plain_bytes'] / 1e6:.2f} MB "
              f"| {r['delta_bytes'] / 1e6:.3f} MB | {r['plain_bytes'] / max(r['delta_bytes'], 1):.0f}x "
              f"| {r['plain_pack_s']:.2f}/{r['delta_pack_s']:.2f} | {r['delta_pack_MBps']}, "
              f"{r['delta_pack_rss'] >> 20} | {r['plain_join_s']:.2f}/{r['delta_join_s']:.2f} "
              f"| {r['delta_join_MBps']}, {r['delta_join_rss'] >> 20} "
              f"| {r['plain_byte_exact'] and r['delta_byte_exact']} |")
    print(f"(work files in {work})")


if __name__ == "__main__":
    main()
