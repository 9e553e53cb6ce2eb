#!/usr/bin/env python3
"""Bytes a device fetches per release from a registry, on the real release pairs (bench/delta_wire.py's
Docker-25 saves of ~/.cache/isep-release-pairs): for each pair, release 1 pushed whole, release 2 pushed
whole with a delta bundle (isep-pack --delta-from release 1's bundle); a device with an empty store and
a device that pulled release 1 each `isep-join oci://` release 2, byte for byte against its save.
Beside them: curl GET of the same blobs in the same run, and for one pair a second device pulling
through the pull-through cache once it is warm. The registry tier must be running
(bash tests/registry/registry.sh start).

    python bench/registry_wire.py [--pairs a,b,c,d,e] [--cache-pair a] [--workdir DIR] [--out FILE]

Bytes fetched are those the join reports ("N bytes fetched", the client's count of body bytes read),
checked against the sizes of the blobs added to the device's pull directory / store.
Prints a Markdown table; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import delta_wire  # noqa: E402
import release_pairs  # noqa: E402

BIN = delta_wire.BIN
PLAIN_PART_TYPE = "application/vnd.isep.part.v1"  # isep.artifact.PART_TYPES, DELTA_PART_TYPES
DELTA_PART_TYPE = "application/vnd.isep.delta-part.v1"
RUN = f"{os.getpid()}-{int(time.time())}"  # repository names unique to this run: every push uploads


def run(cmd: str, *args, stdin=None, stdout=None) -> dict:
    """Run bin/isep-CMD under GNU time: wall seconds, peak RSS (KiB) and stderr."""
    with tempfile.NamedTemporaryFile("r") as rss:
        argv = ["/usr/bin/time", "-o", rss.name, "-f", "%M", sys.executable, str(BIN / f"isep-{cmd}"), *map(str, args)]
        started = time.monotonic()
        done = subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=False)
        wall = time.monotonic() - started
        err = done.stderr.decode(errors="replace")
        if done.returncode:
            raise SystemExit(f"isep-{cmd} {args} failed ({done.returncode}):\n{err}")
        return {"s": wall, "rss_kib": int(rss.read().split()[-1]), "stderr": err}


def push_figures(r: dict) -> dict:
    """Bytes by outcome from isep-push's last line ("N bytes present, N bytes mounted, N bytes uploaded")."""
    found = re.findall(r"([\d,]+) bytes (present|mounted|uploaded)", r["stderr"])
    moved = {k: int(n.replace(",", "")) for n, k in found}
    up = moved.get("uploaded", 0)
    return {**moved, "s": r["s"], "uploaded_mb_s": up / r["s"] / 1e6, "rss_kib": r["rss_kib"]}


def fetched_bytes(stderr: str) -> int:
    found = re.findall(r"([\d,]+) bytes fetched", stderr)
    if not found:
        raise SystemExit(f"no 'bytes fetched' line in:\n{stderr}")
    return int(found[-1].replace(",", ""))


def dir_bytes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()} if path.is_dir() else {}


def bundle_parts(bundle: Path) -> dict[str, dict]:
    return {p["file"]: p for p in json.loads((bundle / "isep-bundle.json").read_text())["parts"]}


