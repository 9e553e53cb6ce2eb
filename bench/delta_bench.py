#!/usr/bin/env python3
"""Delta benchmark: what crosses the link per release, with isep.delta, beside `zstd --patch-from`.

    python bench/delta_bench.py [--pairs a,b,c,d,e] [--big] [--out FILE.json] [--workdir DIR]

For each release pair of bench/release_pairs.py (built, or reused from its cache): the bytes isep
ships today (the app part, zstd -3 in 4 MiB frames; for a new base, every part), the zstd CLI
(`-3 --long=30 --patch-from=<reference>` per changed layer), and the engine: layers whose diffID the
store (release 1) holds are referenced, not shipped; the others are encoded against the best-ranked
reference of release 1 (and, to see whether a second candidate would help, against the second too).
"pack" and "join" run in child processes (peak RSS from wait4) over the whole of release 2, the way
isep-pack and isep-join would: read and hash every layer, encode or decode the changed ones
(with the plain size estimated from a sample; measured exactly, by to_plain, only when the
delta does not beat the estimate), verify every diffID. Their MB/s are
over release 2's layer bytes ("archive"). `--big` adds a ~1 GiB layer (release pair bytes
concatenated) under the default 1 GiB memory cap, for the peak RSS of a segmented delta.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import release_pairs  # noqa: E402
import xxhash  # noqa: E402

from isep import delta, deltarank  # noqa: E402
from isep.parts import FRAME, compress_frame  # noqa: E402

CHUNK = 1 << 20
MB = 1e6
SLACK = 64 << 10


def read_chunks(path: str, size: int = CHUNK):
    with open(path, "rb", buffering=0) as fh:
        while True:
            chunk = fh.read(size)
            if not chunk:
                return
            yield chunk


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    for chunk in read_chunks(path):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def layer_info(layer: dict, repo: str, position: int, diff_id: str) -> deltarank.LayerInfo:
    return deltarank.LayerInfo(diff_id, os.path.getsize(layer["file"]), repo, position, layer["role"],
                           layer["created_by"], layer["name"])


def reference_of(path: str, diff_id: str, xxh3: str = "") -> delta.Reference:
    return delta.Reference(os.path.getsize(path), diff_id, lambda: read_chunks(path), os.path.basename(path), xxh3)


def xxh3_file(path: str) -> str:
    h = xxhash.xxh3_128()
    for chunk in read_chunks(path):
        h.update(chunk)
    return h.hexdigest()


# --- child processes (peak RSS of their own) -----------------------------------------------------

def worker_pack(spec: dict) -> dict:
    """Release 2 against a store holding release 1, as isep-pack would run it: a layer whose diffID
    (known from the image config) the store holds is read and verified only; the others are encoded
    against the best-ranked reference (checked by the xxh3 the store's manifest records), the plain
    size estimated from a sample."""
    store = {d: f for f, d in spec["store"].items()}
    infos = [deltarank.LayerInfo(**i) for i in spec["store_infos"]]
    results, start = [], time.perf_counter()
    for i, layer in enumerate(spec["layers"]):
        t0 = time.perf_counter()
        if layer["diff_id"] in store:
            assert sha256_file(layer["file"]) == layer["diff_id"]
            results.append({"file": layer["file"], "method": "reference", "size": 0,
                            "seconds": time.perf_counter() - t0})
            continue
        target = deltarank.LayerInfo(layer["diff_id"], os.path.getsize(layer["file"]), spec["repository"], i,
                                 layer["role"], layer["created_by"], layer["name"])
        ranked = deltarank.rank_references(target, infos)
        ref_file = store[ranked[0].diff_id]
        out_path = os.path.join(spec["workdir"], os.path.basename(layer["file"]) + ".delta")
        reference = reference_of(ref_file, ranked[0].diff_id, spec["xxh3"][ref_file])
        with open(out_path, "wb") as out:
            record = delta.encode_layer(read_chunks(layer["file"]), target.size, reference, out.write,
                                        memory=spec["memory"])
        plain = record.plain_estimate
        if record.size >= plain:  # the estimate says the delta does not win: measure plain exactly
            plain = delta.to_plain(record, read_chunks(out_path), reference, lambda b: None, memory=spec["memory"])
        assert record.target_diff_id == layer["diff_id"]
        results.append({"file": layer["file"], "method": "delta" if record.size < plain else "plain",
                        "size": min(record.size, plain), "delta_size": record.size, "plain_size": plain,
                        "plain_exact": record.size >= record.plain_estimate,
                        "reference": ref_file, "candidates": [store[c.diff_id] for c in ranked[:2]],
                        "record": record.to_json(), "delta_file": out_path, "seconds": time.perf_counter() - t0})
    return {"layers": results, "seconds": time.perf_counter() - start}


def worker_join(spec: dict) -> dict:
    """Rebuild release 2 on the device: referenced layers from the store, the others from deltas;
    every diffID checked; the output goes to /dev/null."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        for layer in spec["layers"]:
            if layer["method"] == "reference":
                h = hashlib.sha256()
                for chunk in read_chunks(spec["store_by_diff_id"][layer["diff_id"]]):
                    h.update(chunk)
                    sink.write(chunk)
                assert "sha256:" + h.hexdigest() == layer["diff_id"]
                continue
            record = delta.DeltaRecord.from_json(layer["record"])
            ref = reference_of(layer["reference"], record.reference_diff_id, spec["xxh3"][layer["reference"]])
            for piece in delta.decode_layer(record, read_chunks(layer["delta_file"]), ref, memory=spec["memory"]):
                sink.write(piece)
    return {"seconds": time.perf_counter() - start}


def worker_second(spec: dict) -> dict:
    return second_candidate(spec["layer"], spec["store"], spec["memory"]) or {}


def worker_tar_aware(spec: dict) -> dict:
    return tar_aware_bound(spec["old"], spec["new"])


def worker_primitives(spec: dict) -> dict:
    """This machine's speed on the same data, in the same run: sha256, zstd -3 (one thread), zstd -d."""
    data = Path(spec["file"]).read_bytes()
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    t1 = time.perf_counter()
    packed = delta.zstd.compress(data, 3)
    t2 = time.perf_counter()
    decomp = delta.zstd.ZstdDecompressor()
    while not decomp.eof:  # in pieces, as a reader does (one shot grows its buffer: slower)
        decomp.decompress(packed if decomp.needs_input else b"", delta.PIECE)
        packed = b""
    t3 = time.perf_counter()
    n = len(data) / MB
    return {"file": spec["file"], "sha256_mbps": n / (t1 - t0), "zstd3_mbps": n / (t2 - t1),
            "zstd_d_mbps": n / (t3 - t2)}


WORKERS = {"primitives": worker_primitives, "pack": worker_pack, "join": worker_join, "second": worker_second, "tar-aware": worker_tar_aware}


def vm_hwm() -> int:
    """This process's peak RSS (VmHWM, reset by exec unlike ru_maxrss)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(mode: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", mode, fh.name], stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, _ = os.wait4(proc.pid, 0)
    os.unlink(fh.name)
    if status:
        raise SystemExit(f"{mode} worker failed ({status})")
    return json.loads(out)


def zstd_cli(reference: str, target: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(["zstd", "-q", "-3", "--long=30", f"--patch-from={reference}", target, "-c"],
                            stdout=subprocess.PIPE)
    size = 0
    while True:
        chunk = proc.stdout.read(CHUNK)
        if not chunk:
            break
        size += len(chunk)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"zstd --patch-from failed on {target}")
    return {"size": size, "seconds": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024}


def zstd_part_size(paths: list[str]) -> int:
    """Today's part: the layers' bytes in FRAME-sized frames at zstd -3 (tar headers of the part aside)."""
    size, buf = 0, bytearray()
    for path in paths:
        for chunk in read_chunks(path, FRAME):
            buf += chunk
            while len(buf) >= FRAME:
                size += len(compress_frame("zstd", 3, bytes(buf[:FRAME])))
                del buf[:FRAME]
    return size + len(compress_frame("zstd", 3, bytes(buf)))


# --- one pair ------------------------------------------------------------------------------------

def bench_pair(key: str, pair: dict, workdir: Path, memory: int, digests: dict) -> dict:
    def digest(path):
        if path not in digests:
            digests[path] = sha256_file(path)
        return digests[path]

    r1, r2 = pair["r1"], pair["r2"]
    store = {l["file"]: digest(l["file"]) for l in r1["layers"]}
    infos = [layer_info(l, r1["repository"], i, store[l["file"]]) for i, l in enumerate(r1["layers"])]
    xxh3 = {f: xxh3_file(f) for f in store}
    spec = {"store": store, "store_infos": [vars(i) for i in infos], "xxh3": xxh3,
            "layers": [{**l, "diff_id": digest(l["file"])} for l in r2["layers"]],
            "repository": r2["repository"], "workdir": str(workdir), "memory": memory}
    pack = run_child("pack", spec)
    archive = sum(os.path.getsize(l["file"]) for l in r2["layers"])
    changed = [l for l in pack["layers"] if l["method"] != "reference"]
    for layer in changed:
        layer["cli"] = zstd_cli(layer["reference"], layer["file"])
        layer["second"] = run_child("second", {"layer": layer, "store": store, "memory": memory})
    join_spec = {"memory": memory, "store_by_diff_id": {d: f for f, d in store.items()},
                 "xxh3": xxh3,
                 "layers": [{**l, "diff_id": digest(l["file"])} for l in pack["layers"]]}
    join = run_child("join", join_spec)
    base_changed = any(l["role"] != "app" and digest(l["file"]) not in store.values() for l in r2["layers"])
    today_layers = [l["file"] for l in r2["layers"] if base_changed or l["role"] == "app"]
    shipped = sum(l["size"] for l in pack["layers"])
    cli = sum(l["cli"]["size"] for l in changed)
    result = {"title": pair["title"], "archive_bytes": archive, "today_bytes": zstd_part_size(today_layers),
              "today_is": "every part (the base changed)" if base_changed else "the app part",
              "shipped_bytes": shipped, "cli_bytes": cli, "pack": pack, "join": join,
              "pack_mbps": archive / pack["seconds"] / MB, "join_mbps": archive / join["seconds"] / MB,
              "target_cli_ok": shipped <= cli + SLACK}
    if key == "c":
        result["tar_aware"] = run_child("tar-aware", {"old": r1["layers"], "new": r2["layers"]})
    return result


def second_candidate(layer: dict, store: dict, memory: int) -> dict | None:
    """The delta against the second-ranked reference, to see whether trying two would pay."""
    if len(layer["candidates"]) < 2:
        return None
    ref = layer["candidates"][1]
    out = [0]
    record = delta.encode_layer(read_chunks(layer["file"]), os.path.getsize(layer["file"]),
                                reference_of(ref, store[ref]), lambda b: out.__setitem__(0, out[0] + len(b)),
                                memory=memory)
    return {"reference": ref, "size": record.size}


def tar_aware_bound(old_layers: list[dict], new_layers: list[dict]) -> dict:
    """Case (c): what a tar-aware delta could reach at best: the new headers against the old ones
    (a prefix) plus the data of files whose content changed (against their old version)."""
    old = next(l["file"] for l in old_layers if l["name"] == "deps")
    new = next(l["file"] for l in new_layers if l["name"] == "deps")

    def headers_and_files(path):
        heads, files = bytearray(), {}
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for info in tar:
                heads += info.tobuf(tarfile.PAX_FORMAT)
                if info.isfile():
                    files[info.name] = tar.extractfile(info).read()
        return bytes(heads), files

    old_heads, old_files = headers_and_files(old)
    new_heads, new_files = headers_and_files(new)
    heads_delta = len(_prefix_compress(new_heads, old_heads))
    changed = [n for n, data in new_files.items() if old_files.get(n) != data]
    data_delta = sum(len(_prefix_compress(new_files[n], old_files.get(n) or b"")) for n in changed)
    return {"header_bytes": len(new_heads), "header_delta": heads_delta, "changed_files": len(changed),
            "changed_file_bytes": sum(len(new_files[n]) for n in changed), "changed_data_delta": data_delta,
            "bound": heads_delta + data_delta}


def _prefix_compress(data: bytes, prefix: bytes) -> bytes:
    z = delta.zstd
    if len(prefix) < 64:
        return z.compress(data, 3)
    opts = {z.CompressionParameter.compression_level: 3, z.CompressionParameter.enable_long_distance_matching: 1,
            z.CompressionParameter.window_log: delta.window_log_for(len(prefix), len(data))}
    return z.ZstdCompressor(options=opts, zstd_dict=z.ZstdDict(prefix, is_raw=True).as_prefix).compress(
        data, z.ZstdCompressor.FLUSH_FRAME)


# --- the 1 GiB layer -----------------------------------------------------------------------------

def bench_big(layers_dir: Path, workdir: Path, memory: int) -> dict:
    """A ~1 GiB layer and its next release (release pair bytes concatenated), default memory cap."""
    old_parts = ["deps1", "deps1", "deps1", "deps1", "deps1", "base1", "lib1"]
    new_parts = ["deps2", "deps1b", "deps2", "deps1b", "deps2", "base2", "lib1"]
    files = {}
    for name, parts in (("big1.tar", old_parts), ("big2.tar", new_parts)):
        path = workdir / name
        with open(path, "wb") as out:
            for part in parts:
                for chunk in read_chunks(str(layers_dir / f"{part}.tar")):
                    out.write(chunk)
        files[name] = str(path)
    d1, d2 = sha256_file(files["big1.tar"]), sha256_file(files["big2.tar"])
    layer = {"file": files["big2.tar"], "role": "app", "created_by": "RUN big", "name": "big", "diff_id": d2}
    old = {**layer, "file": files["big1.tar"]}
    spec = {"store": {files["big1.tar"]: d1}, "layers": [layer], "repository": "apps/big", "workdir": str(workdir),
            "xxh3": {files["big1.tar"]: xxh3_file(files["big1.tar"])},
            "memory": memory, "store_infos": [vars(layer_info(old, "apps/big", 0, d1))]}
    pack = run_child("pack", spec)
    entry = pack["layers"][0]
    join = run_child("join", {"memory": memory, "store_by_diff_id": {d1: files["big1.tar"]},
                              "xxh3": {files["big1.tar"]: xxh3_file(files["big1.tar"])},
                              "layers": [{**entry, "diff_id": d2}]})
    cli = zstd_cli(files["big1.tar"], files["big2.tar"])
    size = os.path.getsize(files["big2.tar"])
    return {"layer_bytes": size, "record_note": entry["record"]["note"], "segments": len(entry["record"]["segments"]),
            "shipped_bytes": entry["size"], "delta_bytes": entry["delta_size"], "plain_bytes": entry["plain_size"],
            "pack_seconds": pack["seconds"], "pack_mbps": size / pack["seconds"] / MB, "pack_peak_rss": pack["peak_rss"],
            "join_seconds": join["seconds"], "join_mbps": size / join["seconds"] / MB, "join_peak_rss": join["peak_rss"],
            "memory_cap": memory, "cli": cli}


# --- report --------------------------------------------------------------------------------------

def table(results: dict) -> str:
    rows = ["| pair | release 2 | today (isep, zstd -3) | zstd CLI patch-from | engine ships | engine / today "
            "| engine / CLI | pack MB/s | join MB/s | pack / join peak RSS | <= CLI + 64 KiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["pairs"].items():
        rows.append(
            f"| {key}: {r['title']} | {r['archive_bytes'] / MB:.1f} MB | {r['today_bytes'] / MB:.2f} MB ({r['today_is']}) "
            f"| {r['cli_bytes'] / 1e3:.1f} kB | {r['shipped_bytes'] / 1e3:.1f} kB "
            f"| {r['shipped_bytes'] / r['today_bytes']:.4f} | {_ratio(r['shipped_bytes'], r['cli_bytes'])} "
            f"| {r['pack_mbps']:.0f} | {r['join_mbps']:.0f} "
            f"| {r['pack']['peak_rss'] / 2**20:.0f} / {r['join']['peak_rss'] / 2**20:.0f} MiB "
            f"| {'yes' if r['target_cli_ok'] else 'NO'} |")
    return "\n".join(rows)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else ("1 (both 0)" if not a else "n/a")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="a,b,c,d,e")
    parser.add_argument("--cache", type=Path, default=release_pairs.DEFAULT_ROOT / "cache")
    parser.add_argument("--layers", type=Path, default=release_pairs.DEFAULT_ROOT / "layers")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--memory", type=int, default=delta.DEFAULT_MEMORY)
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, path = args.worker
        spec = json.loads(Path(path).read_text())
        result = WORKERS[mode](spec)
        result["peak_rss"] = vm_hwm()
        print(json.dumps(result))
        return
    wanted = args.pairs.split(",")
    doc = release_pairs.build_all(args.cache, args.layers, set(wanted))
    workdir = Path(tempfile.mkdtemp(prefix="isep-delta-bench-", dir=args.workdir))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
               "libzstd": ".".join(map(str, delta.zstd.zstd_version_info)),
               "zstd_cli": subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout.strip(),
               "memory_cap": args.memory, "pairs": {}}
    digests: dict = {}
    deps = args.layers / "deps1.tar"
    if deps.exists():
        results["primitives"] = run_child("primitives", {"file": str(deps)})
    for key in wanted:
        print(f"pair {key} ...", file=sys.stderr)
        results["pairs"][key] = bench_pair(key, doc["pairs"][key], workdir, args.memory, digests)
    if args.big:
        print("1 GiB layer ...", file=sys.stderr)
        results["big"] = bench_big(args.layers, workdir, args.memory)
    for f in workdir.iterdir():
        f.unlink()
    workdir.rmdir()
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