def release_manifest(url: str, repo: str, tag: str) -> tuple[dict, int]:
    out = subprocess.run(["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                          f"{url}/v2/{repo}/manifests/{tag}"], capture_output=True, check=True).stdout
    return json.loads(out), len(out)


def metadata_bytes(doc: dict, size: int) -> int:
    """What every device fetches before any part: the manifest, the config (the bundle manifest) and
    the delta bundles' manifests and signatures (not in the join's "bytes fetched")."""
    meta = [la for la in doc["layers"] if not la["mediaType"].startswith((PLAIN_PART_TYPE, DELTA_PART_TYPE))]
    return size + doc["config"]["size"] + sum(la["size"] for la in meta)


def curl_blobs(url: str, repo: str, layers: list[dict]) -> dict:
    """GET each blob to /dev/null, one curl each: seconds and MB/s over their sum."""
    started = time.monotonic()
    for layer in layers:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{url}/v2/{repo}/blobs/{layer['digest']}"], check=True)
    wall = time.monotonic() - started
    size = sum(layer["size"] for layer in layers)
    return {"bytes": size, "s": wall, "mb_s": size / wall / 1e6 if wall else 0.0}


def join_device(ref: str, device: Path, out: Path, want: Path | None) -> dict:
    before = dir_bytes(device)
    with open(out, "wb") as dst:
        r = run("join", ref, device, stdout=dst)
    result = {"fetched": fetched_bytes(r["stderr"]), "s": r["s"], "rss_kib": r["rss_kib"],
              "kept": sum(n for name, n in dir_bytes(device).items() if name not in before)}
    if want is not None:
        same = subprocess.run(["cmp", "-s", out, want]).returncode == 0
        assert same, f"{ref} into {device}: not byte-exact against {want}"
        result["byte_exact"] = same
        result["mb_s"] = want.stat().st_size / r["s"] / 1e6
    os.unlink(out)
    return result


def prepare(key: str, pair: dict, d: Path, digests: dict[str, str], tiny: str) -> dict:
    """Release 1's bundle (d/r1), release 2's (d/r2) and the delta bundle from 1 to 2 (d/d12)."""
    files, names = delta_wire.write_pair_saves(pair, d, digests, tiny)
    args = {}
    for r in ("r1", "r2"):
        below = [digests[f] for f, n in zip(files[r], names[r]) if n in ("base", "lib")]
        base = delta_wire.base_config(d / f"base-{r}.json", below[:1])
        args[r] = ["--base", base] + (["--lib", delta_wire.base_config(d / f"lib-{r}.json", below)]
                                      if len(below) > 1 else [])
    delta_wire.isep("pack", d / "r1.tar", *args["r1"], "-o", d / "r1")
    delta_wire.isep("pack", d / "r2.tar", *args["r2"], "-o", d / "r2")
    delta_wire.isep("pack", d / "r2.tar", *args["r2"], "--delta-from", d / "r1", "-o", d / "d12")
    return {"title": pair["title"], "r2_bytes": (d / "r2.tar").stat().st_size}


def bench_pair(key: str, pair: dict, work: Path, digests: dict[str, str], tiny: str, registry: dict,
               cache: dict | None) -> dict:
    d = work / key
    out = prepare(key, pair, d, digests, tiny)
    repo = f"bench-{key}-{RUN}/app"
    ref = f"oci://{registry['host']}/{repo}"
    r1 = run("push", d / "r1", f"{ref}:1", stdout=subprocess.DEVNULL)
    r2 = run("push", d / "r2", f"{ref}:2", "--delta", d / "d12", stdout=subprocess.DEVNULL)
    out["push_r1"] = push_figures(r1)
    out["push"] = push_figures(r2)
    parts = bundle_parts(d / "r2")
    app = [p for p in parts.values() if p["role"] == "app"]
    out["app_part_bytes"] = sum(p["size"] for p in app)
    out["release_part_bytes"] = sum(p["size"] for p in parts.values())
    out["empty"] = join_device(f"{ref}:2", d / "dev-empty", d / "out", d / "r2.tar")
    out["r1_pull"] = join_device(f"{ref}:1", d / "dev-r1", d / "out", d / "r1.tar")
    out["from_r1"] = join_device(f"{ref}:2", d / "dev-r1", d / "out", d / "r2.tar")
    out["delta_part_bytes"] = sum(p["size"] for p in bundle_parts(d / "d12").values())
    assert out["empty"]["fetched"] == out["release_part_bytes"], "an empty device fetches every part once"
    assert out["from_r1"]["fetched"] <= out["delta_part_bytes"] + out["release_part_bytes"] - out["app_part_bytes"]
    for dev in ("empty", "from_r1"):
        out[dev]["ratio_to_app"] = out[dev]["fetched"] / max(out["app_part_bytes"], 1)
    doc, size = release_manifest(registry["url"], repo, "2")
    layers = doc["layers"]
    out["metadata_bytes"] = metadata_bytes(doc, size)
    plain = [la for la in layers if la["mediaType"].startswith(PLAIN_PART_TYPE)]
    deltas = [la for la in layers if la["mediaType"].startswith(DELTA_PART_TYPE)]
    assert sum(la["size"] for la in plain) == out["release_part_bytes"]
    out["curl_plain_parts"] = curl_blobs(registry["url"], repo, plain)
    out["curl_delta_parts"] = curl_blobs(registry["url"], repo, deltas)
    if cache is not None:
        cref = f"oci://{cache['host']}/{repo}:2"
        out["cache_cold"] = join_device(cref, d / "dev-cache-1", d / "out", d / "r2.tar")
        out["cache_warm"] = join_device(cref, d / "dev-cache-2", d / "out", d / "r2.tar")
        out["curl_cache_warm"] = curl_blobs(cache["url"], repo, plain)
    shutil.rmtree(d, ignore_errors=True)
    return out


def table(results: dict) -> str:
    mb = 1e6
    rows = ["| pair | release 2 save | its parts (app part) | empty device fetched | release-1 device fetched "
            "| manifests, every device | release-1 device / app part | pull+join s, empty / release-1 (archive MB/s) "
            "| curl GET of the same blobs, MB/s (empty / release-1) | push s release 1 / 2 (upload MB/s) "
            "| peak RSS push / join (empty, release-1) MiB | byte-exact |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        e, f, p1, p2 = r["empty"], r["from_r1"], r["push_r1"], r["push"]
        rows.append(
            f"| {k} {r['title']} | {r['r2_bytes'] / mb:.1f} MB | {r['release_part_bytes'] / mb:.2f} MB "
            f"({r['app_part_bytes'] / mb:.2f} MB) | {e['fetched'] / mb:.2f} MB | {f['fetched'] / mb:.3f} MB "
            f"| {r['metadata_bytes'] / 1e3:.1f} kB "
            f"| {f['ratio_to_app']:.2%} | {e['s']:.1f} ({e['mb_s']:.0f}) / {f['s']:.1f} ({f['mb_s']:.0f}) "
            f"| {r['curl_plain_parts']['mb_s']:.0f} / {r['curl_delta_parts']['mb_s']:.0f} "
            f"| {p1['s']:.1f} ({p1['uploaded_mb_s']:.0f}) / {p2['s']:.1f} ({p2['uploaded_mb_s']:.0f}) "
            f"| {max(p1['rss_kib'], p2['rss_kib']) / 1024:.0f} / {e['rss_kib'] / 1024:.0f}, {f['rss_kib'] / 1024:.0f} "
            f"| {e['byte_exact'] and f['byte_exact']} |")
    for k, r in results.items():
        if "cache_warm" in r:
            c, w = r["cache_cold"], r["cache_warm"]
            rows.append("")
            rows.append(f"Pair {k} through the pull-through cache (empty devices): the first device fetched "
                        f"{c['fetched'] / mb:.2f} MB in {c['s']:.1f} s (cache cold: it fetched from the registry), "
                        f"the second {w['fetched'] / mb:.2f} MB in {w['s']:.1f} s ({w['mb_s']:.0f} MB/s of archive; "
                        f"curl GET of the same blobs from the warm cache {r['curl_cache_warm']['mb_s']:.0f} MB/s), "
                        f"byte-exact {c['byte_exact'] and w['byte_exact']}.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=Path, default=release_pairs.DEFAULT_ROOT / "layers")
    parser.add_argument("--pairs", default="a,b,c,d,e")
    parser.add_argument("--cache-pair", default="a", help="the pair also pulled through the cache ('' for none)")
    parser.add_argument("--env", default="/tmp/isep-registry/env.json")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = json.loads(Path(args.env).read_text())
    pairs = json.loads((args.layers / "pairs.json").read_text())["pairs"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="isep-registry-wire-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny-base.tar"
    _tiny(tiny)
    files = {str(tiny)} | {layer["file"] for p in pairs.values() for r in ("r1", "r2") for layer in p[r]["layers"]}
    digests = {f: delta_wire.sha256_file(f) for f in files}
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {}
    for k in args.pairs.split(","):
        if k in pairs:
            results[k] = bench_pair(k, pairs[k], work, digests, str(tiny), env["open"],
                                    env.get("cache") if k == args.cache_pair else None)
            print(f"pair {k} done", file=sys.stderr, flush=True)
    text = table(results)
    print(text)
    doc = {"uptime_before": uptime, "uptime_after": subprocess.run(["uptime"], capture_output=True,
                                                                    text=True).stdout.strip(),
           "registry": env["open"]["url"], "pairs": results, "table": text}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"uptime before: {doc['uptime_before']}\nuptime after: {doc['uptime_after']}")


def _tiny(path: Path) -> None:
    import tarfile
    with tarfile.open(path, "w") as tar:
        delta_wire._add(tar, "etc/os-release", b"ID=bench\n")


if __name__ == "__main__":
    main()
